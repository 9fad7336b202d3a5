"""The publish function's DynamoDB rights, in template.yaml and infra/ alike: the writes it makes
(bundle pointers, its published count and records, dropped connections) and nothing else of the
state table (compute's pending mark beside a pointer, the engine head's revision, set heads,
deltas, the policy). Evaluated by tests/aws/test_function_iam.py's reading of both deployments."""

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
