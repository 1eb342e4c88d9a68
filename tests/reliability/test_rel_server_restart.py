"""Scenario 2, literally: the local PostgreSQL or MariaDB server is stopped for a few seconds
while updates flow, then started again.

This stops the shared server of the machine, so it runs in CI (``CI=true``, where this suite is
the only client) or when ``PTB_SESSIONS_RESTART_SERVERS=1`` is set; elsewhere it is skipped with
that reason, and ``test_rel_outage.py`` covers the same failure through a TCP proxy cut.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

import pytest
from test_rel_outage import check_outage

ALLOWED = os.environ.get("CI", "").lower() in ("1", "true", "yes") or (
    os.environ.get("PTB_SESSIONS_RESTART_SERVERS") == "1"
)


def _wait(command: list[str], what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if subprocess.run(command, capture_output=True, check=False).returncode == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} did not come back within {seconds} s")


class Server:
    """Stops and starts the local server of ``backend`` with the machine's own commands."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self._ready = (
            ["pg_isready", "-h", "127.0.0.1", "-p", "5432", "-q"]
            if backend == "postgresql"
            else ["mysqladmin", "-uroot", "-h127.0.0.1", "status"]
        )

    def cut(self) -> None:
        if self.backend == "postgresql":
            version = sorted(os.listdir("/etc/postgresql"))[-1]
            subprocess.run(
                [
                    "pg_ctlcluster",
                    "--skip-systemctl-redirect",
                    version,
                    "main",
                    "stop",
                    "-m",
                    "fast",
                ],
                check=True,
                capture_output=True,
            )
        else:
            subprocess.run(
                ["mysqladmin", "-uroot", "-h127.0.0.1", "shutdown"],
                check=True,
                capture_output=True,
            )
            _wait(["sh", "-c", "! pgrep -x mariadbd"], "MariaDB's shutdown", 60)

    def restore(self) -> None:
        if subprocess.run(self._ready, capture_output=True, check=False).returncode == 0:
            return  # already running
        if self.backend == "postgresql":
            version = sorted(os.listdir("/etc/postgresql"))[-1]
            subprocess.run(
                ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"],
                check=True,
                capture_output=True,
            )
            _wait(self._ready, "PostgreSQL")
        else:
            subprocess.run(
                [
                    "start-stop-daemon",
                    "--start",
                    "--oknodo",
                    "--background",
                    "--exec",
                    "/usr/sbin/mariadbd",
                ],
                check=True,
                capture_output=True,
            )
            _wait(self._ready, "MariaDB")


@pytest.mark.skipif(
    not ALLOWED,
    reason="stops the shared database server: runs with CI=true or "
    "PTB_SESSIONS_RESTART_SERVERS=1 (test_rel_outage.py covers the same failure by a TCP cut)",
)
@pytest.mark.skipif(not Path("/etc/postgresql").exists(), reason="no local server to restart")
@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_server_stopped_and_started_while_updates_flow(db_url: str, backend: str) -> None:
    server = Server(backend)
    try:
        report = asyncio.run(check_outage(db_url, db_url, server))  # type: ignore[arg-type]
    finally:
        server.restore()  # whatever happened, leave the server running for the other tests
    assert report["running"]
