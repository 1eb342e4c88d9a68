"""Private PostgreSQL and MariaDB servers for the server restart test: each is a new instance
of the machine's server binaries with its own data directory, socket and loopback port, so the
test can really stop and start it without touching the shared servers other tests (and other
test runs) use.

As root, the servers run as the ``postgres`` / ``mysql`` system user (PostgreSQL refuses to run
as root).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

START_SECONDS = 120


class ServerUnavailable(Exception):
    """The server binaries are missing, or the private server did not start."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _accepts(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _run(argv: list[str], what: str, **kwargs: object) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise ServerUnavailable(f"{what} failed ({result.returncode}): {result.stderr[-2000:]}")


class _Private:
    """A private server in a temporary directory, owned by ``user`` when running as root."""

    user: str

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix=f"ptbs-{self.user}-"))
        self.port = free_port()
        self._as: list[str] = []
        if os.geteuid() == 0:
            account = pwd.getpwnam(self.user)
            os.chmod(self.root, 0o755)
            os.chown(self.root, account.pw_uid, account.pw_gid)
            self._as = ["runuser", "-u", self.user, "--"]

    def _wait(self, up: bool, what: str) -> None:
        deadline = time.monotonic() + START_SECONDS
        while _accepts(self.port) != up:
            if time.monotonic() > deadline:
                raise ServerUnavailable(f"{what} within {START_SECONDS} s; see {self.root}")
            time.sleep(0.1)

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self.cut()
        shutil.rmtree(self.root, ignore_errors=True)

    def cut(self) -> None:
        raise NotImplementedError

    def restore(self) -> None:
        raise NotImplementedError


class PrivatePostgreSQL(_Private):
    """``initdb`` + ``pg_ctl`` in a temporary directory, on a free loopback port."""

    user = "postgres"

    def __init__(self) -> None:
        candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        pg_ctl = shutil.which("pg_ctl") or (candidates[-1] if candidates else None)
        if pg_ctl is None:
            raise ServerUnavailable("no PostgreSQL server binaries (pg_ctl, initdb)")
        self.bin = Path(pg_ctl).parent
        super().__init__()
        self.data = self.root / "data"
        _run(
            [
                *self._as,
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            "initdb",
        )
        self.restore()

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def cut(self) -> None:
        _run(
            [
                *self._as,
                str(self.bin / "pg_ctl"),
                "-D",
                str(self.data),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
            "pg_ctl stop",
        )
        self._wait(False, "PostgreSQL did not stop")

    def restore(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        _run(
            [
                *self._as,
                str(self.bin / "pg_ctl"),
                "-D",
                str(self.data),
                "-o",
                options,
                "-l",
                str(self.root / "server.log"),
                "-w",
                "start",
            ],
            "pg_ctl start",
        )
        self._wait(True, "PostgreSQL did not start")


class PrivateMariaDB(_Private):
    """``mariadb-install-db`` + ``mariadbd`` with its own data directory, socket and port."""

    user = "mysql"

    def __init__(self) -> None:
        install = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
        server = shutil.which("mariadbd") or (
            "/usr/sbin/mariadbd" if Path("/usr/sbin/mariadbd").exists() else None
        )
        if install is None or server is None:
            raise ServerUnavailable("no MariaDB server binaries (mariadb-install-db, mariadbd)")
        self.server = server
        super().__init__()
        self.data = self.root / "data"
        self._process: subprocess.Popen[bytes] | None = None
        user = ["--user=" + self.user] if os.geteuid() == 0 else []
        _run(
            [
                install,
                "--no-defaults",
                f"--datadir={self.data}",
                "--skip-test-db",
                "--auth-root-authentication-method=normal",
                *user,
            ],
            "mariadb-install-db",
        )
        self.restore()

    @property
    def url(self) -> str:
        return f"mysql+asyncmy://root@127.0.0.1:{self.port}/mysql"

    def cut(self) -> None:
        if self._process is None:
            return
        self._process.send_signal(signal.SIGTERM)
        self._process.wait(START_SECONDS)
        self._process = None
        self._wait(False, "MariaDB did not stop")

    def restore(self) -> None:
        user = ["--user=" + self.user] if os.geteuid() == 0 else []
        log = (self.root / "server.log").open("ab")
        self._process = subprocess.Popen(
            [
                self.server,
                "--no-defaults",
                f"--datadir={self.data}",
                f"--socket={self.root / 'mariadb.sock'}",
                f"--pid-file={self.root / 'mariadb.pid'}",
                f"--port={self.port}",
                "--bind-address=127.0.0.1",
                "--skip-grant-tables",
                "--skip-name-resolve",
                "--innodb-flush-log-at-trx-commit=0",
                *user,
            ],
            stdout=log,
            stderr=log,
        )
        log.close()
        try:
            self._wait(True, "MariaDB did not start")
        except ServerUnavailable:
            if self._process.poll() is not None:
                self._process = None
            raise
