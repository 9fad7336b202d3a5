"""Auto Scaling lifecycle hooks in moto: instances wait for ``CompleteLifecycleAction``.

moto 5.2 stores lifecycle hooks but ignores them: new instances of a group go straight to
``InService``, scale-in terminates at once, and ``CompleteLifecycleAction`` /
``RecordLifecycleActionHeartbeat`` are not implemented. Ringfence's promise (an instance is
segmented before it serves, and leaves its peers' sets before it goes) lives exactly there, so
the embedded AWS extends moto in-process — on moto's own autoscaling models and responses, so
every client (boto3, the handlers, the CLI) sees the behaviour through the real API:

- with a launch hook (``autoscaling:EC2_INSTANCE_LAUNCHING``) a new instance of the group stays
  ``Pending:Wait`` (its EC2 state is ``running``, as on AWS) until every launch hook's action is
  completed: ``CONTINUE`` → ``InService`` (and registered with the group's classic load
  balancers), ``ABANDON`` → terminated, and the group launches a replacement;
- with a terminate hook (``autoscaling:EC2_INSTANCE_TERMINATING``) an instance chosen by scale-in
  or ``TerminateInstanceInAutoScalingGroup`` stays ``Terminating:Wait`` (still running) until its
  action is completed with either result, then it is terminated;
- an action not completed within the hook's ``HeartbeatTimeout`` takes the hook's
  ``DefaultResult``; ``RecordLifecycleActionHeartbeat`` restarts that timeout. moto has no clock
  of its own, so expiry is checked whenever the group or its instances are described (the event
  router does that every tick) and on every lifecycle call;
- each pending action has a ``LifecycleActionToken``; AWS hands it out only in the lifecycle
  event, so :func:`pending_actions` lets the in-process event router read it to emit that event.

:func:`install` applies the extension (idempotent; it changes moto's classes for the whole
process). Mixed-instances groups and warm pools keep moto's behaviour.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, NoReturn

LAUNCHING = "autoscaling:EC2_INSTANCE_LAUNCHING"
TERMINATING = "autoscaling:EC2_INSTANCE_TERMINATING"
# instances that count towards the group's desired capacity
IN_CAPACITY = ("Pending", "Pending:Wait", "Pending:Proceed", "InService")

_lock = threading.RLock()  # moto's server handles requests on many threads
# the lifecycle state moto's next new group members start in, while a hooked launch runs on this
# thread (moto creates them InService; setting Pending:Wait afterwards let a reader that does not
# take ``_lock``, moto's describe responses or the lab's estate read, see them InService first)
_new_members = threading.local()
_installed = False
_ATTR = "_ringfence_lifecycle_actions"  # on the region's backend: moto's reset drops it with the backend


@dataclass
class PendingAction:
    """One lifecycle action waiting for ``CompleteLifecycleAction`` (one per hook and instance)."""

    token: str
    group_name: str
    hook_name: str
    instance_id: str
    transition: str
    notification_metadata: str | None
    started_at: float  # wall clock, seconds
    deadline: float  # time.monotonic() at which the hook's default result applies
    heartbeat_timeout: int
    default_result: str

    @property
    def launching(self) -> bool:
        return self.transition == LAUNCHING


def pending_actions(account: str, region: str) -> list[PendingAction]:
    """The lifecycle actions now waiting in ``account``/``region`` (expired ones applied first)."""
    backend = _backend(account, region)
    with _lock:
        _expire(backend)
        return list(_actions(backend).values())


def install() -> None:
    """Teach moto's autoscaling backend lifecycle hooks (once per process)."""
    global _installed
    with _lock:
        if _installed:
            return
        from moto.autoscaling.models import AutoScalingBackend, FakeAutoScalingGroup, InstanceState
        from moto.autoscaling.responses import AutoScalingResponse

        orig_launch = FakeAutoScalingGroup.replace_autoscaling_group_instances
        orig_desired = FakeAutoScalingGroup.set_desired_capacity
        orig_describe_groups = AutoScalingBackend.describe_auto_scaling_groups
        orig_describe_instances = AutoScalingBackend.describe_auto_scaling_instances
        orig_terminate = AutoScalingBackend.terminate_instance
        orig_target_groups = AutoScalingBackend.update_attached_target_groups
        orig_member_init = InstanceState.__init__

        def member_init(self: Any, *args: Any, **kwargs: Any) -> None:
            starts_in = getattr(_new_members, "state", None)
            if starts_in is not None and len(args) < 2 and "lifecycle_state" not in kwargs:
                kwargs["lifecycle_state"] = starts_in
            orig_member_init(self, *args, **kwargs)

        def replace_autoscaling_group_instances(self: Any, count_needed: int, propagated_tags: dict[str, str]) -> None:
            with _lock:
                hooks = _hooks(self.autoscaling_backend, self.name, LAUNCHING)
                if not hooks:
                    orig_launch(self, count_needed, propagated_tags)
                    return
                before = {s.instance.id for s in self.instance_states}
                _new_members.state = "Pending:Wait"
                try:
                    orig_launch(self, count_needed, propagated_tags)
                finally:
                    _new_members.state = None
                for state in self.instance_states:
                    if state.instance.id not in before:
                        _begin(self.autoscaling_backend, self.name, state.instance.id, hooks)

        def set_desired_capacity(self: Any, new_capacity: int | None) -> None:
            with _lock:
                backend = self.autoscaling_backend
                hooked = _hooks(backend, self.name, LAUNCHING) or _hooks(backend, self.name, TERMINATING)
                waiting = any(s.lifecycle_state not in ("InService", "Standby") for s in self.instance_states)
                if self.mixed_instances_policy or not (hooked or waiting):
                    orig_desired(self, new_capacity)
                    return
                # as moto's, but instances waiting on a hook count towards capacity (AWS counts them),
                # and scale-in goes through the terminate hooks
                self.desired_capacity = self.min_size if new_capacity is None else new_capacity
                counted = [s for s in self.instance_states if s.lifecycle_state in IN_CAPACITY]
                delta = (self.desired_capacity or 0) - len(counted)
                if delta > 0:
                    self.replace_autoscaling_group_instances(delta, self.get_propagated_tags())
                elif delta < 0:
                    # AWS's default termination policy prefers instances that are not yet in service
                    order = sorted(counted, key=lambda s: s.lifecycle_state == "InService")
                    for state in [s for s in order if not s.protected_from_scale_in][:-delta]:
                        _leave(backend, self, state)
                if self.name in backend.autoscaling_groups:
                    backend.update_attached_elbs(self.name)
                    backend.update_attached_target_groups(self.name)

        def describe_auto_scaling_groups(self: Any, *args: Any, **kwargs: Any) -> Any:
            with _lock:
                _expire(self)
            return orig_describe_groups(self, *args, **kwargs)

        def describe_auto_scaling_instances(self: Any, *args: Any, **kwargs: Any) -> Any:
            with _lock:
                _expire(self)
            return orig_describe_instances(self, *args, **kwargs)

        def terminate_instance(self: Any, instance_id: str, should_decrement: bool) -> Any:
            from moto.autoscaling.models import TerminateInstanceActivity

            with _lock:
                state = _state_of(self, instance_id)
                if state is None:
                    return orig_terminate(self, instance_id, should_decrement)
                group = state.auto_scaling_group
                if not _hooks(self, group.name, TERMINATING):
                    return orig_terminate(self, instance_id, should_decrement)
                original = group.desired_capacity
                _leave(self, group, state)
                if should_decrement:
                    group.desired_capacity = max((group.desired_capacity or 0) - 1, 0)
                    self.update_attached_elbs(group.name)
                    self.update_attached_target_groups(group.name)
                else:
                    group.set_desired_capacity(group.desired_capacity)  # launches the replacement
                return TerminateInstanceActivity(state.instance, original)

        def update_attached_target_groups(self: Any, group_name: str) -> None:
            # moto registers every instance of the group at once (and never deregisters);
            # AWS registers an instance when it goes InService and deregisters it when it
            # starts leaving, so a load balancer never reaches an instance a hook still holds
            group = self.autoscaling_groups[group_name]
            if not group.target_group_arns or not (
                _hooks(self, group_name, LAUNCHING) or _hooks(self, group_name, TERMINATING)
            ):
                orig_target_groups(self, group_name)
                return
            serving = {s.instance.id for s in group.instance_states if s.lifecycle_state == "InService"}
            for tg in self.elbv2_backend.describe_target_groups(
                target_group_arns=group.target_group_arns, load_balancer_arn=None, names=None
            ):
                registered = set(tg.targets)
                add = serving - registered
                drop = {i for i in registered if i in _member_ids(group) and i not in serving}
                if add:
                    self.elbv2_backend.register_targets(tg.arn, [{"Id": i, "Port": tg.port} for i in sorted(add)])
                if drop:
                    self.elbv2_backend.deregister_targets(tg.arn, [{"Id": i} for i in sorted(drop)])

        def complete_lifecycle_action(self: Any) -> Any:
            from moto.core.responses import EmptyResult

            complete(
                self.autoscaling_backend,
                group_name=self._get_param("AutoScalingGroupName"),
                hook_name=self._get_param("LifecycleHookName"),
                result=self._get_param("LifecycleActionResult"),
                token=self._get_param("LifecycleActionToken"),
                instance_id=self._get_param("InstanceId"),
            )
            return EmptyResult()

        def record_lifecycle_action_heartbeat(self: Any) -> Any:
            from moto.core.responses import EmptyResult

            heartbeat(
                self.autoscaling_backend,
                group_name=self._get_param("AutoScalingGroupName"),
                hook_name=self._get_param("LifecycleHookName"),
                token=self._get_param("LifecycleActionToken"),
                instance_id=self._get_param("InstanceId"),
            )
            return EmptyResult()

        FakeAutoScalingGroup.replace_autoscaling_group_instances = replace_autoscaling_group_instances  # type: ignore[method-assign]
        InstanceState.__init__ = member_init  # type: ignore[method-assign]
        FakeAutoScalingGroup.set_desired_capacity = set_desired_capacity  # type: ignore[method-assign]
        AutoScalingBackend.describe_auto_scaling_groups = describe_auto_scaling_groups  # type: ignore[method-assign]
        AutoScalingBackend.describe_auto_scaling_instances = describe_auto_scaling_instances  # type: ignore[method-assign]
        AutoScalingBackend.terminate_instance = terminate_instance  # type: ignore[method-assign]
        AutoScalingBackend.update_attached_target_groups = update_attached_target_groups  # type: ignore[method-assign]
        AutoScalingResponse.complete_lifecycle_action = complete_lifecycle_action  # type: ignore[attr-defined]
        AutoScalingResponse.record_lifecycle_action_heartbeat = record_lifecycle_action_heartbeat  # type: ignore[attr-defined]
        _installed = True


# --- the actions ---------------------------------------------------------------------------------


def complete(
    backend: Any,
    *,
    group_name: str,
    hook_name: str,
    result: str,
    token: str | None = None,
    instance_id: str | None = None,
) -> None:
    """``CompleteLifecycleAction``: ``CONTINUE`` or ``ABANDON`` the named action."""
    if result not in ("CONTINUE", "ABANDON"):
        _invalid(f"LifecycleActionResult must be CONTINUE or ABANDON, not {result!r}")
    with _lock:
        _expire(backend)
        action = _find(backend, group_name, hook_name, token, instance_id)
        _resolve(backend, action, result)


def heartbeat(
    backend: Any, *, group_name: str, hook_name: str, token: str | None = None, instance_id: str | None = None
) -> None:
    """``RecordLifecycleActionHeartbeat``: restart the action's timeout."""
    with _lock:
        _expire(backend)
        action = _find(backend, group_name, hook_name, token, instance_id)
        action.deadline = time.monotonic() + action.heartbeat_timeout


def _backend(account: str, region: str) -> Any:
    from moto.autoscaling.models import autoscaling_backends

    return autoscaling_backends[account][region]


def _actions(backend: Any) -> dict[str, PendingAction]:
    acts: dict[str, PendingAction] = backend.__dict__.setdefault(_ATTR, {})
    return acts


def _hooks(backend: Any, group_name: str, transition: str) -> list[Any]:
    return [
        h
        for h in backend.lifecycle_hooks.values()
        if h.auto_scaling_group_name == group_name and h.lifecycle_transition == transition
    ]


def _state_of(backend: Any, instance_id: str) -> Any:
    for group in backend.autoscaling_groups.values():
        for state in group.instance_states:
            if state.instance.id == instance_id:
                return state
    return None


def _member_ids(group: Any) -> set[str]:
    return {s.instance.id for s in group.instance_states}


def _begin(backend: Any, group_name: str, instance_id: str, hooks: list[Any]) -> None:
    now = time.monotonic()
    for h in hooks:
        token = str(uuid.uuid4())
        _actions(backend)[token] = PendingAction(
            token=token,
            group_name=group_name,
            hook_name=h.name,
            instance_id=instance_id,
            transition=h.lifecycle_transition,
            notification_metadata=getattr(h, "notification_metadata", None),
            started_at=time.time(),
            deadline=now + int(h.heartbeat_timeout),
            heartbeat_timeout=int(h.heartbeat_timeout),
            default_result=str(h.default_result),
        )


def _leave(backend: Any, group: Any, state: Any) -> None:
    """Take an instance out of the group: through the terminate hooks when there are any."""
    hooks = _hooks(backend, group.name, TERMINATING)
    if hooks:
        state.lifecycle_state = "Terminating:Wait"
        _begin(backend, group.name, state.instance.id, hooks)
    else:
        _terminate(backend, group, state)


def _terminate(backend: Any, group: Any, state: Any) -> None:
    group.instance_states = [s for s in group.instance_states if s is not state]
    backend.ec2_backend.terminate_instances([state.instance.id])


def _find(backend: Any, group_name: str, hook_name: str, token: str | None, instance_id: str | None) -> PendingAction:
    if not token and not instance_id:
        _invalid("either LifecycleActionToken or InstanceId must be given")
    for action in _actions(backend).values():
        if (
            action.group_name == group_name
            and action.hook_name == hook_name
            and (not token or action.token == token)
            and (not instance_id or action.instance_id == instance_id)
        ):
            return action
    what = f"token {token}" if token else f"instance {instance_id}"
    _invalid(f"No active Lifecycle Action found with {what} (hook {hook_name} of group {group_name})")


def _resolve(backend: Any, action: PendingAction, result: str) -> None:
    acts = _actions(backend)
    acts.pop(action.token, None)
    state = _state_of(backend, action.instance_id)
    if state is None:  # the instance left the group meanwhile
        return
    group = state.auto_scaling_group
    if action.launching:
        if result == "ABANDON":
            for other in [a for a in acts.values() if a.instance_id == action.instance_id]:
                acts.pop(other.token, None)
            _terminate(backend, group, state)
            group.set_desired_capacity(group.desired_capacity)  # AWS launches a replacement
        elif not any(a.instance_id == action.instance_id for a in acts.values()):
            state.lifecycle_state = "InService"
    elif not any(a.instance_id == action.instance_id for a in acts.values()):
        _terminate(backend, group, state)  # either result: the instance goes
    if group.name in backend.autoscaling_groups:
        backend.update_attached_elbs(group.name)
        backend.update_attached_target_groups(group.name)


def _expire(backend: Any) -> None:
    now = time.monotonic()
    for action in [a for a in _actions(backend).values() if a.deadline <= now]:
        if action.token in _actions(backend):
            _resolve(backend, action, action.default_result)


def _invalid(message: str) -> NoReturn:
    from moto.autoscaling.exceptions import ValidationError

    raise ValidationError(message)
