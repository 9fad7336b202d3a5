"""Perimeter: the coarse security groups. Two triggers, one function (reserved concurrency 1, so
runs never interleave their changes to an interface's group list):

* the perimeter queue (the event path): workloads that ingest or lifecycle saw change get their
  groups on every ENI; a launch lifecycle action is handed on to compute only after that;
* the schedule: the converging full reconcile, which also removes groups without purpose.

Quotas are checked before changing anything; an interface over a quota (or needing a group that
cannot be made) is skipped and named, the rest of the plan is applied, PerimeterPlanRefused is
counted and that instance's launch is not handed on. An account/Region that fails (its role, STS or
EC2) is reported failed (PerimeterPlacesFailed) and the others are reconciled: on the queue, a
message naming only failed places is handed back for a retry, one naming others too is done for
those and the failed part is sent again on its own.
What changed is logged one line per change ("perimeter: sg-… attached to i-… (2 ENIs)"), counted
in metrics, and returned by the scheduled run; a group taken back (a stopped run's) or adopted (an
earlier version's) is audited too, before its record is written, and so is every change, one
``perimeter.apply`` record per account/Region and run before its first change (none in a dry run)."""

from __future__ import annotations

import json
import os
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.parser import parse
from aws_lambda_powertools.utilities.parser.models import SqsModel
from pydantic import ValidationError

from ringfence.clouds.aws.perimeter import Perimeter, PerimeterMessage
from ringfence.clouds.aws.wiring import Wiring
from ringfence.control.wiring import Config
from ringfence.perimeter import PerimeterConfig
from ringfence.textsafe import json_line

logger = Logger(json_serializer=json_line)  # escaped: ringfence.textsafe
tracer = Tracer()
metrics = Metrics()
_svc: dict[str, Perimeter] = {}


def service() -> Perimeter:
    config = PerimeterConfig.model_validate_json(os.environ.get("RINGFENCE_PERIMETER_CONFIG") or "{}")
    if "perimeter" not in _svc:
        _svc["perimeter"] = Perimeter(
            Wiring(Config.from_env()), config, lambda n, v: metrics.add_metric(name=n, unit=MetricUnit.Count, value=v)
        )
    _svc["perimeter"].config = config
    return _svc["perimeter"]


def _dry_run() -> bool:
    return os.environ.get("RINGFENCE_PERIMETER_DRY_RUN") == "true"


def _log(results: list[dict[str, Any]]) -> None:
    for r in results:
        summary = {k: r.get(k) for k in ("account", "region", "scope", "applied", "plan", "violations")}
        if r.get("lookalikes"):
            logger.error(
                "perimeter groups refused: our tag and name, no record", extra=summary | {"groups": r["lookalikes"]}
            )
        if r.get("adopted"):
            logger.warning("perimeter groups adopted (made before records)", extra=summary | {"groups": r["adopted"]})
        if r.get("taken_back"):
            logger.warning(
                "perimeter groups taken back (made by a run stopped before recording them)",
                extra=summary | {"groups": r["taken_back"]},
            )
        if r.get("failed"):
            logger.error("perimeter failed for this account/region", extra=summary | {"reason": r["failed"]})
        elif r.get("violations") and "plan" not in r:
            logger.error("perimeter plan refused: nothing changed", extra=summary)
        elif r.get("violations"):
            logger.error(
                "perimeter reconciled but for what breaks a limit (left as it was)",
                extra=summary | {"refused": r.get("refused"), "changes": [c["text"] for c in r["changes"]]},
            )
        else:
            logger.info("perimeter reconciled", extra=summary | {"changes": [c["text"] for c in r["changes"]]})


def _queue(event: dict[str, Any]) -> dict[str, Any]:
    batch = parse(event=event, model=SqsModel)
    messages, message_ids, failures = [], [], []
    for rec in batch.Records:
        try:
            messages.append(PerimeterMessage.model_validate(json.loads(rec.body)))
            message_ids.append(rec.messageId)
        except (ValueError, ValidationError) as exc:  # ours to fix: let it redrive to the DLQ
            logger.error("malformed perimeter message", extra={"message_id": rec.messageId, "reason": str(exc)})
            failures.append(rec.messageId)
    try:
        out = service().react(messages, dry_run=_dry_run())
    except Exception:
        logger.exception("perimeter failed; the batch will be retried (its lifecycle actions wait)")
        return {"batchItemFailures": [{"itemIdentifier": r.messageId} for r in batch.Records]}
    _log(out.results)
    if out.lifecycles_forwarded or out.lifecycles_left_to_timeout:
        logger.info(
            "launch lifecycle actions",
            extra={"to_compute": out.lifecycles_forwarded, "left_to_time_out": out.lifecycles_left_to_timeout},
        )
    if out.requeued:
        logger.warning("workloads of failed places sent again on their own", extra={"workloads": out.requeued})
    # messages naming only failed places: retried by SQS, then its DLQ (alarmed)
    failures += [message_ids[n] for n in out.retry]
    return {"batchItemFailures": [{"itemIdentifier": m} for m in failures]}


@logger.inject_lambda_context
@tracer.capture_lambda_handler(capture_response=False, capture_error=False)  # answers hold tokens
@metrics.log_metrics
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    if "Records" in event:
        return _queue(event)
    # anything else is the schedule (EventBridge Scheduler's payload carries nothing we need)
    results = service().run(dry_run=_dry_run())
    _log(results)
    return {"results": results}
