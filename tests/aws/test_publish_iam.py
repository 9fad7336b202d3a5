"""The publish function's DynamoDB rights, in template.yaml and infra/ alike: the writes it makes
(bundle pointers by UpdateItem only, its published count and records, dropped connections) and
nothing else of the state table (compute's pending mark beside a pointer, the engine head's
revision, set heads, deltas, the policy). Evaluated by tests/aws/test_function_iam.py's reading of both deployments."""

from __future__ import annotations

from ringfence.model import Mode
from tests.aws.conftest import Env
from tests.aws.test_function_iam import Recorder, allowed, refusals, sam_statements, terraform_statements
from tests.aws.test_pipeline import boot


def test_the_publish_role_writes_pointers_and_its_count_only(env: Env) -> None:
    rec = Recorder(env)
    est = boot(env)
    env.pump()  # the estate's bundles: compute, then the publish workers
    db = est["ids"]["db"][0]
    env.store.set_operator(db, mode=Mode.OBSERVE)
    env.put(env.state_event(db, "running"))
    env.pump()
    writes = {
        (a, c["dynamodb:LeadingKeys"][0].split("#")[0]) for a, t, c in rec.calls.get("publish", []) if t == "state"
    }
    assert {("UpdateItem", "bundle"), ("UpdateItem", "engine"), ("PutItem", "published")} <= writes, writes
    assert not refusals(rec, ["publish"])
    for where, statements in (
        ("template.yaml", sam_statements("publish")),
        ("infra/", terraform_statements("publish")),
    ):
        assert any(len(conds) == 2 for _, _, conds in statements), (where, "both conditions read")
        # a nudge to a connection that is gone drops it
        assert allowed(
            statements,
            ("DeleteItem", "state", {"dynamodb:LeadingKeys": ["conn#i-1"], "dynamodb:Attributes": ["pk", "sk"]}),
        )
        for attack in (
            # compute's pending mark: a worker that lowered or removed it would let the agent API
            # serve deltas past a bundle on its way, and a rebuild adopt an older pointer
            (
                "UpdateItem",
                "state",
                {"dynamodb:LeadingKeys": ["bundle#i-1"], "dynamodb:Attributes": ["pending", "pk", "sk"]},
            ),
            (
                "PutItem",
                "state",
                {
                    "dynamodb:LeadingKeys": ["bundle#i-1"],
                    "dynamodb:Attributes": ["doc", "pending", "pk", "sk", "version"],
                },
            ),
            (
                "UpdateItem",
                "state",
                {"dynamodb:LeadingKeys": ["engine"], "dynamodb:Attributes": ["clean", "pk", "revision", "sk"]},
            ),
            ("PutItem", "state", {"dynamodb:LeadingKeys": ["engine"], "dynamodb:Attributes": ["pk", "sk"]}),
            (
                "UpdateItem",
                "state",
                {"dynamodb:LeadingKeys": ["sethead#rf_x"], "dynamodb:Attributes": ["pk", "sk", "version"]},
            ),
            (
                "PutItem",
                "state",
                {"dynamodb:LeadingKeys": ["delta#rf_x"], "dynamodb:Attributes": ["doc", "pk", "sk", "ttl"]},
            ),
            ("PutItem", "state", {"dynamodb:LeadingKeys": ["policy"], "dynamodb:Attributes": ["doc", "pk", "sk"]}),
            ("DeleteItem", "state", {"dynamodb:LeadingKeys": ["tokenof#i-1"], "dynamodb:Attributes": ["pk", "sk"]}),
        ):
            assert not allowed(statements, attack), (where, attack)


def test_the_publish_role_may_only_update_a_pointer() -> None:
    """A pointer is written with UpdateItem (its fields only). A PutItem replaces the whole item,
    so it drops compute's pending mark without naming it, and a DeleteItem removes it with the
    item: neither is granted on bundle#*. The published records and the connections get only
    the one write each needs."""
    pointer = ["doc", "pk", "sk", "version"]
    for where, statements in (
        ("template.yaml", sam_statements("publish")),
        ("infra/", terraform_statements("publish")),
    ):
        for needed in (
            ("UpdateItem", "state", {"dynamodb:LeadingKeys": ["bundle#i-1"], "dynamodb:Attributes": pointer}),
            (
                "PutItem",
                "state",
                {"dynamodb:LeadingKeys": ["published"], "dynamodb:Attributes": ["doc", "pk", "sk", "ttl"]},
            ),
            ("DeleteItem", "state", {"dynamodb:LeadingKeys": ["conn#i-1"], "dynamodb:Attributes": ["pk", "sk"]}),
        ):
            assert allowed(statements, needed), (where, needed)
        for attack in (
            # the pointer's own attributes only, yet the pending mark goes with the old item
            ("PutItem", "state", {"dynamodb:LeadingKeys": ["bundle#i-1"], "dynamodb:Attributes": pointer}),
            ("PutItem", "state", {"dynamodb:LeadingKeys": ["bundle#i-1"], "dynamodb:Attributes": ["pk", "sk"]}),
            ("DeleteItem", "state", {"dynamodb:LeadingKeys": ["bundle#i-1"], "dynamodb:Attributes": ["pk", "sk"]}),
            # the published records: written once, never changed or removed
            (
                "UpdateItem",
                "state",
                {"dynamodb:LeadingKeys": ["published"], "dynamodb:Attributes": ["doc", "pk", "sk"]},
            ),
            ("DeleteItem", "state", {"dynamodb:LeadingKeys": ["published"], "dynamodb:Attributes": ["pk", "sk"]}),
            (
                "PutItem",
                "state",
                {"dynamodb:LeadingKeys": ["published"], "dynamodb:Attributes": ["doc", "pk", "sk", "version"]},
            ),
            # a connection is the agent API's to record: the publish role only drops one gone
            (
                "PutItem",
                "state",
                {"dynamodb:LeadingKeys": ["conn#i-1"], "dynamodb:Attributes": ["connection_id", "pk", "sk", "ttl"]},
            ),
            ("UpdateItem", "state", {"dynamodb:LeadingKeys": ["conn#i-1"], "dynamodb:Attributes": ["pk", "sk", "ttl"]}),
        ):
            assert not allowed(statements, attack), (where, attack)
