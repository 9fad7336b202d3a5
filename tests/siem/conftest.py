from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="session")
def moto_url(embedded: Any) -> str:
    """The session's moto server (tests/conftest.py's ``embedded``): EventBridge, SQS, CloudWatch Logs."""
    return str(embedded.url)
