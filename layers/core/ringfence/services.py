"""Service port specifications: ``tcp/443``, ``udp/53``, ``tcp/8000-8080``, ``icmp``, ``icmp/8``, ``any``."""

from __future__ import annotations

from dataclasses import dataclass

PROTOCOLS = ("tcp", "udp", "icmp", "icmpv6", "any")
_PORTED = ("tcp", "udp")


class PortSpecError(ValueError):
    pass


@dataclass(frozen=True, slots=True, order=True)
class PortRange:
    """One protocol and an inclusive range of ports (tcp/udp) or ICMP types."""

    proto: str
    lo: int = 0
    hi: int = 65535

    def matches(self, proto: str, port: int | None) -> bool:
        if self.proto != "any" and self.proto != proto:
            return False
        if self.proto == "any" or port is None:
            return self.proto == "any" or self.is_whole()
        return self.lo <= port <= self.hi

    def is_whole(self) -> bool:
        if self.proto in _PORTED:
            return (self.lo, self.hi) == (0, 65535)
        return (self.lo, self.hi) == (0, 255) or self.proto == "any"

    def __str__(self) -> str:
        if self.proto == "any":
            return "any"
        if self.is_whole():
            return self.proto
        return f"{self.proto}/{self.lo}" if self.lo == self.hi else f"{self.proto}/{self.lo}-{self.hi}"

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"proto": self.proto}
        if self.proto in _PORTED and not self.is_whole():
            out["ports"] = [self.lo, self.hi]
        elif self.proto in ("icmp", "icmpv6") and not self.is_whole():
            out["icmp_type"] = self.lo
        return out


def looks_like_spec(text: str) -> bool:
    head = text.split("/", 1)[0].strip().lower()
    return head in PROTOCOLS


def parse_port_spec(text: str) -> PortRange:
    """Parse one spec; raises :class:`PortSpecError` naming what is wrong."""
    raw = text.strip().lower()
    proto, _, rest = raw.partition("/")
    if proto not in PROTOCOLS:
        raise PortSpecError(f"unknown protocol {proto!r} in {text!r} (use one of {', '.join(PROTOCOLS)})")
    if proto == "any":
        if rest:
            raise PortSpecError(f"'any' takes no port ({text!r})")
        return PortRange("any", 0, 65535)
    limit = 65535 if proto in _PORTED else 255
    if not rest:
        return PortRange(proto, 0, limit)
    lo_s, _, hi_s = rest.partition("-")
    try:
        lo = int(lo_s)
        hi = int(hi_s) if hi_s else lo
    except ValueError:
        raise PortSpecError(f"port must be a number or a range like 8000-8080 in {text!r}") from None
    if proto in _PORTED and not (1 <= lo <= hi <= limit):
        raise PortSpecError(f"port range {lo}-{hi} out of 1-{limit} in {text!r}")
    if proto not in _PORTED and (lo != hi or not 0 <= lo <= limit):
        raise PortSpecError(f"ICMP type must be one number 0-{limit} in {text!r}")
    return PortRange(proto, lo, hi)


def parse_flow_port(text: str) -> tuple[str, int | None]:
    """A flow's ``proto/port`` (one port, or an ICMP type; ``icmp`` alone means any type)."""
    spec = parse_port_spec(text)
    if spec.proto == "any":
        raise PortSpecError(f"a flow needs a concrete protocol, not {text!r}")
    if spec.is_whole():
        if spec.proto in _PORTED:
            raise PortSpecError(f"a flow needs one port, e.g. {spec.proto}/443 (got {text!r})")
        return spec.proto, None
    if spec.lo != spec.hi:
        raise PortSpecError(f"a flow needs one port, not a range ({text!r})")
    return spec.proto, spec.lo
