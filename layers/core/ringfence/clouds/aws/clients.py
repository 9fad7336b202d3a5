"""boto3 clients with retries, one shared session (tests hook botocore events on it).

Endpoints come from the standard ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_<SERVICE>``
variables, so the same code talks to AWS or to a moto server.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import cache
from typing import Any

import boto3
import botocore.loaders
import botocore.session
from botocore.config import Config
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.exceptions import HTTPClientError

# A Lambda container serves one request at a time, but `ringfence serve` and the local router call
# from many threads: botocore's default pool of 10 connections then opens and closes a connection
# per call beyond ten (long-polls hold threads), so the pool is as large as serve's thread pool.
MAX_POOL_CONNECTIONS = 64
RETRIES = Config(
    retries={"mode": "standard", "max_attempts": int(os.environ.get("RINGFENCE_AWS_MAX_ATTEMPTS", "6"))},
    max_pool_connections=MAX_POOL_CONNECTIONS,
)
# A batch's reads (ingest's and lifecycle's describes): the batch shares the function's time with
# other accounts' events, and whoever administers an account throttles its EC2 at will (EC2 limits
# per account and Region, our assumed role included; in the control account, its operators' load
# and Ringfence's own reconcile). The standard retries above back off ~25 s per throttled call (up
# to ~50 s). A batch client makes one call itself and retries only as the read's window allows
# (:func:`retry_window`): so many calls in all, and never a backoff that ends inside the batch's
# reserve; then the call's error is raised and the batch fails that place's events at once
# (``ringfence.clouds.aws.ingest.PlaceUnavailable``), for the queue to retry.
BATCH_READS = RETRIES.merge(
    Config(retries={"mode": "standard", "total_max_attempts": 1}, connect_timeout=3, read_timeout=10)
)
# calls in all of a batch read outside a window (botocore's retry backoff: ≤ 1 + 2 s)
BATCH_READ_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class RetryWindow:
    """What a batch read's retries may use: ``attempts`` calls in all; ``seconds_left``: how long
    until the batch's deadline (it or its answer None: no deadline)."""

    attempts: int
    seconds_left: Callable[[], float | None] | None = None


_window: ContextVar[RetryWindow | None] = ContextVar("ringfence_retry_window", default=None)


@contextmanager
def retry_window(attempts: int, seconds_left: Callable[[], float | None] | None) -> Iterator[None]:
    """The batch clients' calls made inside retry as ``attempts`` and ``seconds_left`` allow."""
    token = _window.set(RetryWindow(attempts, seconds_left))
    try:
        yield
    finally:
        _window.reset(token)


# botocore standard mode's retryable answers (botocore.retries.standard)
_THROTTLED = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "TransactionInProgressException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "LimitExceededException",
        "RequestThrottled",
        "SlowDown",
        "PriorRequestNotComplete",
        "EC2ThrottledException",
        "RequestTimeout",
        "RequestTimeoutException",
    }
)


def _retryable(response: Any, caught_exception: Any) -> bool:
    if caught_exception is not None:
        return isinstance(caught_exception, (BotoConnectionError, HTTPClientError))
    if not response:
        return False
    http, parsed = response
    code = (parsed or {}).get("Error", {}).get("Code")
    return code in _THROTTLED or getattr(http, "status_code", 0) in (500, 502, 503, 504)


def _retry_batch_read(attempts: int, response: Any = None, caught_exception: Any = None, **_: Any) -> float | None:
    """botocore's ``needs-retry`` for a batch client: the seconds to back off before calling again
    (standard mode's backoff: up to 1, 2, 4 … 20 s), or None to raise the call's error now."""
    window = _window.get() or RetryWindow(BATCH_READ_ATTEMPTS)
    if attempts >= window.attempts or not _retryable(response, caught_exception):
        return None
    delay = random.random() * min(2.0 ** (attempts - 1), 20.0)  # noqa: S311 (jitter, not a secret)
    left = window.seconds_left() if window.seconds_left is not None else None
    if left is not None and left - delay <= 0:
        # a retry would start inside the batch's reserve: the error now, so its place fails the
        # batch and the batch still ends, handing on what it did, before the invocation's timeout
        return None
    return delay


# One loader of botocore's service models for every session this process makes: a session loads
# (JSON-decodes) each service's model afresh, tens of milliseconds for EC2's; the local lab and the
# tests start a new session with every cold start of the functions (``reset``).
_LOADER = botocore.loaders.create_loader()


@cache
def session() -> boto3.Session:
    core = botocore.session.get_session()
    core.register_component("data_loader", _LOADER)
    made = boto3.Session(botocore_session=core)
    # boto3 appends its own data path to the loader at each session: once is enough
    paths = _LOADER.search_paths
    paths[:] = list(dict.fromkeys(paths))
    return made


_clients: dict[tuple[str, str | None, bool], Any] = {}
_assumed: dict[tuple[str, str, str, bool], tuple[float, Any]] = {}
# A boto3 session is not safe to create clients from several threads at once (boto3's docs), and
# serve's threads all want the same clients when a fleet enrolls together: each one built its own
# (a service model load each, ~30 ms of CPU). One lock, taken only to make a client.
_making = threading.RLock()


def client(
    service: str, *, region: str | None = None, credentials: dict[str, str] | None = None, batch: bool = False
) -> Any:
    """A client of this session (cached: creating clients is slow), or one with given credentials;
    ``batch``: a batch's reads, retried within their window (:func:`retry_window`)."""
    kwargs: dict[str, Any] = {"config": BATCH_READS if batch else RETRIES}
    if region:
        kwargs["region_name"] = region
    if credentials:
        kwargs.update(
            aws_access_key_id=credentials["AccessKeyId"],
            aws_secret_access_key=credentials["SecretAccessKey"],
            aws_session_token=credentials["SessionToken"],
        )
        with _making:
            return _made(session().client(service, **kwargs), batch)
    key = (service, region, batch)
    made = _clients.get(key)
    if made is None:
        with _making:
            made = _clients.get(key)
            if made is None:
                made = _clients[key] = _made(session().client(service, **kwargs), batch)
    return made


def _made(c: Any, batch: bool) -> Any:
    if batch:
        event = f"needs-retry.{c.meta.service_model.service_id.hyphenize()}"
        c.meta.events.register(event, _retry_batch_read, unique_id="ringfence-batch-read")
    return c


def resource(service: str, *, region: str | None = None) -> Any:
    with _making:
        return session().resource(service, config=RETRIES, region_name=region)


def assumed_client(
    service: str, region: str, role_arn: str | None, session_name: str = "ringfence", *, batch: bool = False
) -> Any:
    """A client in another account through an assumable role (``None``: this account); the
    role's credentials are reused until five minutes before they expire. ``batch``: a batch's
    reads (:func:`client`)."""
    if not role_arn:
        return client(service, region=region, batch=batch)
    key = (service, region, role_arn, batch)
    cached = _assumed.get(key)
    if cached is not None and cached[0] > time.time() + 300:
        return cached[1]
    with _making:  # one AssumeRole for the threads that all found the role's client missing
        cached = _assumed.get(key)
        if cached is not None and cached[0] > time.time() + 300:
            return cached[1]
        # the role's credentials serve its clients of every service (reconcile reads EC2 and Auto
        # Scaling through one member role): one AssumeRole, kept under the service ""
        held = _assumed.get(("", region, role_arn, False))
        if held is not None and held[0] > time.time() + 300:
            expires, creds = held
        else:
            sts = client("sts", region=region)
            creds = sts.assume_role(RoleArn=role_arn, RoleSessionName=session_name)["Credentials"]
            exp = creds["Expiration"]
            expires = exp.timestamp() if hasattr(exp, "timestamp") else time.time() + 900
            _assumed[("", region, role_arn, False)] = (expires, creds)
        c = client(service, region=region, credentials=creds, batch=batch)
        _assumed[key] = (expires, c)
        return c


def reset() -> None:
    """Forget cached clients (tests; a new endpoint or new credentials), closing their pooled
    connections: a server that keeps connections alive keeps them until the client closes."""
    for c in [*_clients.values(), *(made for (service, *_), (_, made) in _assumed.items() if service)]:
        c.close()
    _clients.clear()
    _assumed.clear()
    session.cache_clear()
