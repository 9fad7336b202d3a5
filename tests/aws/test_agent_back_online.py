"""An agent marked offline by reconcile (its peers' sets dropped it) comes back: it rejoins them
however its hand-off to compute goes. The agent API is internet-facing and holds no grant to mark
a workload owed to compute: when compute's queue refuses the hand-off, the workload is stored
offline again, so its next heartbeat hands it on again (control/agents.py ``_rejoin``).

- a heartbeat's hand-off refused once: before, the online flag was stored, nothing was marked
  owed, and every later heartbeat found it online: it never rejoined;
- a re-enrollment: before, it stored the workload online and queued nothing, and the following
  heartbeat found it online already.

(Ported from a review's reproducer.)"""

from __future__ import annotations

import time

from tests.aws.conftest import ROOT, Env, ip_of
from tests.aws.test_agent_api import auth
from tests.aws.test_pipeline import _ctx, _scheduled, boot, enroll_instance, in_set
from tests.aws.test_reconcile_gone_hand_off import compute_messages

HB = {"applied_version": 1, "mode": "enforce"}


def agentapi_container(env: Env) -> None:
    """The agent API's function as AWS keeps it warm, its own clients (the refusing hook's)."""
    from ringfence.local.lambdas import load_functions, retire_functions

    retire_functions([env.fn["agentapi"]])
    env.fn["agentapi"] = load_functions(["agentapi"], ROOT / "functions", keep_clients=True)["agentapi"]


def offline(env: Env) -> tuple[str, str, str]:
    """A processing host whose agent went silent, marked offline and out of the db's sets."""
    est = boot(env)
    proc, db = est["ids"]["proc"][0], est["ids"]["db"][0]
    tok = enroll_instance(env, proc)
    env.store.set_liveness(proc, heartbeat=time.time() - 3600)
    assert proc in env.fn["reconcile"].handler(_scheduled(), _ctx())["offline"]
    env.pump()
    assert not in_set(env.bundle(db), ip_of(env, proc))
    return proc, db, tok


def test_an_agent_back_online_whose_hand_off_was_refused_rejoins_at_its_next_heartbeat(env: Env) -> None:
    proc, db, tok = offline(env)
    sent = compute_messages(env, refuse=1)
    agentapi_container(env)
    status, _, _ = env.rest("agentapi", "POST", f"/v1/agents/{proc}/heartbeat", HB, headers=auth(tok))
    assert status == 200, "the heartbeat is answered: the agent's request succeeded"
    assert env.store.get(proc).offline, "stored offline again: its next heartbeat hands it on"
    assert not [m for m in sent if proc in m[1]]
    status, _, _ = env.rest("agentapi", "POST", f"/v1/agents/{proc}/heartbeat", HB, headers=auth(tok))
    assert status == 200 and not env.store.get(proc).offline
    assert [m for m in sent if proc in m[1]], "the next heartbeat hands it to compute"
    env.pump()
    assert in_set(env.bundle(db), ip_of(env, proc)), "the agent back online never rejoins its peers' sets"


def test_an_offline_agent_that_enrolls_again_rejoins_its_peers_sets(env: Env) -> None:
    proc, db, _ = offline(env)
    sent = compute_messages(env)
    agentapi_container(env)
    tok = enroll_instance(env, proc)
    assert not env.store.get(proc).offline
    assert [m for m in sent if proc in m[1]], "the enrollment hands it to compute"
    status, _, _ = env.rest("agentapi", "POST", f"/v1/agents/{proc}/heartbeat", HB, headers=auth(tok))
    assert status == 200
    env.pump()
    assert in_set(env.bundle(db), ip_of(env, proc)), "re-enrolled agent back online never rejoins its peers' sets"
