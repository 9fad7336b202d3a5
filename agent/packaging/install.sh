#!/bin/sh
# Install and start the Ringfence agent. Idempotent; POSIX sh; needs root.
#
#   curl --proto '=https' --tlsv1.2 -fsSL https://<agent-api>/v1/agent/install-<16 hex>.sh -o install.sh
#   echo '<the installer sha256 publish-agent printed>  install.sh' | sha256sum -c --quiet &&
#   sh install.sh --api-url https://rf.example.com --pairing-key-file /run/rf-pairing-key \
#     --artifact-url https://rf.example.com/v1/agent/ringfence_agent-<version>-py3-none-any.whl \
#     --artifact-sha256 <the sha256 `ringfence publish-agent` printed> \
#     --public-key-file /opt/ringfence/signing-key.pub.pem  # baked into the image (or --public-key-url
#                                                          # of a copy you host: no agent-API route serves it)
#
# The agent comes from the artifact the stack publishes (`make agent-artifact`: a wheel of the
# agent alone, no dependencies) and nowhere else: it is refused unless its SHA-256 is the one
# given, and installed with pip --no-index (no package index is ever asked, so no package that
# merely shares our name can be installed as root). Every download is HTTPS only. This script
# runs as root: check it against the digest publish-agent printed before running it (above).
# Re-running it is the upgrade: it restarts the agent (which never flushes the rules on stop).
#
# Options (or the same names as environment variables RF_API_URL, RF_PAIRING_KEY_FILE, ...):
#   --api-url URL           control-plane agent API (enrolls with --pairing-key-file)
#   --source DIR|URL        static source instead of an API
#   --pairing-key-file PATH on-premise pairing key (use limit + expiry set by the operator), read
#                           from the file PATH, or from standard input with `-`; without one, an
#                           --api-url agent enrolls with the EC2 identity document. A key on the
#                           command line (--pairing-key KEY, RF_PAIRING_KEY) is refused: it would
#                           be in `ps` output and shell history.
#   --public-key-file PATH  the pinned bundle signing key (PEM) ...
#   --public-key-url URL    ... or where to fetch it, https:// (pin it in your image instead when you can);
#                           only on first use: a different key already pinned is refused (rotation
#                           goes through signed bundles, docs/bundle.md)
#   --artifact-url URL      the agent wheel, https:// ...
#   --artifact-file PATH    ... or a copy of it already on the host (a golden image build)
#   --artifact-sha256 HEX   its SHA-256 (required): anything else is refused before it is installed
#   --workload-id ID        default: the EC2 instance id from IMDSv2, else the hostname
#   --admin-cidr CIDR       local fail-safe admin range (repeatable)
# On a re-run (an /etc/ringfence/agent.json exists) every option not given keeps the value that
# file has: workload id, --api-url/--source, the enrollment, the admin CIDRs (given ones replace
# them all). Give an option again only to change it.
set -eu
API_URL="${RF_API_URL:-}"; SOURCE="${RF_SOURCE:-}"; PAIRING_KEY_FILE="${RF_PAIRING_KEY_FILE:-}"; PAIRING_KEY=""
PUBKEY_FILE="${RF_PUBLIC_KEY_FILE:-}"; PUBKEY_URL="${RF_PUBLIC_KEY_URL:-}"
WORKLOAD_ID="${RF_WORKLOAD_ID:-}"; ADMIN_CIDRS=""
ARTIFACT_URL="${RF_ARTIFACT_URL:-}"; ARTIFACT_FILE="${RF_ARTIFACT_FILE:-}"; ARTIFACT_SHA256="${RF_ARTIFACT_SHA256:-}"
PREFIX=/opt/ringfence-agent
while [ $# -gt 0 ]; do
  case "$1" in
    --api-url) API_URL="$2"; shift 2 ;;
    --source) SOURCE="$2"; shift 2 ;;
    --pairing-key|--pairing-key=*)
      echo "install.sh: --pairing-key KEY is refused: a key on the command line is visible in ps and shell history; put it in a file only root reads and give --pairing-key-file PATH (or pipe it in with --pairing-key-file -)" >&2
      exit 2 ;;
    --pairing-key-file) PAIRING_KEY_FILE="$2"; shift 2 ;;
    --public-key-file) PUBKEY_FILE="$2"; shift 2 ;;
    --public-key-url) PUBKEY_URL="$2"; shift 2 ;;
    --workload-id) WORKLOAD_ID="$2"; shift 2 ;;
    --admin-cidr) ADMIN_CIDRS="$ADMIN_CIDRS $2"; shift 2 ;;
    --artifact-url) ARTIFACT_URL="$2"; shift 2 ;;
    --artifact-file) ARTIFACT_FILE="$2"; shift 2 ;;
    --artifact-sha256) ARTIFACT_SHA256="$2"; shift 2 ;;
    *) echo "install.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
# --- pairing key: from a file or standard input, never from the command line or environment
if [ -n "${RF_PAIRING_KEY:-}" ]; then
  echo "install.sh: RF_PAIRING_KEY is refused (a key set on the command line lands in shell history): use --pairing-key-file PATH or -" >&2
  exit 2
fi
if [ -n "$PAIRING_KEY_FILE" ]; then
  if [ "$PAIRING_KEY_FILE" = "-" ]; then PAIRING_KEY=$(head -n 1)
  elif [ -r "$PAIRING_KEY_FILE" ]; then PAIRING_KEY=$(head -n 1 -- "$PAIRING_KEY_FILE")
  else echo "install.sh: --pairing-key-file $PAIRING_KEY_FILE: cannot read it" >&2; exit 2
  fi
  PAIRING_KEY=$(printf '%s' "$PAIRING_KEY" | tr -d '[:space:]')
  [ -n "$PAIRING_KEY" ] || { echo "install.sh: --pairing-key-file $PAIRING_KEY_FILE: no key in it" >&2; exit 2; }
fi
# --- end pairing key
[ "$(id -u)" = 0 ] || { echo "install.sh: run as root" >&2; exit 1; }
# --- re-run (the upgrade): every option not given again keeps its value from the agent.json this
# script wrote before (given options win); defaults would move the host to another workload id,
# drop its admin CIDRs or switch it to aws-iid, and the restart below applies it at once
CONF=/etc/ringfence/agent.json
KEEP_ENROLL=""
if [ -f "$CONF" ]; then
  conf() { python3 -c '
import json, sys
c = json.load(open(sys.argv[1]))
v = c.get(sys.argv[2])
if sys.argv[2] == "enroll":
    print(json.dumps(v) if isinstance(v, dict) else "")
elif isinstance(v, list):
    print(" ".join(str(x) for x in v))
elif isinstance(v, str):
    print(v)
' "$CONF" "$1"; }
  OLD_WORKLOAD_ID=$(conf workload_id) && OLD_API_URL=$(conf api_url) && OLD_SOURCE=$(conf source) &&
    OLD_ADMIN_CIDRS=$(conf admin_cidrs) && OLD_ENROLL=$(conf enroll) || {
    echo "install.sh: $CONF exists but cannot be read as JSON: refused (fix it, or remove it and give every option)" >&2; exit 2; }
  [ -n "$WORKLOAD_ID" ] || WORKLOAD_ID="$OLD_WORKLOAD_ID"
  [ -n "$ADMIN_CIDRS" ] || ADMIN_CIDRS="$OLD_ADMIN_CIDRS"
  if [ -z "$API_URL$SOURCE" ]; then API_URL="$OLD_API_URL"; SOURCE="$OLD_SOURCE"; fi
  # no new pairing key: the enrollment it had (pairing stays pairing, never silently aws-iid)
  [ -n "$PAIRING_KEY" ] || [ -z "$OLD_API_URL" ] || KEEP_ENROLL="$OLD_ENROLL"
fi
# --- end re-run
[ -n "$API_URL$SOURCE" ] || { echo "install.sh: give --api-url or --source" >&2; exit 2; }

# --- prerequisites: each checked on its own (a stock Debian image has nft but no venv module)
NEED=""
command -v nft >/dev/null 2>&1 || NEED="$NEED nft"
# venv needs ensurepip and the pip wheel it bundles (Debian: python3-venv); version() finds both
python3 -c 'import ensurepip, venv; ensurepip.version()' >/dev/null 2>&1 || NEED="$NEED venv"
command -v conntrack >/dev/null 2>&1 || NEED="$NEED conntrack"
if [ -n "$NEED" ]; then
  APT="" RPM=""
  for n in $NEED; do
    case "$n" in
      nft) APT="$APT nftables"; RPM="$RPM nftables" ;;
      venv) APT="$APT python3-venv"; RPM="$RPM python3" ;;
      conntrack) APT="$APT conntrack"; RPM="$RPM conntrack-tools" ;;
    esac
  done
  echo "install.sh: missing:$NEED; installing" >&2
  # shellcheck disable=SC2086 # word splitting of the package lists is meant
  if command -v apt-get >/dev/null 2>&1; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $APT
  elif command -v dnf >/dev/null 2>&1; then dnf install -y -q $RPM
  elif command -v yum >/dev/null 2>&1; then yum install -y -q $RPM
  fi
fi
# --- end prerequisites
# --- artifact: fetch (HTTPS only) or take the local copy and check its digest (installed below)
case "$ARTIFACT_SHA256" in
  *[!0-9a-f]*|"") echo "install.sh: --artifact-sha256 must be the artifact's SHA-256 (64 lower-case hex digits)" >&2; exit 2 ;;
esac
[ "${#ARTIFACT_SHA256}" -eq 64 ] || { echo "install.sh: --artifact-sha256 must be 64 hex digits" >&2; exit 2; }
ARTIFACT_DIR=$(mktemp -d)
trap 'rm -rf "$ARTIFACT_DIR"' EXIT
if [ -n "$ARTIFACT_URL" ]; then
  case "$ARTIFACT_URL" in
    https://*) ;;
    *) echo "install.sh: --artifact-url must be https:// (got $ARTIFACT_URL)" >&2; exit 2 ;;
  esac
  ARTIFACT="$ARTIFACT_DIR/$(basename "${ARTIFACT_URL%%\?*}")"
  curl --proto '=https' --tlsv1.2 -fsS -m 120 -H 'Accept: application/octet-stream' -o "$ARTIFACT" "$ARTIFACT_URL"
elif [ -n "$ARTIFACT_FILE" ]; then
  ARTIFACT="$ARTIFACT_DIR/$(basename "$ARTIFACT_FILE")"
  cp "$ARTIFACT_FILE" "$ARTIFACT"  # the copy checked is the copy installed
else
  echo "install.sh: give --artifact-url or --artifact-file (and --artifact-sha256)" >&2; exit 2
fi
case "$ARTIFACT" in
  *.whl) ;;
  *) echo "install.sh: the artifact is a wheel (.whl), not $(basename "$ARTIFACT")" >&2; exit 2 ;;
esac
GOT=$(python3 -c 'import hashlib, sys; print(hashlib.file_digest(open(sys.argv[1], "rb"), "sha256").hexdigest())' "$ARTIFACT")
if [ "$GOT" != "$ARTIFACT_SHA256" ]; then
  echo "install.sh: $(basename "$ARTIFACT") has SHA-256 $GOT, not $ARTIFACT_SHA256: refused, nothing installed" >&2
  exit 3
fi
# --- end artifact
# --- pinned key: into the temp dir first, checked to be a PEM public key the agent loads (the
# checked artifact's own code, before anything is installed: a refused key leaves the host as it
# was, its installed agent and its pin), then renamed into place (a cut download never leaves a
# truncated pin)
PIN=/etc/ringfence/signing-key.pem
NEWKEY=""
if [ -n "$PUBKEY_FILE" ]; then NEWKEY="$PUBKEY_FILE"
elif [ -n "$PUBKEY_URL" ]; then
  case "$PUBKEY_URL" in https://*) ;; *) echo "install.sh: --public-key-url must be https://" >&2; exit 2 ;; esac
  NEWKEY="$ARTIFACT_DIR/signing-key.pem"
  curl --proto '=https' --tlsv1.2 -fsS -m 10 -o "$NEWKEY" "$PUBKEY_URL"
  # trust on first use only: whoever serves the URL later must not re-pin every host that
  # re-runs the installer; the key rotates through signed bundles (docs/bundle.md)
  if [ -f "$PIN" ] && ! cmp -s "$NEWKEY" "$PIN"; then
    echo "install.sh: $PUBKEY_URL serves a key other than the one pinned in $PIN: refused (rotate through signed bundles, docs/bundle.md; or give --public-key-file)" >&2
    exit 4
  fi
elif [ ! -f "$PIN" ]; then echo "install.sh: no pinned key (--public-key-file or --public-key-url)" >&2; exit 2
fi
# -I: no cwd, PYTHONPATH or user site on the path; the checked wheel comes first
[ -z "$NEWKEY" ] || python3 -I -c 'import sys, pathlib; sys.path.insert(0, sys.argv[1]); from ringfence.bundlewire import Verifier; Verifier.from_file(pathlib.Path(sys.argv[2]))' "$ARTIFACT" "$NEWKEY" 2>/dev/null || {
  echo "install.sh: $NEWKEY is not a PEM Ed25519 public key: refused, nothing installed and the pinned key is unchanged" >&2; exit 4; }
# --- end pinned key
# --- install: the checked artifact, offline
python3 -m venv "$PREFIX"
"$PREFIX/bin/pip" install -q --no-index --no-deps --force-reinstall "$ARTIFACT"
# --- end install

install -d -m 0755 /etc/ringfence
if [ -n "$NEWKEY" ]; then  # the key checked above (--- pinned key)
  install -m 0644 "$NEWKEY" "$PIN.new"
  mv -f "$PIN.new" "$PIN"
fi
if [ -z "$WORKLOAD_ID" ]; then
  TOKEN=$(curl -fsS -m 2 -X PUT http://169.254.169.254/latest/api/token -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' 2>/dev/null || true)
  [ -n "$TOKEN" ] && WORKLOAD_ID=$(curl -fsS -m 2 -H "X-aws-ec2-metadata-token: $TOKEN" http://169.254.169.254/latest/meta-data/instance-id 2>/dev/null || true)
  [ -n "$WORKLOAD_ID" ] || WORKLOAD_ID=$(hostname)
fi

# --- the agent's own user (the unit's User=): a system account, no login, no home of its own
AGENT_USER=ringfence-agent
if ! id -u "$AGENT_USER" >/dev/null 2>&1; then
  if command -v useradd >/dev/null 2>&1; then
    useradd --system --user-group --no-create-home --home-dir /var/lib/ringfence-agent --shell /usr/sbin/nologin "$AGENT_USER"
  else
    addgroup -S "$AGENT_USER" && adduser -S -D -H -h /var/lib/ringfence-agent -s /sbin/nologin -G "$AGENT_USER" "$AGENT_USER"
  fi
fi
# --- end user

umask 077
# JSON: the agent reads it with the standard library (a YAML config would need PyYAML beside it)
json_str() { printf '"%s"' "$(printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g')"; }
{
  echo "{"
  printf '  "workload_id": %s,\n' "$(json_str "$WORKLOAD_ID")"  # printf: sh's echo eats backslashes
  echo '  "public_key": "/etc/ringfence/signing-key.pem",'
  echo '  "state_dir": "/var/lib/ringfence-agent",'
  echo '  "backend": "nftables",'
  if [ -n "$API_URL" ]; then
    printf '  "api_url": %s,\n' "$(json_str "$API_URL")"
    if [ -n "$PAIRING_KEY" ]; then
      echo '  "enroll": {"method": "pairing", "pairing_key_file": "/etc/ringfence/pairing-key"},'
    elif [ -n "$KEEP_ENROLL" ]; then
      printf '  "enroll": %s,\n' "$KEEP_ENROLL"  # re-run: as json.dumps wrote it from the old file
    else
      echo '  "enroll": {"method": "aws-iid"},'  # EC2: the instance identity document proves who we are
    fi
  else
    printf '  "source": %s,\n' "$(json_str "$SOURCE")"
  fi
  printf '  "admin_cidrs": ['; first=1
  for c in $ADMIN_CIDRS; do [ $first = 1 ] || printf ', '; json_str "$c"; first=0; done; echo ']'
  echo "}"
} > /etc/ringfence/agent.json
[ -n "$PAIRING_KEY" ] && printf '%s\n' "$PAIRING_KEY" > /etc/ringfence/pairing-key
# root's files, readable by the agent's group only (the agent reads them, never writes them)
for f in /etc/ringfence/agent.json /etc/ringfence/pairing-key; do
  [ ! -f "$f" ] || { chgrp "$AGENT_USER" "$f" && chmod 0640 "$f"; }
done

# the unit below is a copy of agent/packaging/ringfence-agent.service (a test keeps them equal)
cat > /etc/systemd/system/ringfence-agent.service <<'UNIT'
# Ringfence agent: programs the host firewall (nftables) from signed bundles.
# Starts before the network is configured so the last known good policy is enforced before any
# traffic flows; it never flushes the firewall when it stops (that is `ringfence-agent flush`).
[Unit]
Description=Ringfence micro-segmentation agent
Documentation=https://github.com/ringfence/ringfence/blob/main/docs/agent.md
DefaultDependencies=no
Wants=network-pre.target
Before=network-pre.target shutdown.target
After=local-fs.target
Conflicts=shutdown.target

[Service]
# notify: the agent says READY=1 only once the kernel holds its last known good (or the
# fail-safe posture), so network-pre.target, and the interfaces after it, wait for that
Type=notify
NotifyAccess=main
ExecStart=/opt/ringfence-agent/bin/ringfence-agent run --config /etc/ringfence/agent.json
Restart=always
RestartSec=2
# the agent re-applies its last known good on every start, before it contacts anyone
# A user of its own, not root: uid 0 needs no capability to connect() to root-owned sockets under
# /run (docker.sock, containerd, /run/udev/control, the journal), i.e. root on the host.
# install.sh creates it; systemd chowns the state directory to it (also one root owned before)
User=ringfence-agent
Group=ringfence-agent
StateDirectory=ringfence-agent
StateDirectoryMode=0700
ConfigurationDirectory=ringfence
# CAP_NET_ADMIN for nftables, iptables, ipset, conntrack and the session cut; CAP_NET_RAW for
# iptables-legacy's raw socket; ambient, so the programs it runs (nft, iptables-restore, ipset,
# conntrack) have them too. /proc/net/nf_conntrack is root's: it lists with conntrack -L instead
CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW
AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW
NoNewPrivileges=yes
ProtectSystem=strict
# iptables-legacy locks /run/xtables.lock (root's 0600 when iptables made it): made beforehand,
# as root ('+'), and opened to the agent's group
ExecStartPre=+-/bin/sh -c 'touch /run/xtables.lock && chgrp ringfence-agent /run/xtables.lock && chmod 0660 /run/xtables.lock'
RuntimeDirectory=ringfence-agent
RuntimeDirectoryMode=0700
ReadWritePaths=/var/lib/ringfence-agent -/run/xtables.lock
# AF_UNIX stays for $NOTIFY_SOCKET; the manager's and D-Bus's sockets are hidden all the same
InaccessiblePaths=-/run/systemd/private -/run/dbus/system_bus_socket
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelModules=yes
ProtectKernelTunables=yes
ProtectKernelLogs=yes
ProtectClock=yes
ProtectControlGroups=yes
# user and net only: the seal check loads the rules into a fresh network namespace, which without
# CAP_SYS_ADMIN only a user namespace can hold (docs/agent.md, the seal race); =yes made it fail
# and an nftables apply raced by a neighbour with CAP_NET_ADMIN was sealed as read. The cost: an
# unprivileged user namespace's kernel surface, mostly nf_tables, which CAP_NET_ADMIN reaches anyway
RestrictNamespaces=user net
RestrictSUIDSGID=yes
RestrictRealtime=yes
LockPersonality=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
# a call outside the filter fails (EPERM) rather than killing the agent mid-apply
SystemCallErrorNumber=EPERM
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
MemoryMax=128M
CPUQuota=20%

[Install]
WantedBy=multi-user.target
UNIT
# restart, not enable --now (a no-op on a running unit): an upgrade runs the new code and unit;
# the agent never flushes its rules on stop and re-applies its last known good on start
systemctl daemon-reload
# an upgrade from an agent that ran as root: its state (seal.key, seal.last, status.json, the
# last known good) is root's 0600, which the agent, now its own user, cannot read (it refuses to
# start). Chowned with the old agent stopped (its rules stay in force: it never flushes on stop),
# or what it writes after the chown is root's again, and systemd's StateDirectory= chown skips a
# directory whose top is already the user's (-h: a link is changed itself, never followed)
systemctl stop ringfence-agent.service 2>/dev/null || true
[ ! -d /var/lib/ringfence-agent ] || chown -R -h "$AGENT_USER:$AGENT_USER" /var/lib/ringfence-agent
systemctl enable ringfence-agent.service
systemctl restart ringfence-agent.service
echo "ringfence-agent installed for workload $WORKLOAD_ID; status: ringfence-agent status --state-dir /var/lib/ringfence-agent"
