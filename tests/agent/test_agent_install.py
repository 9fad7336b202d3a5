"""The whole agent/packaging/install.sh and the documented bootstrap (agent/packaging/cloud-init.yaml)
run as root in a sandbox (tests/installsandbox.py: private mount and network namespace, /etc,
/opt, /var/lib and /root on tmpfs overlays, systemctl a shim): the installer is pinned like the
wheel, published names never change their bytes, an upgrade restarts the agent, the signing key
is pinned on first use only and never left truncated, and each missing prerequisite is installed."""

from __future__ import annotations

import hashlib
import json
import shlex
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ringfence import cli
from tests import installsandbox
from tests.agent.test_agent_artifact import INSTALLER, ROOT, install

CLOUD_INIT = ROOT / "agent" / "packaging" / "cloud-init.yaml"


def public_pem(path: Path) -> Path:
    key = Ed25519PrivateKey.generate().public_key()
    path.write_bytes(key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


def published_installer(objects: Path) -> Path:
    """The installer publish-agent stored (whatever its name)."""
    (script,) = (objects / "agent").glob("install*.sh")
    return script


# a driver run inside the sandbox: `ringfence serve` (the real agent API) over lab TLS on the
# sandbox's loopback, and the documented bootstrap against it, placeholders filled in
SERVE_AND_BOOTSTRAP = """
import subprocess, sys
from ringfence import serve
from ringfence.local.wiring import LocalWiring
db, cert, key, script = sys.argv[1:]
with LocalWiring(__import__("pathlib").Path(db)) as w, serve.serving(
    serve.ServeApp.over(w, None), tls_cert=cert, tls_key=key
) as running:
    text = open(script).read().replace("https://rf.example.com", running.url)
    rc = subprocess.run(["sh", "-c", text]).returncode
print("bootstrap rc", rc, flush=True)
"""


def bootstrap(installer: Path, wheel: str, digest: str, pem: Path) -> str:
    """cloud-init.yaml's runcmd as cloud-init runs it (one sh script), for this publish."""
    runcmd = yaml.safe_load(CLOUD_INIT.read_text())["runcmd"]
    text = "\n".join(runcmd) + "\n"
    script_digest = hashlib.sha256(installer.read_bytes()).hexdigest()
    for placeholder, value in (
        ("install-REPLACE-16-HEX.sh", installer.name),
        ("REPLACE-WITH-THE-INSTALLER-64-HEX-DIGEST", script_digest),
        ("ringfence_agent-REPLACE-VERSION-py3-none-any.whl", wheel),
        ("REPLACE-WITH-THE-64-HEX-DIGEST", digest),
        ("--public-key-url https://keys.example.com/rf-signing.pub.pem", f"--public-key-file {pem}"),
    ):
        text = text.replace(placeholder, value)
    return text


@pytest.mark.slow
def test_attack_tampered_installer_in_the_published_objects_is_refused_by_the_documented_bootstrap(
    artifact: tuple[Path, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Whoever can write the store (the bucket, or `serve --user`'s objects directory) replaces the
    installer hosts run as root: with the wheel's digest right, the user data must still refuse
    it, before it runs."""
    from ringfence.local.tls import lab_tls

    installsandbox.available()
    wheel, digest = artifact
    db = tmp_path / "rf" / "state.db"
    assert cli.main(["publish-agent", "--dir", str(wheel.parent), "--store", f"sqlite:{db}"]) == 0
    out = capsys.readouterr().out
    script = published_installer(db.parent / "objects")
    pem = public_pem(tmp_path / "signing.pub.pem")
    tls = lab_tls(tmp_path / "tls", "127.0.0.1")
    boot = tmp_path / "bootstrap.sh"
    boot.write_text(bootstrap(script, wheel.name, digest, pem))
    driver = tmp_path / "driver.py"
    driver.write_text(SERVE_AND_BOOTSTRAP)
    run = (
        f"{shlex.quote(sys.executable)} {driver} {db} {tls.cert} {tls.key} {boot}; "
        "test -f /etc/ringfence/agent.json && echo INSTALLED; exit 0"
    )
    env = {"CURL_CA_BUNDLE": str(tls.ca)}
    # the untampered publish installs (the check is not what refuses)
    ok = installsandbox.run(run, tmp_path / "sb-ok", env=env)
    assert "bootstrap rc 0" in ok.stdout and "INSTALLED" in ok.stdout, ok.stdout + ok.stderr
    # the attack: the stored installer gains a payload; the wheel and its digest stay right
    marker = tmp_path / "payload-ran-as-root"
    script.write_text(f"#!/bin/sh\ntouch {marker}\n" + script.read_text())
    bad = installsandbox.run(run, tmp_path / "sb-bad", env=env)
    assert not marker.exists(), "the tampered installer ran as root"
    assert "bootstrap rc 0" not in bad.stdout and "INSTALLED" not in bad.stdout, bad.stdout + bad.stderr
    assert "installer sha256 " in out and "sha256sum -c" in out  # publish-agent prints what to pin


def changed_agent(tmp_path: Path) -> Path:
    """A build of the agent with one line changed (a copy of the source with the real build script)."""
    src = tmp_path / "src"
    (src / "agent").mkdir(parents=True)
    subprocess.run(["cp", "-r", str(ROOT / "agent/ringfence_agent"), str(src / "agent/")], check=True)
    subprocess.run(["cp", "-r", str(ROOT / "agent/packaging"), str(src / "agent/")], check=True)
    (src / "layers/core").mkdir(parents=True)
    subprocess.run(["cp", "-r", str(ROOT / "layers/core/ringfence"), str(src / "layers/core/")], check=True)
    daemon = src / "agent/ringfence_agent/daemon.py"
    daemon.write_text(daemon.read_text() + "\n# release N+1\n")
    out = tmp_path / "build2"
    subprocess.run([sys.executable, str(src / "agent/packaging/build_artifact.py"), str(out)], check=True)
    return out


@pytest.mark.slow
def test_attack_republishing_a_changed_agent_leaves_hosts_pinned_to_the_first_build_installing_it(
    artifact: tuple[Path, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Publish, change the agent, publish again (what deploy-aws.md says to do after each deploy):
    a launch template pinned to the first digest must still install the first wheel, over the real
    agent API, not be refused (no agent, no firewall). Other bytes under a published name are refused."""
    import httpx

    from ringfence import serve
    from ringfence.local.tls import lab_tls
    from ringfence.local.wiring import LocalWiring

    wheel, digest = artifact
    db = tmp_path / "rf" / "state.db"
    assert cli.main(["publish-agent", "--dir", str(wheel.parent), "--store", f"sqlite:{db}"]) == 0
    second = changed_agent(tmp_path)
    (wheel2,) = second.glob("*.whl")
    assert cli.main(["publish-agent", "--dir", str(second), "--store", f"sqlite:{db}"]) == 0
    out = capsys.readouterr().out
    digest2 = (second / f"{wheel2.name}.sha256").read_text().split()[0]
    tls = lab_tls(tmp_path / "tls", "127.0.0.1")
    with (
        LocalWiring(db) as w,
        serve.serving(serve.ServeApp.over(w, None), tls_cert=str(tls.cert), tls_key=str(tls.key)) as running,
    ):
        client = httpx.Client(base_url=running.url, verify=ssl.create_default_context(cafile=str(tls.ca)))
        assert hashlib.sha256(client.get(f"/v1/agent/{wheel2.name}").content).hexdigest() == digest2
        # the host pinned to the first build: the installer's own download, over TLS
        monkeypatch.setenv("CURL_CA_BUNDLE", str(tls.ca))
        got = install(tmp_path / "host", ARTIFACT_URL=f"{running.url}/v1/agent/{wheel.name}", ARTIFACT_SHA256=digest)
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "host/venv/bin/ringfence-agent").exists()
    assert digest2 != digest and wheel2.name != wheel.name and f"sha256 {digest2}" in out
    # other bytes under the first wheel's name: refused, the first bytes kept
    forged = tmp_path / "forged"
    forged.mkdir()
    (forged / wheel.name).write_bytes(wheel2.read_bytes())
    assert cli.main(["publish-agent", "--dir", str(forged), "--store", f"sqlite:{db}"]) != 0
    assert "already published with other bytes" in capsys.readouterr().err
    assert hashlib.sha256((db.parent / "objects/agent" / wheel.name).read_bytes()).hexdigest() == digest


INSTALL = (
    "sh {installer} --source /tmp/none --workload-id wl-1 --artifact-file {wheel} --artifact-sha256 {digest} {key}"
)


# the systemctl shim: while the old agent (root's) runs, it writes its status as root at any
# moment (here: each systemctl call) until stopped, as it writes: a new file renamed over; at the restart, what in the state directory
# is not the agent user's is written to {out}
OLD_ROOT_AGENT = r"""
if [ -e "$RF_SB/old-agent-running" ]; then
  case "$1" in
    stop|restart) rm -f "$RF_SB/old-agent-running" ;;
    *) (umask 077; cd /var/lib/ringfence-agent && echo '{{}}' > .status.json.tmp && mv -f .status.json.tmp status.json) ;;
  esac
fi
if [ "$1" = restart ]; then
  find /var/lib/ringfence-agent \( ! -user ringfence-agent -o ! -group ringfence-agent \) -printf '%u:%g %p\n' > {out}
fi
"""


def test_attack_an_upgrade_from_a_root_agent_leaves_nothing_in_its_state_the_new_agent_cannot_read(
    artifact: tuple[Path, str],
    tmp_path: Path,
) -> None:
    """Review unit3 R3: install.sh chowned the state directory while the old root agent still ran
    and restarted it only at its end; what the old agent wrote in between was root's 0600 again,
    and systemd's StateDirectory= chown skips a directory whose top is already the user's: the new
    agent, its own user, could not read it. At the restart, all of it is the agent user's."""
    wheel, digest = artifact
    pem = public_pem(tmp_path / "k.pem")
    out = tmp_path / "not-the-agents-at-restart"
    install = INSTALL.format(installer=INSTALLER, wheel=wheel, digest=digest, key=f"--public-key-file {pem}")
    script = (
        # what the old root agent left: its last known good, status, a set-aside bundle
        "mkdir -p -m 0700 /var/lib/ringfence-agent/rejected && cd /var/lib/ringfence-agent && "
        "(umask 077; echo '{}' > bundle.json; echo '{}' > status.json; echo x > seal.key; "
        'echo x > rejected/20260101T000000Z-1-bundle.json) && touch "$RF_SB/old-agent-running" && '
        f"{install} >/dev/null"
    )
    done = installsandbox.run(script, tmp_path / "sb", systemctl=OLD_ROOT_AGENT.format(out=out))
    assert done.returncode == 0, done.stderr
    assert "systemctl restart ringfence-agent.service" in installsandbox.asked(tmp_path / "sb")
    assert out.exists(), "the systemctl shim did not run at the restart"
    assert out.read_text() == "", out.read_text()


KEY_SERVER = """
import http.server, ssl, sys
directory, cert, key = sys.argv[1:]
class H(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *a, **k):
        super().__init__(*a, directory=directory, **k)
    def log_message(self, *a):
        pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 8443), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print("up", flush=True)
srv.serve_forever()
"""


@pytest.mark.slow
def test_attack_public_key_url_neither_repins_another_key_nor_leaves_a_truncated_one(
    artifact: tuple[Path, str],
    tmp_path: Path,
) -> None:
    """Whoever serves the --public-key-url later (or cuts the transfer) must not change the key a
    host pinned at its first install: another key is refused, a cut one is refused, and the pin
    stays the first key, whole. A refused key is refused before anything is installed: the agent
    installed stays as it was (no new code under a running agent that was not restarted)."""
    from ringfence.local.tls import lab_tls

    wheel, digest = artifact
    tls = lab_tls(tmp_path / "tls", "127.0.0.1")
    served = tmp_path / "served"
    served.mkdir()
    good = public_pem(tmp_path / "good.pem").read_bytes()
    evil = public_pem(tmp_path / "evil.pem").read_bytes()
    (served / "k.pem").write_bytes(good)
    (tmp_path / "ks.py").write_text(KEY_SERVER)
    run = INSTALL.format(
        installer=INSTALLER, wheel=wheel, digest=digest, key="--public-key-url https://127.0.0.1:8443/k.pem"
    )
    pin = "/etc/ringfence/signing-key.pem"
    mark = tmp_path / "first-install-done"
    # what was written since the first install
    written = f"{{ find /opt/ringfence-agent /etc/ringfence ! -type d -newer {mark} || echo find failed; }}"
    script = f"""
{shlex.quote(sys.executable)} {tmp_path / "ks.py"} {served} {tls.cert} {tls.key} >/dev/null 2>&1 &
KS=$!
for i in $(seq 50); do curl -fsS -o /dev/null https://127.0.0.1:8443/k.pem 2>/dev/null && break; sleep 0.1; done
{run} >/dev/null 2>&1; echo "first rc=$?"; cp {pin} {tmp_path / "pin1"}; touch {mark}
cp {tmp_path / "evil.pem"} {served / "k.pem"}
{run} >/dev/null 2>{tmp_path / "err2"}; echo "other rc=$?"; cp {pin} {tmp_path / "pin2"}
{written} > {tmp_path / "written2"}
head -c 40 {tmp_path / "good.pem"} > {served / "k.pem"}
rm -f {pin}
{run} >/dev/null 2>{tmp_path / "err3"}; echo "cut rc=$?"; cp {pin} {tmp_path / "pin3"} 2>/dev/null || echo "no pin"
{written} > {tmp_path / "written3"}
kill $KS
"""
    done = installsandbox.run(script, tmp_path / "sb", env={"CURL_CA_BUNDLE": str(tls.ca)})
    lines = done.stdout.splitlines()
    assert "first rc=0" in lines and (tmp_path / "pin1").read_bytes() == good, done.stdout + done.stderr
    assert "other rc=0" not in lines and (tmp_path / "pin2").read_bytes() == good, done.stdout
    assert "refused" in (tmp_path / "err2").read_text()
    assert (tmp_path / "written2").read_text() == "", "the refused run installed over the agent"
    assert evil != good
    # a cut download on a host with no pin yet: refused, never pinned half a key
    assert "cut rc=0" not in lines and "no pin" in lines, done.stdout
    assert "not a PEM Ed25519 public key" in (tmp_path / "err3").read_text()
    assert (tmp_path / "written3").read_text() == "", "the refused run installed over the agent"


@pytest.mark.slow
def test_installer_installs_each_missing_prerequisite(artifact: tuple[Path, str], tmp_path: Path) -> None:
    """A stock Debian image: nft installed, the venv module (python3-venv) not. The installer must
    install what is missing though nft is there (apt-get is a shim here that 'installs' it by
    revealing the module again)."""
    import ensurepip
    import shutil

    if shutil.which("nft") is None:
        pytest.skip("nft is not installed here")
    wheel, digest = artifact
    pem = public_pem(tmp_path / "k.pem")
    hidden = Path(ensurepip.__file__).parent
    run = INSTALL.format(installer=INSTALLER, wheel=wheel, digest=digest, key=f"--public-key-file {pem}")
    script = f"mount -t tmpfs tmpfs {hidden} && {run} >/dev/null && test -x /opt/ringfence-agent/bin/ringfence-agent"
    done = installsandbox.run(script, tmp_path / "sb", apt_get=f"umount {hidden} 2>/dev/null || true")
    assert done.returncode == 0, done.stderr
    asked = installsandbox.asked(tmp_path / "sb")
    installs = [a for a in asked if a.startswith("apt-get install")]
    assert len(installs) == 1 and "python3-venv" in installs[0].split(), asked
    assert "nftables" not in installs[0].split()


@pytest.mark.slow
def test_an_upgrade_restarts_the_agent_keeps_the_options_not_given_again_and_status_names_the_build(
    artifact: tuple[Path, str], tmp_path: Path
) -> None:
    """Re-running install.sh is the upgrade (one install, then upgrades, for every claim here).
    It must restart the unit (enable --now is a no-op on a running one), after a daemon-reload (the
    unit file may have changed too). Review r6-store finding 3: the documented upgrade re-runs the
    installer with the new artifact and digest only. It must not move the host to another workload
    id (the hostname), drop its admin CIDRs (admins lose SSH) or switch a paired host to aws-iid;
    options given again still win. Then ``ringfence-agent status`` names the build installed."""
    wheel, digest = artifact
    pem = public_pem(tmp_path / "k.pem")
    (tmp_path / "pk").write_text("pairing-key-abc\n")
    art = f"--artifact-file {wheel} --artifact-sha256 {digest}"
    first = (
        f"sh {INSTALLER} --api-url https://rf.example.com --pairing-key-file {tmp_path / 'pk'} "
        f"--workload-id dc1-web-1 --admin-cidr 10.9.0.0/24 --admin-cidr 10.9.1.0/24 {art} --public-key-file {pem}"
    )
    conf, log = "/etc/ringfence/agent.json", tmp_path / "sb" / "log"
    script = (
        f"{first} >/dev/null || exit 10; cp {conf} {tmp_path / 'c1'}; : > {log}; "
        f"sh {INSTALLER} {art} >/dev/null || exit 11; cp {conf} {tmp_path / 'c2'}; cp {log} {tmp_path / 'asked'}; "
        f"sh {INSTALLER} --admin-cidr 10.8.0.0/24 {art} >/dev/null || exit 12; cp {conf} {tmp_path / 'c3'}; "
        "/opt/ringfence-agent/bin/ringfence-agent status --json --backend dry-run --state-dir /var/lib/ringfence-agent"
    )
    done = installsandbox.run(script, tmp_path / "sb")
    assert done.returncode == 0, done.stderr
    asked = (tmp_path / "asked").read_text().splitlines()  # what the first upgrade asked
    assert asked == [
        "systemctl daemon-reload",
        "systemctl stop ringfence-agent.service",
        "systemctl enable ringfence-agent.service",
        "systemctl restart ringfence-agent.service",
    ], asked
    version = json.loads(done.stdout)["agent_version"]
    assert version is not None and wheel.name == f"ringfence_agent-{version}-py3-none-any.whl"
    before = json.loads((tmp_path / "c1").read_text())
    assert before["workload_id"] == "dc1-web-1" and before["enroll"]["method"] == "pairing"
    assert json.loads((tmp_path / "c2").read_text()) == before
    given = json.loads((tmp_path / "c3").read_text())
    assert given == {**before, "admin_cidrs": ["10.8.0.0/24"]}
