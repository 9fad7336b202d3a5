"""Governed labels decided by the time of each write (ringfence.governance.govern_writes), without
a cloud: which write is the last one, and when a privileged value is in force."""

from __future__ import annotations

import pytest

from ringfence.governance import (
    NOT_A_TAGGER,
    SKEW,
    UNATTRIBUTED,
    LabelWrite,
    NotGranted,
    TagChange,
    bind,
    govern,
    unbind,
)
from ringfence.labels import LabelMapper
from ringfence.model import LabelsConfig, Workload
from tests.test_governance import DEV, DEV_BOX, JUMP, JUMP_TAGS, MAPPER, TAGGER

WEB_TAGS = dict(DEV_BOX.tags)


def box(tags: dict[str, str], at: float) -> Workload:
    return DEV_BOX.model_copy(update={"tags": tags, "observed_at": at})


def step(
    previous: Workload | None,
    writes: dict[str, LabelWrite] | None,
    previous_at: float,
    current: Workload,
    change: TagChange | None = None,
    now: float = 1000.0,
) -> tuple[Workload, dict[str, LabelWrite], object]:
    v = govern(MAPPER, previous, current, change, writes=writes, previous_at=previous_at, now=now)
    assert v.writes is not None
    return v.workload, v.writes, v


def approved_jumpbox() -> tuple[Workload, dict[str, LabelWrite]]:
    w, writes, _ = step(None, {}, 0.0, box(WEB_TAGS, 10.0))
    w, writes, v = step(w, writes, 10.0, box(JUMP_TAGS, 20.0), TagChange(TAGGER, JUMP_TAGS, 15.0))
    assert MAPPER.resolve(w).labels["role"] == "jumpbox" and v.approved  # type: ignore[attr-defined]
    return w, writes


def test_the_last_write_decides_not_the_state() -> None:
    w, writes = approved_jumpbox()
    # the developer writes jumpbox again (no observation sees a change): the approval is taken back
    w2, writes2, v = step(w, writes, 20.0, box(JUMP_TAGS, 30.0), TagChange(DEV, JUMP_TAGS, 25.0))
    assert MAPPER.resolve(w2).labels.get("role") is None, "the approval is taken back"
    assert v.finding and v.reason == NOT_A_TAGGER  # type: ignore[attr-defined]
    assert writes2["role"] == LabelWrite(at=25.0, value="jumpbox", by="other")


def test_a_call_older_than_a_later_write_changes_nothing() -> None:
    w, writes = approved_jumpbox()
    w2, writes2, _ = step(w, writes, 20.0, box(JUMP_TAGS, 30.0), TagChange(DEV, JUMP_TAGS, 14.0))
    assert MAPPER.resolve(w2).labels["role"] == "jumpbox" and writes2 == writes, "a stale call takes nothing back"


def test_a_call_older_than_an_observation_of_another_value_approves_nothing() -> None:
    w, writes, _ = step(None, {}, 0.0, box(WEB_TAGS, 10.0))
    w, writes, _ = step(w, writes, 10.0, box(JUMP_TAGS, 100.0))  # unattributed: held
    assert writes["role"] == LabelWrite(at=10.0, value="jumpbox", by="unseen", seen=100.0)
    # a tagger's call made before the last observation of web (more than SKEW before it)
    late = TagChange(TAGGER, JUMP_TAGS, 10.0 - SKEW - 1)
    w2, _, v = step(w, writes, 100.0, box(JUMP_TAGS, 110.0), late)
    assert MAPPER.resolve(w2).labels["role"] == "web" and v.held  # type: ignore[attr-defined]
    # within SKEW (CloudTrail's second, a describe's lag): the call the observation missed
    w3, _, _ = step(w, writes, 100.0, box(JUMP_TAGS, 110.0), TagChange(TAGGER, JUMP_TAGS, 10.0 - SKEW + 1))
    assert MAPPER.resolve(w3).labels["role"] == "jumpbox"


def test_in_the_same_second_a_taggers_call_never_outranks_anothers() -> None:
    w, writes, _ = step(None, {}, 0.0, box(WEB_TAGS, 10.0))
    w, writes, _ = step(w, writes, 10.0, box(JUMP_TAGS, 20.0), TagChange(DEV, JUMP_TAGS, 15.0))
    w2, _, _ = step(w, writes, 20.0, box(JUMP_TAGS, 30.0), TagChange(TAGGER, JUMP_TAGS, 15.0))
    assert MAPPER.resolve(w2).labels["role"] == "web"
    w3, _, _ = step(w, writes, 20.0, box(JUMP_TAGS, 30.0), TagChange(TAGGER, JUMP_TAGS, 16.0))
    assert MAPPER.resolve(w3).labels["role"] == "jumpbox"


def test_a_revocation_the_observations_missed_holds_the_value_unattributed() -> None:
    w, writes = approved_jumpbox()
    w2, _, v = step(w, writes, 20.0, box(JUMP_TAGS, 30.0), TagChange(TAGGER, WEB_TAGS, 25.0))
    assert MAPPER.resolve(w2).labels.get("role") is None and v.held  # type: ignore[attr-defined]
    assert v.reason != NOT_A_TAGGER  # type: ignore[attr-defined]


def test_a_grant_stands_while_the_value_does_and_ends_when_it_moves() -> None:
    w, writes, _ = step(None, {}, 0.0, box(WEB_TAGS, 10.0))
    w, writes, _ = step(w, writes, 10.0, box(JUMP_TAGS, 20.0), TagChange(DEV, JUMP_TAGS, 15.0))
    granted = bind(MAPPER, w, {"role": "jumpbox", "app": "admin"})
    w, writes, _ = step(w, writes, 20.0, granted.model_copy(update={"held_labels": None}), now=21.0)
    assert MAPPER.resolve(w).labels["role"] == "jumpbox" and w.label_grants == {"role": "jumpbox", "app": "admin"}
    # anyone writing the granted value keeps it; a stale call of another value does not end it
    w, writes, _ = step(w, writes, 20.0, box(JUMP_TAGS, 30.0), TagChange(DEV, JUMP_TAGS, 25.0))
    w, writes, _ = step(w, writes, 30.0, box(JUMP_TAGS, 31.0), TagChange(TAGGER, WEB_TAGS, 19.0))
    assert MAPPER.resolve(w).labels["role"] == "jumpbox"
    # the value moves off it: the grant ends, and moving back is a move like any other
    w, writes, _ = step(w, writes, 31.0, box(WEB_TAGS, 40.0))
    assert w.label_grants == {}
    w, writes, v = step(w, writes, 40.0, box(JUMP_TAGS, 50.0), TagChange(DEV, JUMP_TAGS, 45.0))
    assert MAPPER.resolve(w).labels["role"] == "web" and v.finding  # type: ignore[attr-defined]


def test_a_grant_made_before_the_move_approves_it() -> None:
    w, writes, _ = step(None, {}, 0.0, box(WEB_TAGS, 10.0))
    granted = bind(MAPPER, w, {"role": "jumpbox", "app": "admin"})
    w, writes, _ = step(w, writes, 10.0, granted, now=11.0)
    w, writes, v = step(w, writes, 10.0, box(JUMP_TAGS, 20.0), TagChange(DEV, JUMP_TAGS, 15.0))
    assert MAPPER.resolve(w).labels["role"] == "jumpbox" and not v.held  # type: ignore[attr-defined]


def test_a_call_of_unknown_content_ends_a_grant_made_before_it_only() -> None:
    """A call whose event says who and when but not what it set (Azure's) made after a grant, or
    within SKEW before it (the call's clock is the cloud's), ends the grant on every dimension,
    names its caller and approves nothing, an allowed tagger's included; one made earlier
    (delivered late) changes nothing."""
    w, writes, _ = step(None, {}, 0.0, box(WEB_TAGS, 10.0))
    w, writes, _ = step(w, writes, 10.0, box(JUMP_TAGS, 20.0))  # unattributed: held
    granted = bind(MAPPER, w, {"role": "jumpbox", "app": "admin"})
    w, writes, _ = step(w, writes, 20.0, granted.model_copy(update={"held_labels": None}), now=30.0)
    assert MAPPER.resolve(w).labels["role"] == "jumpbox"

    def call(
        principal: str, t: float, requested: dict[str, str] | None = None
    ) -> tuple[Workload, dict[str, LabelWrite], object]:
        change = TagChange(principal, requested, t, unknown_content=True)
        return step(w, writes, 20.0, box(JUMP_TAGS, 40.0), change, now=40.0)

    w2, writes2, v = call(DEV, 30.0 - SKEW - 1)
    assert w2.label_grants == {"role": "jumpbox", "app": "admin"} and writes2 == writes and not v.held  # type: ignore[attr-defined]
    for t in (30.0 - SKEW + 1, 35.0):
        w3, writes3, v = call(DEV, t)
        assert w3.label_grants == {} and MAPPER.resolve(w3).labels.get("role") is None
        assert v.finding and {m.dimension for m in v.moves} == {"role", "app"}  # type: ignore[attr-defined]
        # the end names the grant it ended (a later-processed earlier call takes it over)
        assert writes3["role"] == LabelWrite(at=max(t, 30.0), value="jumpbox", by="other", ended=writes["role"])
    w4, _, v = call(TAGGER, 35.0, JUMP_TAGS)
    assert w4.label_grants == {} and v.held and not v.finding and not v.approved  # type: ignore[attr-defined]


def test_a_call_of_unknown_content_is_decided_again_for_its_events_redelivery() -> None:
    """Azure's redelivery of an event whose report failed part-way: the end (and the named write)
    stored with the event's id is the call's own, so the same verdict is decided again (its report
    made again, each record once by its derived id); another event of the same caller and time,
    or an end stored before the event was kept (no ``event``), ends nothing again."""
    w, writes, _ = step(None, {}, 0.0, box(WEB_TAGS, 10.0))
    w, writes, _ = step(w, writes, 10.0, box(JUMP_TAGS, 20.0))  # unattributed: held
    granted = bind(MAPPER, w, {"role": "jumpbox", "app": "admin"})
    w, writes, _ = step(w, writes, 20.0, granted.model_copy(update={"held_labels": None}), now=30.0)
    ended, ended_writes, v = step(
        w, writes, 20.0, box(JUMP_TAGS, 40.0), TagChange(DEV, None, 35.0, unknown_content=True, event="ev-1"), 40.0
    )
    assert set(v.ended) == {"role", "app"} and v.finding  # type: ignore[attr-defined]
    assert ended_writes["role"].event == "ev-1"

    def again(event: str, stored: dict[str, LabelWrite]) -> object:
        change = TagChange(DEV, None, 35.0, unknown_content=True, event=event)
        return step(ended, stored, 40.0, box(JUMP_TAGS, 50.0), change, now=50.0)

    _, writes2, v = again("ev-1", ended_writes)  # type: ignore[misc]
    assert v.ended == {d: ended_writes[d] for d in ("role", "app")} and v.finding  # type: ignore[attr-defined]
    assert writes2 == ended_writes, "the redelivery changes nothing stored"
    _, _, v = again("ev-2", ended_writes)  # type: ignore[misc]
    assert not v.ended and not v.finding  # type: ignore[attr-defined]
    old = {
        d: LabelWrite.model_validate({k: x for k, x in e.model_dump().items() if k != "event"})
        for d, e in ended_writes.items()
    }
    _, _, v = again("ev-1", old)  # type: ignore[misc]
    assert not v.ended and not v.finding  # type: ignore[attr-defined]
    # a held move the event named its caller for: stored as that call's write, decided again as is
    change = TagChange(DEV, {"ringfence:role": "jumpbox"}, unknown_content=True, called_at=45.0, event="ev-3")
    named, named_writes, v = step(ended, ended_writes, 40.0, box(JUMP_TAGS, 50.0), change, now=50.0)
    assert v.finding and named_writes["role"] == LabelWrite(at=50.0, value="jumpbox", by="other", event="ev-3")  # type: ignore[attr-defined]
    _, writes3, v = step(named, named_writes, 50.0, box(JUMP_TAGS, 60.0), change, now=60.0)
    assert v.finding and writes3["role"] == named_writes["role"]  # type: ignore[attr-defined]


def test_records_stored_before_writes_were_recorded_keep_what_is_in_force() -> None:
    """An upgrade: an approved value stays approved, a grant stands, a held move waits for its call."""
    approved = JUMP.model_copy(update={"observed_at": 20.0})
    w, writes, _ = step(approved, None, 20.0, box(JUMP_TAGS, 30.0))
    assert MAPPER.resolve(w).labels["role"] == "jumpbox" and writes["role"].by == "kept"
    held = JUMP.model_copy(update={"held_labels": {"role": "web", "app": "shop", "env": "dev"}, "observed_at": 20.0})
    w, writes, v = step(held, None, 20.0, box(JUMP_TAGS, 30.0))
    assert v.reason == UNATTRIBUTED and MAPPER.resolve(w).labels["role"] == "web"  # type: ignore[attr-defined]
    w, _, _ = step(held, None, 20.0, box(JUMP_TAGS, 30.0), TagChange(TAGGER, JUMP_TAGS, 12.0))
    assert MAPPER.resolve(w).labels["role"] == "jumpbox", "its call, older than the record, still approves it"


def test_without_writes_the_rule_by_state_is_unchanged() -> None:
    """Callers that keep no writes (on premise, GCP's check) keep the older rule."""
    v = govern(MAPPER, DEV_BOX, JUMP, TagChange(TAGGER, JUMP_TAGS))
    assert v.writes is None and not v.held


def test_a_call_in_the_second_of_an_approval_that_predates_its_observation_still_takes_it_back() -> None:
    """CloudTrail's times are whole seconds: a tagger's call at 10 (made at 10.9) approves the move
    seen at 10.5; the developer's call at 10 (made at 10.95) must not look older than that approval."""
    w, writes, _ = step(None, {}, 0.0, box(WEB_TAGS, 10.5))
    w, writes, _ = step(w, writes, 10.5, box(JUMP_TAGS, 11.0), TagChange(TAGGER, JUMP_TAGS, 10.0))
    assert MAPPER.resolve(w).labels["role"] == "jumpbox"
    w, _, v = step(w, writes, 11.0, box(JUMP_TAGS, 12.0), TagChange(DEV, JUMP_TAGS, 10.0))
    assert MAPPER.resolve(w).labels.get("role") is None and v.finding  # type: ignore[attr-defined]


def test_tagger_patterns_whose_account_is_a_wildcard_are_named() -> None:
    from ringfence.labels import any_account_taggers

    patterns = [
        "arn:aws:iam::*:role/ringfence-tagging",
        "arn:aws:iam::12345678901?:role/x",
        "arn:aws:iam::123456789012:role/ringfence-tagging",
        "arn:aws:iam::123456789012:role/*",
        "tagger@shop-prod.iam.gserviceaccount.com",
        # a wildcard spanning the account field, or before it: each matches a role of any account
        "arn:*:role/ringfence-tagging",
        "*:role/ringfence-tagging",
        "arn:aws:iam::*",
        "*",
        "*@shop-prod.iam.gserviceaccount.com",  # a role name may hold '@'
    ]
    assert any_account_taggers(patterns) == patterns[:2] + patterns[5:]


def test_a_call_claiming_a_future_time_is_taken_as_made_now() -> None:
    """A message on the queue claiming a time far ahead would otherwise outrank every real call."""
    w, writes, _ = step(None, {}, 0.0, box(WEB_TAGS, 10.0))
    w, writes, _ = step(w, writes, 10.0, box(JUMP_TAGS, 20.0), TagChange(DEV, JUMP_TAGS, 1e12), now=30.0)
    assert writes["role"].at == 30.0 + SKEW
    w, _, _ = step(w, writes, 20.0, box(JUMP_TAGS, 40.0), TagChange(TAGGER, JUMP_TAGS, 36.0), now=40.0)
    assert MAPPER.resolve(w).labels["role"] == "jumpbox"


# --- a value in force that a policy version makes privileged ---------------------------------------

UNGOVERNED_ROLE = LabelMapper(
    LabelsConfig.model_validate(
        {
            "taggers": MAPPER.config.taggers,
            "dimensions": {
                "role": {"allowed": ["web", "jumpbox"]},
                "app": {"allowed": ["shop", "admin"], "privileged": ["admin"]},
                "env": {"keys": ["ringfence:env", "ringfence:environment"]},
            },
        }
    )
)
DEV_JUMP_TAGS = {**WEB_TAGS, "ringfence:role": "jumpbox"}


def jumpbox_before_it_was_privileged() -> tuple[Workload, dict[str, LabelWrite]]:
    """A developer made the host a jumpbox while ``role`` was not governed: in force, no write kept."""
    v = govern(UNGOVERNED_ROLE, None, box(WEB_TAGS, 10.0), writes={}, previous_at=0.0, now=10.0)
    assert v.writes is not None
    v = govern(
        UNGOVERNED_ROLE, v.workload, box(DEV_JUMP_TAGS, 20.0), TagChange(DEV, DEV_JUMP_TAGS, 15.0),
        writes=v.writes, previous_at=10.0, now=20.0,
    )  # fmt: skip
    assert (
        v.writes is not None
        and "role" not in v.writes
        and UNGOVERNED_ROLE.resolve(v.workload).labels["role"] == "jumpbox"
    )
    return v.workload, v.writes


def test_a_value_in_force_that_becomes_privileged_is_kept() -> None:
    w, writes = jumpbox_before_it_was_privileged()
    w2, writes2, v = step(w, writes, 20.0, box(DEV_JUMP_TAGS, 30.0), now=30.0)
    assert MAPPER.resolve(w2).labels["role"] == "jumpbox" and not v.held  # type: ignore[attr-defined]
    assert writes2["role"] == LabelWrite(at=20.0, value="jumpbox", by="kept")
    # and it stays kept on the next observation: the stored kept write decides it
    w3, _, _ = step(w2, writes2, 30.0, box(DEV_JUMP_TAGS, 40.0), now=40.0)
    assert MAPPER.resolve(w3).labels["role"] == "jumpbox"


def test_a_kept_value_is_taken_back_by_a_later_call_of_a_non_tagger() -> None:
    w, writes = jumpbox_before_it_was_privileged()
    w2, writes2, v = step(w, writes, 20.0, box(DEV_JUMP_TAGS, 30.0), TagChange(DEV, DEV_JUMP_TAGS, 25.0), now=30.0)
    assert MAPPER.resolve(w2).labels.get("role") is None and v.finding  # type: ignore[attr-defined]
    assert writes2["role"] == LabelWrite(at=25.0, value="jumpbox", by="other")
    # the developer's call before the policy took effect (older than the last observation) takes nothing back
    w3, _, _ = step(w, writes, 20.0, box(DEV_JUMP_TAGS, 30.0), TagChange(DEV, DEV_JUMP_TAGS, 15.0), now=30.0)
    assert MAPPER.resolve(w3).labels["role"] == "jumpbox"


def test_a_held_move_is_never_kept() -> None:
    """A developer's jumpbox held under governance stays held however often it is decided again
    (a new policy version re-deciding it must not take the held tag for a value in force)."""
    w, writes, _ = step(None, {}, 0.0, box(WEB_TAGS, 10.0))
    w, writes, v = step(w, writes, 10.0, box(JUMP_TAGS, 20.0), TagChange(DEV, JUMP_TAGS, 15.0))
    assert v.held  # type: ignore[attr-defined]
    for at in (30.0, 40.0):
        w, writes, v = step(w, writes, at - 10.0, box(JUMP_TAGS, at), now=at)
        assert v.held and MAPPER.resolve(w).labels["role"] == "web"  # type: ignore[attr-defined]
        assert writes["role"].by == "other"


# --- revocations (ringfence.governance.unbind) -----------------------------------------------------


def granted_jumpbox() -> tuple[Workload, dict[str, LabelWrite]]:
    """A developer's held move into role=jumpbox, app=admin, granted by an administrator at 21."""
    w, writes, _ = step(None, {}, 0.0, box(WEB_TAGS, 10.0))
    w, writes, _ = step(w, writes, 10.0, box(JUMP_TAGS, 20.0), TagChange(DEV, JUMP_TAGS, 15.0))
    granted = bind(MAPPER, w, {"role": "jumpbox", "app": "admin"})
    w, writes, _ = step(w, writes, 20.0, granted.model_copy(update={"held_labels": None}), now=21.0)
    assert MAPPER.resolve(w).labels["role"] == "jumpbox"
    return w, writes


def test_a_revoked_grant_the_tags_still_ask_for_is_held_and_dropped_from_the_labels() -> None:
    w, writes = granted_jumpbox()
    v = unbind(MAPPER, w, ["role"], writes=writes, previous_at=20.0, now=30.0)
    assert v.held and v.workload.label_grants == {"app": "admin"}
    assert v.labels == {"app": "admin", "env": "shared"}, "role unset, not its value before the grant"
    assert v.writes is not None and v.writes["role"] == LabelWrite(at=30.0, value="jumpbox", by="other")
    # the next observation (nothing changed) keeps it held: no earlier approval comes back
    w2, _, v2 = step(v.workload, v.writes, 20.0, box(JUMP_TAGS, 40.0), now=40.0)
    assert "role" not in MAPPER.resolve(w2).labels and v2.held  # type: ignore[attr-defined]


def test_after_a_revocation_only_a_later_taggers_call_approves_the_value() -> None:
    w, writes = granted_jumpbox()
    v = unbind(MAPPER, w, ["role", "app"], writes=writes, previous_at=20.0, now=30.0)
    assert v.writes is not None and v.workload.label_grants == {}
    # a tagger's call made before the revocation (a late event) is stale against it
    w2, _, late = step(v.workload, v.writes, 20.0, box(JUMP_TAGS, 40.0), TagChange(TAGGER, JUMP_TAGS, 25.0), now=41.0)
    assert "role" not in MAPPER.resolve(w2).labels and late.held  # type: ignore[attr-defined]
    # one made after it approves it, as any tagger's call does
    w3, _, after = step(v.workload, v.writes, 20.0, box(JUMP_TAGS, 40.0), TagChange(TAGGER, JUMP_TAGS, 35.0), now=41.0)
    assert MAPPER.resolve(w3).labels["role"] == "jumpbox" and not after.held  # type: ignore[attr-defined]


def test_a_revoked_grant_the_tags_do_not_ask_for_changes_nothing_in_force() -> None:
    w, writes, _ = step(None, {}, 0.0, box(WEB_TAGS, 10.0))
    w, writes, _ = step(w, writes, 10.0, bind(MAPPER, w, {"role": "jumpbox"}), now=11.0)
    assert w.label_grants == {"role": "jumpbox"} and MAPPER.resolve(w).labels["role"] == "web"
    v = unbind(MAPPER, w, ["role"], writes=writes, previous_at=10.0, now=12.0)
    assert not v.held and v.labels["role"] == "web" and v.workload.label_grants == {}
    # the move the grant would have allowed is held like any other non-tagger's
    w2, _, moved = step(v.workload, v.writes, 10.0, box(JUMP_TAGS, 20.0), TagChange(DEV, JUMP_TAGS, 15.0))
    assert MAPPER.resolve(w2).labels["role"] == "web" and moved.finding  # type: ignore[attr-defined]


def test_a_revocation_of_a_record_stored_before_writes_were_recorded() -> None:
    """No writes recorded (an upgrade, or an on-premise record): the grant is carried, then taken back."""
    granted = JUMP.model_copy(update={"label_grants": {"role": "jumpbox", "app": "admin"}, "observed_at": 20.0})
    assert MAPPER.resolve(granted).labels["role"] == "jumpbox"
    v = unbind(MAPPER, granted, ["role"], writes=None, previous_at=20.0, now=30.0)
    assert v.held and "role" not in v.labels and v.workload.label_grants == {"app": "admin"}


def test_a_revocation_names_only_granted_known_dimensions_all_or_none() -> None:
    w, writes = granted_jumpbox()
    with pytest.raises(ValueError, match="unknown label dimension 'rank'"):
        unbind(MAPPER, w, ["role", "rank"], writes=writes, previous_at=20.0)
    with pytest.raises(NotGranted, match=r"no grant of env .*grants: app=admin, role=jumpbox"):
        unbind(MAPPER, w, ["role", "env"], writes=writes, previous_at=20.0)
