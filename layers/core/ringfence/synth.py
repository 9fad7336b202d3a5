"""Synthetic estates for benchmarks and comparisons: seeded, reproducible, realistically shaped.

Shape (see also ``docs/benchmarks.md``)::

    apps        max(3, round(N / 60)) by default: ~167 apps at N = 10,000
    app groups  every app runs in prod (1 or 2 locations), staging (1) and dev (1);
                prod holds ~60 % of an app's workloads, staging ~15 %, dev ~25 %
    roles       per app, one of three templates:
                  web  : lb → web → app → db (+ cache)        internet or corp VPN → lb
                  api  : lb → api → app → db, app → queue      partners or corp VPN → lb
                  batch: batch → queue, batch → db, worker → queue
    core        app=core, env=shared, per location (see :func:`core_counts`): everyone → dns 3,
                ntp 2, ldap 3, syslog 2+, mirror 2, config 2+; monitoring 2+, backup 1+ and
                scanner 1 → everyone (pools marked + grow with N); 2 admin jumpboxes (app=admin)
                inside the fail-safe admin range, ssh to everything but admin
    cross-app   each web/api app's lb is consumed by the app/batch tier of 0–3 other apps
                (``extra_scope: true``, ``same: [env]``: prod calls prod, dev calls dev)
    egress      some apps call the internet (tcp/443) or partners' SFTP through IP lists
    boundaries  override-deny ``env in {@non-prod}`` → ``env == prod`` (every service);
                a plain deny lb → data tier
    modes       ~10 % of apps observe in dev; one app idle in staging; one staged ruleset
    IPs         each app group gets whole /24s (10.16.0.0 upwards), members laid out contiguously
                role by role; location ``euw1`` is dual-stack (``fd00:<subnet>::<host>``)

Rule count scales with apps (~6 compiled rules per app plus 14 shared): ~1,000 at N = 10,000.
Everything is drawn from one :class:`random.Random` seeded by ``seed``: the same arguments give
the same policy text and the same inventory, byte for byte.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass, field
from typing import Any

import yaml

from ringfence.model import DEFAULT_KEY_PREFIX, Workload

ENVS = ("prod", "staging", "dev")
LOCS = ("use1", "euw1", "apse1")


def label_key(dim: str) -> str:
    """The tag key that carries ``dim`` (the default reserved prefix)."""
    return DEFAULT_KEY_PREFIX + dim


def label_tags(**labels: str) -> dict[str, str]:
    return {label_key(d): v for d, v in labels.items()}


DUAL_STACK_LOCS = frozenset({"euw1"})
# core role → (consumers reach it: "in", or it reaches every workload: "out"; services; base count per location)
CORE: dict[str, tuple[str, tuple[str, ...], int]] = {
    "dns": ("in", ("dns",), 3),
    "ntp": ("in", ("ntp",), 2),
    "ldap": ("in", ("ldap",), 3),
    "syslog": ("in", ("syslog",), 2),
    "mirror": ("in", ("https", "http"), 2),
    "config": ("in", ("puppet",), 2),
    "monitoring": ("out", ("node-exporter", "ping"), 2),
    "backup": ("out", ("backup-agent",), 1),
    "scanner": ("out", ("scan",), 1),
}
CORE_ROLES = tuple(CORE)


def core_counts(workloads: int) -> dict[str, int]:
    """Shared-service pool sizes per location: fixed bases; collectors and backup servers scale with N."""
    out = {role: base for role, (_, _, base) in CORE.items()}
    out["syslog"] += workloads // 5000
    out["monitoring"] += workloads // 5000
    out["config"] += workloads // 5000
    out["backup"] += workloads // 1500
    return out


# role → relative weight inside an app group, in address-layout order
TEMPLATES: dict[str, tuple[tuple[str, int], ...]] = {
    "web": (("lb", 1), ("web", 4), ("app", 4), ("db", 2), ("cache", 1)),
    "api": (("lb", 1), ("api", 3), ("app", 4), ("db", 2), ("queue", 1)),
    "batch": (("batch", 4), ("worker", 4), ("queue", 1), ("db", 2)),
}
ROLES = sorted({r for t in TEMPLATES.values() for r, _ in t} | set(CORE_ROLES) | {"jumpbox"})
DB_SERVICES = ("postgres", "mysql", "mssql")


@dataclass(slots=True)
class Estate:
    """A generated policy (file name → YAML text) and its inventory."""

    policy_texts: dict[str, str]
    workloads: list[Workload]
    apps: list[str] = field(default_factory=list)
    seed: int = 1


@dataclass(slots=True)
class _App:
    name: str
    template: str
    deployments: list[tuple[str, str]]  # (env, loc)
    size: int = 0


def default_apps(workloads: int) -> int:
    return max(3, round(workloads / 60))


def generate(workloads: int, seed: int = 1, apps: int | None = None) -> Estate:
    """An estate of about ``workloads`` workloads (exactly that many when N ≥ 100)."""
    rng = random.Random(seed)  # noqa: S311 - reproducible synthetic data, not security
    n_apps = apps if apps is not None else default_apps(workloads)
    app_list = _apps(rng, n_apps)
    pools = core_counts(workloads)
    core_count = len(LOCS) * sum(pools.values()) + 2
    _sizes(rng, app_list, max(workloads - core_count, len(app_list)))
    texts = {
        "labels.yaml": _dump(_labels_section(rng, app_list)),
        "services.yaml": _dump(_services_section()),
        "core-services.yaml": _dump(_core_section()),
        "boundaries.yaml": _dump(_boundaries_section()),
        "apps.yaml": _dump(_apps_section(rng, app_list)),
    }
    return Estate(texts, _inventory(rng, app_list, pools), [a.name for a in app_list], seed)


# --- policy ------------------------------------------------------------------------------------


def _dump(doc: dict[str, Any]) -> str:
    return str(yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=120))


def _apps(rng: random.Random, n: int) -> list[_App]:
    out = []
    for i in range(n):
        template = rng.choices(("web", "api", "batch"), weights=(5, 3, 2))[0]
        prod_locs = rng.sample(LOCS, rng.choice((1, 1, 2)))
        deployments = [("prod", loc) for loc in sorted(prod_locs)]
        deployments.append(("staging", rng.choice(LOCS)))
        deployments.append(("dev", rng.choice(LOCS)))
        out.append(_App(f"app{i:04d}", template, deployments))
    return out


def _sizes(rng: random.Random, apps: list[_App], total: int) -> None:
    weights = [rng.lognormvariate(0, 0.8) for _ in apps]
    scale = total / sum(weights)
    sizes = [max(1, int(w * scale)) for w in weights]
    i = 0
    while sum(sizes) < total:  # hand out the rounding remainder
        sizes[i % len(sizes)] += 1
        i += 1
    while sum(sizes) > total:
        j = max(range(len(sizes)), key=lambda k: sizes[k])
        sizes[j] -= 1
    for app, size in zip(apps, sizes, strict=True):
        app.size = size


def _labels_section(rng: random.Random, apps: list[_App]) -> dict[str, Any]:
    observe = sorted(a.name for a in rng.sample(apps, max(1, len(apps) // 10)))
    idle = rng.choice(apps).name
    return {
        "labels": {
            "dimensions": {
                "role": {"required": True, "allowed": ROLES},
                "app": {"required": True},
                "env": {"required": True, "allowed": [*ENVS, "shared"]},
                "loc": {"allowed": list(LOCS)},
            }
        },
        "defaults": {
            "mode": "enforce",
            "unlabeled_mode": "enforce",
            "failsafes": {
                "admin_cidrs": ["10.99.0.0/24"],
                "admin_ports": ["tcp/22", "tcp/3389"],
                "dns_resolvers": [],
                "control_plane": [],
            },
        },
        "modes": [
            {"selector": f"env == dev && app in {{{', '.join(observe)}}}", "mode": "observe"},
            {"selector": f"env == staging && app == {idle}", "mode": "idle"},
        ],
        "label_groups": [
            {"name": "non-prod", "dimension": "env", "values": ["dev", "staging"]},
            {"name": "data-tier", "dimension": "role", "values": ["db", "cache", "queue"]},
        ],
    }


def _services_section() -> dict[str, Any]:
    return {
        "services": [
            {"name": "https", "ports": ["tcp/443"]},
            {"name": "http", "ports": ["tcp/80"]},
            {"name": "puppet", "ports": ["tcp/8140"]},
            {"name": "backup-agent", "ports": ["tcp/10000"]},
            {"name": "scan", "ports": ["tcp/1-65535", "icmp/8"]},
            {"name": "http-alt", "ports": ["tcp/8080"]},
            {"name": "app-api", "ports": ["tcp/8443", "tcp/9000-9010"]},
            {"name": "postgres", "ports": ["tcp/5432"]},
            {"name": "mysql", "ports": ["tcp/3306"]},
            {"name": "mssql", "ports": ["tcp/1433"]},
            {"name": "redis", "ports": ["tcp/6379"]},
            {"name": "amqp", "ports": ["tcp/5672", "tcp/5671"]},
            {"name": "sftp", "ports": ["tcp/22"]},
            {"name": "dns", "ports": ["udp/53", "tcp/53"]},
            {"name": "ntp", "ports": ["udp/123"]},
            {"name": "ldap", "ports": ["tcp/389", "tcp/636", "tcp/88", "udp/88"]},
            {"name": "syslog", "ports": ["udp/514", "tcp/6514"]},
            {"name": "node-exporter", "ports": ["tcp/9100"]},
            {"name": "ping", "ports": ["icmp/8"]},
            {"name": "ssh", "ports": ["tcp/22"]},
        ],
        "ip_lists": [
            {
                "name": "internet",
                "cidrs": ["0.0.0.0/0", "::/0"],
                "exclude": ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"],
            },
            {"name": "corp-vpn", "cidrs": ["172.20.0.0/16"], "exclude": ["172.20.255.0/24"]},
            {"name": "partners", "cidrs": ["198.51.100.0/24", "203.0.113.0/25", "2001:db8:77::/48"]},
        ],
    }


def _core_section() -> dict[str, Any]:
    return {
        "rulesets": [
            {
                "name": "core-services",
                "scope": "all()",
                "same": [],
                "rules": [
                    (
                        {"name": role, "from": "all()", "to": f"app == core && role == {role}", "services": list(svcs)}
                        if way == "in"
                        else {
                            "name": role,
                            "from": f"app == core && role == {role}",
                            "to": "all()",
                            "services": list(svcs),
                        }
                    )
                    for role, (way, svcs, _) in CORE.items()
                ]
                + [
                    {
                        "name": "jumpbox-ssh",
                        "from": "app == admin && role == jumpbox",
                        "to": "app != admin",
                        "services": ["ssh"],
                    },
                ],
            },
        ]
    }


def _boundaries_section() -> dict[str, Any]:
    return {
        "rulesets": [
            {
                "name": "boundaries",
                "scope": "all()",
                "same": [],
                "rules": [
                    {
                        "name": "non-prod-never-reaches-prod",
                        "from": "env in {@non-prod}",
                        "to": "env == prod",
                        "services": ["all"],
                        "action": "override-deny",
                    },
                    {
                        "name": "lb-not-to-data",
                        "from": "role == lb",
                        "to": "role in {@data-tier}",
                        "services": ["all"],
                        "action": "deny",
                    },
                ],
            },
            {
                "name": "cache-trial",
                "scope": "has(app) && env == prod",
                "staged": True,
                "rules": [
                    {"name": "web-to-cache", "from": "role == web", "to": "role == cache", "services": ["redis"]}
                ],
            },
        ]
    }


def _apps_section(rng: random.Random, apps: list[_App]) -> dict[str, Any]:
    lb_apps = [a for a in apps if a.template in ("web", "api")]
    rulesets = []
    for app in apps:
        db = rng.choice(DB_SERVICES)
        rules: list[dict[str, Any]] = []
        if app.template == "web":
            front = rng.choice(("internet", "corp-vpn"))
            rules += [
                {"name": "front-to-lb", "from": {"ip_list": front}, "to": "role == lb", "services": ["https"]},
                {"name": "lb-to-web", "from": "role == lb", "to": "role == web", "services": ["http-alt"]},
                {"name": "web-to-app", "from": "role == web", "to": "role == app", "services": ["app-api"]},
                {"name": "app-to-db", "from": "role == app", "to": "role == db", "services": [db]},
                {"name": "app-to-cache", "from": "role in {web, app}", "to": "role == cache", "services": ["redis"]},
            ]
        elif app.template == "api":
            fronts: list[dict[str, str]] = [{"ip_list": "corp-vpn"}]
            if rng.random() < 0.5:
                fronts.append({"ip_list": "partners"})
            rules += [
                {"name": "front-to-lb", "from": fronts, "to": "role == lb", "services": ["https"]},
                {"name": "lb-to-api", "from": "role == lb", "to": "role == api", "services": ["http-alt"]},
                {"name": "api-to-app", "from": "role == api", "to": "role == app", "services": ["app-api"]},
                {"name": "app-to-db", "from": "role == app", "to": "role == db", "services": [db]},
                {"name": "app-to-queue", "from": "role == app", "to": "role == queue", "services": ["amqp"]},
            ]
        else:
            rules += [
                {
                    "name": "batch-to-queue",
                    "from": "role in {batch, worker}",
                    "to": "role == queue",
                    "services": ["amqp"],
                },
                {"name": "batch-to-db", "from": "role == batch", "to": "role == db", "services": [db]},
            ]
            if rng.random() < 0.5:
                rules.append(
                    {"name": "sftp-out", "from": "role == batch", "to": {"ip_list": "partners"}, "services": ["sftp"]}
                )
        if app.template != "batch" and rng.random() < 0.2:
            rules.append(
                {"name": "internet-out", "from": "role == app", "to": {"ip_list": "internet"}, "services": ["https"]}
            )
        # cross-app: other apps' app/batch tiers consume this app's internal lb, env to env
        if app in lb_apps:
            candidates = [a for a in apps if a is not app]
            consumers = rng.sample(candidates, min(len(candidates), rng.choice((0, 1, 2, 3))))
            for c in sorted(consumers, key=lambda a: a.name):
                tier = "batch" if c.template == "batch" else "app"
                rules.append(
                    {
                        "name": f"from-{c.name}",
                        "from": f"app == {c.name} && role == {tier}",
                        "to": "role == lb",
                        "services": ["https"],
                        "extra_scope": True,
                        "same": ["env"],
                    }
                )
        rulesets.append({"name": app.name, "scope": f"app == {app.name}", "rules": rules})
    return {"rulesets": rulesets}


# --- inventory ---------------------------------------------------------------------------------


class _Subnets:
    """Hands out whole /24s from 10.16.0.0 upwards; one app group's members stay contiguous."""

    def __init__(self) -> None:
        self.next = 0

    def take(self, hosts: int) -> list[int]:
        """Subnet indexes covering ``hosts`` addresses (250 usable per /24, from .4)."""
        count = max(1, -(-hosts // 250))
        out = list(range(self.next, self.next + count))
        self.next += count
        return out


def subnet_v4(index: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(int(ipaddress.IPv4Address("10.16.0.0")) + index * 256)


def address_of(index: int, host: int, v6: bool) -> str:
    if v6:
        return str(ipaddress.IPv6Address(f"fd00:{index:x}::") + host)
    return str(subnet_v4(index) + host)


def _inventory(rng: random.Random, apps: list[_App], pools: dict[str, int]) -> list[Workload]:
    out: list[Workload] = []
    for li, loc in enumerate(LOCS):
        host = 10
        for role in CORE_ROLES:
            for k in range(pools[role]):
                ips = [f"10.0.{li}.{host}"]
                if loc in DUAL_STACK_LOCS:
                    ips.append(f"fd00:0:{li}::{host:x}")
                host += 1
                tags = label_tags(role=role, app="core", env="shared", loc=loc)
                out.append(Workload(id=f"core-{loc}-{role}-{k + 1}", ips=ips, tags=tags))
    for k in range(2):
        tags = label_tags(role="jumpbox", app="admin", env="shared", loc=LOCS[0])
        out.append(Workload(id=f"admin-jump-{k + 1}", ips=[f"10.99.0.{5 + k}"], tags=tags))
    subnets = _Subnets()
    shares = {"prod": 0.6, "staging": 0.15, "dev": 0.25}
    for app in apps:
        prod_n = sum(1 for e, _ in app.deployments if e == "prod")
        raw = [shares[e] / (prod_n if e == "prod" else 1) for e, _ in app.deployments]
        sizes = [max(1, round(app.size * r / sum(raw))) for r in raw]
        sizes[0] += app.size - sum(sizes)  # prod absorbs rounding
        for (env, loc), size in zip(app.deployments, sizes, strict=True):
            if size <= 0:
                continue
            roles = _role_counts(rng, TEMPLATES[app.template], size)
            indexes = subnets.take(size)
            pos = 0
            for role, count in roles:
                for k in range(count):
                    index, host = indexes[pos // 250], 4 + pos % 250
                    pos += 1
                    ips = [address_of(index, host, False)]
                    if loc in DUAL_STACK_LOCS:
                        ips.append(address_of(index, host, True))
                    tags = label_tags(role=role, app=app.name, env=env, loc=loc)
                    out.append(Workload(id=f"{app.name}-{env}-{loc}-{role}-{k + 1}", ips=ips, tags=tags))
    return out


def _role_counts(rng: random.Random, template: tuple[tuple[str, int], ...], size: int) -> list[tuple[str, int]]:
    """Split ``size`` over the template's roles by weight; every role gets one before any gets two."""
    total = sum(w for _, w in template)
    counts = [size * w // total for _, w in template]
    order = sorted(range(len(template)), key=lambda i: (counts[i], -template[i][1], rng.random()))
    i = 0
    while sum(counts) < size:
        counts[order[i % len(order)]] += 1
        i += 1
    return [(role, c) for (role, _), c in zip(template, counts, strict=True)]
