"""Scenario 2, literally: the PostgreSQL or MariaDB server is stopped for a few seconds while
updates flow, then started again.

The server is a private instance the test starts from the machine's server binaries (its own
data directory, socket and loopback port; ``_private_servers.py``), so stopping it disturbs
no other test, worker or test run. Without the binaries the test is skipped with the reason,
except with ``CI=true``, where it fails.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import pytest
from _private_servers import PrivateMariaDB, PrivatePostgreSQL, ServerUnavailable
from test_rel_outage import check_outage

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture
def private_server(backend: str) -> Iterator[PrivatePostgreSQL | PrivateMariaDB]:
    """A private server of ``backend``, removed with its data afterwards."""
    try:
        server = PrivatePostgreSQL() if backend == "postgresql" else PrivateMariaDB()
    except (ServerUnavailable, OSError, KeyError) as exc:
        reason = f"cannot start a private {backend} server: {exc}"
        if IN_CI:
            pytest.fail(f"CI=true and {reason}")
        pytest.skip(reason)
    try:
        yield server
    finally:
        server.cleanup()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_server_stopped_and_started_while_updates_flow(
    private_server: PrivatePostgreSQL | PrivateMariaDB,
) -> None:
    url = private_server.url
    report = asyncio.run(check_outage(url, url, private_server))  # type: ignore[arg-type]
    assert report["running"]
