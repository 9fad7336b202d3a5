"""A real control-plane process writing through LocalWiring until it is killed (tests/onprem/test_crash.py).

``python -m tests.onprem.crash_writer STATE KEYFILE FIRST``: provisions the example policy if none
is active, then registers workloads ``h<FIRST>``, ``h<FIRST+1>``, … for ever, minting a pairing key
and enrolling every 5th and quarantining every 7th. Each line it prints is an acknowledgement,
printed only after the service answered (the change is committed): ``ack <what> <id> [<token>]``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from ringfence.agentapi import EnrollRequest
from ringfence.clouds.aws.agents import AgentApi
from ringfence.clouds.onprem import OnPremAdmin
from ringfence.local.wiring import LocalWiring
from tests.onprem.conftest import policy_files


def ip(i: int) -> str:
    return f"10.50.{i // 250}.{i % 250 + 1}"


def main(state: str, key: str, first: int) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    w = LocalWiring(Path(state) / "state.db", signing_key=Path(key))
    admin = OnPremAdmin(w)
    api = AgentApi(w)

    def ack(*words: object) -> None:
        print("ack", *words, flush=True)

    if w.store.active_policy() is None:
        r = admin.provision("writer", policy_files(), "initial")
        assert r.status == 201, r.body
        ack("policy", r.body["version"])
    i = first
    while True:
        wid = f"h{i}"
        role = "web" if i % 2 else "processing"
        r = admin.register_workload(
            "writer", {"id": wid, "ips": [ip(i)], "tags": {"role": role, "app": "ordering", "env": "prod"}}
        )
        assert r.status in (200, 201), r.body
        ack("register", wid, ip(i))
        if i % 5 == 0:
            key_r = admin.pairing_key("writer", wid, 1, 3600)
            nonce = api.nonce().body["nonce"]
            e = api.enroll(
                EnrollRequest(method="pairing", nonce=nonce, workload_id=wid, pairing_key=key_r.body["pairing_key"])
            )
            assert e.status == 200, e.body
            ack("token", wid, e.body["token"])
        if i % 7 == 0:
            assert admin.quarantine("writer", wid, True, "drill").status == 200
            ack("quarantine", wid)
        i += 1


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
