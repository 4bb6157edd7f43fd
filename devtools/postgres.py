"""A throwaway PostgreSQL cluster (Debian's postgresql): for the tests of the PostgreSQL state backend, the
benchmarks (bench/db_driver.py, bench/ha_perf.py) and `make demo-ha`.

The cluster lives in a directory of its own (/tmp/netboot-pg-PID-N unless told), listens on a Unix socket in it
and nowhere else, and is removed with it. PostgreSQL refuses to run as root, so when the tests run as root its
processes run as user nobody, who owns the data and socket directories; the directory above them is 0755 for
nobody to reach. Every process started here is stopped by its PID.

Roles: `postgres`, the superuser, reached without a password by the user running the tests and by the cluster's
own user (peer authentication through an ident map), and `netboot`, which owns the database `netboot` and must
give its password (scram-sha-256), as any other role must.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

NOBODY = 65534
SUPERUSER = "postgres"
PORT = 5432  # (the socket's name only: nothing listens on TCP, and the socket directory is the cluster's own)
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


class ClusterError(RuntimeError):
    """The cluster cannot be made or run here; the message names what is missing and how to get it."""


def postgres_bin() -> Path:
    """The newest of Debian's PostgreSQL installations (/usr/lib/postgresql/VERSION/bin): missing is an error (a
    failure in the tests, never a skip)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if not found:
        raise ClusterError("PostgreSQL is not installed: no /usr/lib/postgresql/*/bin/postgres "
                    "(Debian's postgresql; make test installs it)")
    return found[-1].parent


class Cluster:
    """One PostgreSQL cluster: `with Cluster() as pg:` starts it (made at the first start) and removes it at the
    end. `fsync=False` trades durability for speed; it stays on unless asked, as durability is part of what the
    state backend's tests check."""

    _made = 0  # clusters made by this process: the N of /tmp/netboot-pg-PID-N

    def __init__(self, base: Path | None = None, *, fsync: bool = True) -> None:
        self.bin = postgres_bin()
        self.fsync = fsync
        self.password = secrets.token_urlsafe(16)  # the role netboot's
        if base is None:
            Cluster._made += 1
            base = Path(tempfile.gettempdir()) / f"netboot-pg-{os.getpid()}-{Cluster._made}"
        self.base = base
        self.data = base / "data"
        self.socket_dir = base / "socket"
        self.log = base / "postgres.log"
        self.port = PORT
        # PostgreSQL refuses root; as root the cluster runs as nobody (its directories nobody's).
        self.uid = NOBODY if os.geteuid() == 0 else os.geteuid()
        self.process: subprocess.Popen[bytes] | None = None
        self._initialized = False

    # -- life cycle

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.remove()

    def start(self) -> None:
        """Start the server (making the cluster first, the first time) and wait until it accepts connections."""
        if self.process is not None:
            raise RuntimeError("the cluster is already running")
        if not self._initialized:
            self._init()
        self._launch()
        if not self._initialized:
            self.psql(f"CREATE ROLE netboot LOGIN PASSWORD '{self.password}'", database="postgres")
            self.psql("CREATE DATABASE netboot OWNER netboot", database="postgres")
            self._initialized = True

    def stop(self) -> None:
        """Fast shutdown (SIGINT: sessions are ended, then a checkpoint); SIGKILL if it takes too long."""
        process = self.process
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(
                f"PostgreSQL did not stop within {STOP_TIMEOUT:.0f} s; killed\n{self.log_text()[-3000:]}") from None
        self.process = None

    def kill(self) -> None:
        """A crash: SIGKILL to the postmaster and to every process it has started, with no shutdown; the next
        start recovers from the WAL."""
        process = self.process
        if process is None:
            return
        # Stopped first, so that it starts no child while they are listed: its children make themselves session
        # leaders (InitPostmasterChild), so neither the process group nor the session reaches them.
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGSTOP)
        children = _children(process.pid)
        for pid in (process.pid, *children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait()
        self.process = None
        # A child still alive keeps the shared memory attached, and a new postmaster would refuse to start.
        deadline = time.monotonic() + STOP_TIMEOUT
        while any(_alive(pid) for pid in children):
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL's processes {children} outlived SIGKILL")
            time.sleep(0.01)

    def restart(self) -> None:
        self.stop()
        self.start()

    def remove(self) -> None:
        """Stop the server if it runs (fast shutdown) and remove its directory."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    # -- connecting

    @property
    def url(self) -> str:
        """The libpq URL of the database netboot as the role netboot, its password included (it connects as is,
        with asyncpg, psycopg or `netboot serve --database`)."""
        return self.url_for("netboot", "netboot", self.password)

    def url_for(self, database: str, user: str = "netboot", password: str | None = None) -> str:
        """A libpq URL of `database` on this cluster as `user`, with `password` if given (none when None)."""
        auth = quote(user, safe="") + (f":{quote(password, safe='')}" if password is not None else "")
        return (f"postgresql://{auth}@/{quote(database, safe='')}"
                f"?host={quote(str(self.socket_dir), safe='/')}&port={self.port}")

    def psql(self, sql: str, database: str = "netboot") -> str:
        """`psql -Atc SQL` as the superuser; its output without the final newline. An error raises, with psql's
        message."""
        proc = subprocess.run(
            [str(self.bin / "psql"), "-X", "-At", "-v", "ON_ERROR_STOP=1", "-h", str(self.socket_dir),
             "-p", str(self.port), "-U", SUPERUSER, "-d", database, "-c", sql],
            capture_output=True, text=True, timeout=60, env=_environment())
        if proc.returncode != 0:
            raise RuntimeError(f"psql failed ({sql!r}): {proc.stderr.strip()}")
        return proc.stdout.removesuffix("\n")

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- inside

    def _as_owner(self) -> list[str]:
        if self.uid == os.geteuid():
            return []
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            raise ClusterError("setpriv is not installed (util-linux; make test installs it)")
        return [setpriv, f"--reuid={self.uid}", f"--regid={self.uid}", "--clear-groups"]

    def _init(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.base.chmod(0o755)
        if self.uid != os.geteuid() and not _reachable_by_others(self.base):
            raise ClusterError(f"{self.base} is out of reach of the cluster's user (uid {self.uid}): "
                        "give a base whose every parent others may enter")
        for d in (self.data, self.socket_dir):
            d.mkdir(mode=0o700, exist_ok=True)
            os.chown(d, self.uid, -1)
        # --no-sync: nothing of initdb's needs to reach the disk (a crash here loses the whole throwaway cluster
        # anyway), and it saves a second; the server itself keeps fsync unless told.
        proc = subprocess.run(
            [*self._as_owner(), str(self.bin / "initdb"), "-D", str(self.data), "-U", SUPERUSER, "-E", "UTF8",
             "--locale=C", "--no-sync", "--no-instructions", "--auth=reject"],
            capture_output=True, text=True, timeout=120, env=_environment())
        if proc.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{proc.stdout}{proc.stderr}")
        owner = pwd.getpwuid(self.uid).pw_name
        me = pwd.getpwuid(os.geteuid()).pw_name
        # The superuser is reached by peer authentication (the kernel's word on the connecting user) mapped to
        # postgres; every other role gives its password. Local socket connections only: nothing listens on TCP.
        (self.data / "pg_ident.conf").write_text(
            "".join(f"tests {user} {SUPERUSER}\n" for user in sorted({owner, me})))
        (self.data / "pg_hba.conf").write_text(
            f"local all {SUPERUSER} peer map=tests\n"
            "local all all scram-sha-256\n")

    def _launch(self) -> None:
        settings = {
            "listen_addresses": "",
            "unix_socket_directories": str(self.socket_dir),
            "port": str(self.port),
            "fsync": "on" if self.fsync else "off",
            "shared_buffers": "16MB",
            "max_connections": "50",
            "password_encryption": "scram-sha-256",
        }
        options = [f"--{name.replace('_', '-')}={value}" for name, value in settings.items()]
        with open(self.log, "ab") as log:
            # setpriv execs postgres: the PID started here is the postmaster's.
            self.process = subprocess.Popen(
                [*self._as_owner(), str(self.bin / "postgres"), "-D", str(self.data), *options],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, env=_environment())
        deadline = time.monotonic() + START_TIMEOUT
        while not self._ready():
            if self.process.poll() is not None:
                self.process = None
                raise RuntimeError(f"PostgreSQL exited at start:\n{self.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"PostgreSQL was not ready within {START_TIMEOUT:.0f} s:\n{self.log_text()[-3000:]}")
            time.sleep(0.01)

    def _ready(self) -> bool:
        """Whether postmaster.pid says "ready" (its status line, the one pg_ctl -w waits for), written by this
        postmaster."""
        try:
            lines = (self.data / "postmaster.pid").read_text().splitlines()
        except (FileNotFoundError, PermissionError):
            return False
        assert self.process is not None
        return len(lines) >= 8 and lines[0] == str(self.process.pid) and lines[7].strip() == "ready"


def _environment() -> dict[str, str]:
    """This process's environment without libpq's PG* variables, which would redirect psql, and with a locale
    every Debian has."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C.UTF-8", LANG="C.UTF-8")
    return env


def _children(pid: int) -> list[int]:
    found = []
    for status in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # The command name (2nd field) is in parentheses and may hold spaces: the parent is after the last ")".
            if int(status.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(status.parent.name))
    return found


def _alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie, dead but not yet reaped by its new parent, has let go of everything)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _reachable_by_others(path: Path) -> bool:
    return all(os.stat(p).st_mode & 0o001 for p in (path, *path.parents))
