"""Shared helpers: the real `netboot` command, real systems built with Nix, real QEMU boots and servers."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import logging
import lzma
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import sysconfig
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

import pytest

from devtools import qemu
from netboot.cli import main as netboot_main

ROOT = Path(__file__).resolve().parent.parent
MARKER = "NETBOOT-TEST-OK"
SHARED: list[Path] = []  # the directory every worker of this test session shares (set by conftest)


def memoized(name: str, make: Callable[[Path], object]) -> Path:
    """A directory that `make(path)` fills once per test session, whichever worker asks first; the others wait
    for it (a file lock) and read it. What is in it must only be read."""
    base = SHARED[0] / "memo"
    base.mkdir(exist_ok=True)
    path = base / name
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / ".done").exists():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir()
            make(path)
            (path / ".done").touch()
    return path


def built(*args: str | os.PathLike[str]) -> Path:
    """The output directory of `netboot build ARGS --out DIR`, built once per test session for these ARGS
    (a system is a store path: the same path, the same input). Only to be read; copy it to change it."""
    key = hashlib.sha256("\0".join(map(str, args)).encode()).hexdigest()[:20]
    return memoized(f"build-{key}", lambda path: netboot_ok("build", *args, "--out", path / "out")) / "out"


def signing_keys() -> Path:
    """A directory with key.pem and cert.pem (the operator's Secure Boot key, made with openssl once per test
    session), and other-key.pem, a key of another certificate."""
    def make(path: Path) -> None:
        for key, cert in (("key.pem", "cert.pem"), ("other-key.pem", "other-cert.pem")):
            subprocess.run([need("openssl"), "req", "-new", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256",
                            "-days", "3650", "-subj", f"/CN=netboot test {key[:-4]}/", "-keyout", path / key,
                            "-out", path / cert], check=True, capture_output=True)

    return memoized("signing-keys", make)


def status_pki() -> Path:
    """A directory with a throwaway CA (ca.pem), a server certificate it signed for 127.0.0.1 (server.pem,
    server-key.pem), that key encrypted (encrypted-key.pem) and a key of no certificate here (other-key.pem), made
    with openssl once per test session: for the status listener over HTTPS."""
    def make(path: Path) -> None:
        def openssl(*args: str) -> None:
            subprocess.run([need("openssl"), *args], cwd=path, check=True, capture_output=True, timeout=60)

        p256 = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
        openssl("req", "-x509", *p256, "-days", "30", "-subj", "/CN=netboot test CA", "-keyout", "ca-key.pem",
                "-out", "ca.pem")
        openssl("req", "-new", *p256, "-subj", "/CN=127.0.0.1", "-keyout", "server-key.pem", "-out", "server.csr")
        (path / "san.ext").write_text("subjectAltName = IP:127.0.0.1\n")
        openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem", "-CAcreateserial",
                "-days", "30", "-extfile", "san.ext", "-out", "server.pem")
        openssl("genpkey", "-algorithm", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "other-key.pem")
        openssl("pkey", "-in", "server-key.pem", "-aes256", "-passout", "pass:x", "-out", "encrypted-key.pem")

    return memoized("status-pki", make)


def signed_build(system: Path) -> Path:
    """The test system in the squashfs format, its kernel and its unified kernel image signed with
    `signing_keys()` (built once per test session)."""
    keys = signing_keys()
    return built(system, "--format", "squashfs", "--sign-key", keys / "key.pem", "--sign-cert", keys / "cert.pem",
                 "--uki")


def need(tool: str) -> str:
    """A tool the test cannot do without: missing is a failure with the reason, never a skip."""
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed (make test installs it)")
    return path


NOBODY = 65534


def nobody_python(base: Path) -> tuple[list[str], dict[str, str]]:
    """The command and environment that run this project's Python as user nobody, who may not enter where the
    clone, its environment or even the interpreter live (a clone under /root, which is 0700 on Debian): the
    package, the environment's packages and, when nobody cannot reach it, the interpreter itself are copied under
    `base` (a directory of the test's, which it removes; hard links where the file system allows)."""
    need("setpriv")
    base.mkdir(parents=True, exist_ok=True)
    base.chmod(0o755)
    src = base / "src"
    for part in ("netboot", "ipxe-scripts"):
        _readable_copy(ROOT / part, src / part)
    site = Path(sysconfig.get_paths()["purelib"])
    _readable_copy(site, base / "site-packages", skip=("netboot",))  # (the package: src's)
    python = Path(os.path.realpath(sys._base_executable))
    env = {**os.environ, "PYTHONPATH": f"{src}:{base / 'site-packages'}", "PYTHONNOUSERSITE": "1"}
    if not _reachable_by_others(python):
        prefix = Path(sys.base_prefix)
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        copy = base / "python"
        _readable_copy(python, copy / "bin" / version)
        _readable_copy(prefix / "lib" / version, copy / "lib" / version, skip=("site-packages", "test"))
        for lib in prefix.joinpath("lib").glob("libpython*.so*"):
            _readable_copy(lib, copy / "lib" / lib.name)
        python = copy / "bin" / version
        env["LD_LIBRARY_PATH"] = str(copy / "lib")  # (before its RUNPATH, which names the original)
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", str(python), "-s"], env


def _reachable_by_others(path: Path) -> bool:
    return all(os.stat(p).st_mode & 0o001 for p in (path, *path.parents))


def _readable_copy(source: Path, target: Path, skip: Sequence[str] = ()) -> None:
    """`source` at `target`, each file a hard link when it can be (else a copy), its directories 0755."""
    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    if source.is_dir():
        shutil.copytree(source, target, symlinks=True, copy_function=link, ignore=shutil.ignore_patterns(*skip))
        for d in (target, *(p for p in target.rglob("*") if p.is_dir() and not p.is_symlink())):
            d.chmod(0o755)
    else:
        link(str(source), str(target))


def netboot(*args: str | os.PathLike[str], env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
    """The real command line, as a user runs it: a process of its own (`cli()` runs it in this one)."""
    return subprocess.run(
        [sys.executable, "-m", "netboot", *map(str, args)],
        capture_output=True, text=True, env=env, cwd=ROOT, **kw,
    )


def netboot_ok(*args: str | os.PathLike[str], **kw) -> subprocess.CompletedProcess:
    proc = netboot(*args, **kw)
    assert proc.returncode == 0, f"netboot {' '.join(map(str, args))} failed:\n{proc.stderr}"
    return proc


class _Expired(Exception):
    pass


def _expire(signum: int, frame: object) -> None:
    raise _Expired


def cli(*args: str | os.PathLike[str], env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess:
    """`netboot ARGS` run in this process (`netboot.cli.main`), with what it printed and logged: for the error
    paths, which end before anything starts. `env`, if given, replaces the environment for the call; after
    `timeout` seconds the call is interrupted and the test fails (a server that started instead of refusing)."""
    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    saved_env, saved_level, saved_handlers = dict(os.environ), root.level, root.handlers[:]
    saved_term, saved_alarm = signal.getsignal(signal.SIGTERM), signal.signal(signal.SIGALRM, _expire)
    for h in saved_handlers:  # pytest's: without them, main's logging.basicConfig logs to `err` as it would
        root.removeHandler(h)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = netboot_main([str(a) for a in args])
            except SystemExit as e:  # argparse: --help, --version and usage errors
                code = e.code if isinstance(e.code, int) else 1
    except _Expired:
        pytest.fail(f"netboot {' '.join(map(str, args))} still ran after {timeout} s:\n{err.getvalue()[-3000:]}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, saved_alarm)
        signal.signal(signal.SIGTERM, saved_term)
        for h in root.handlers[:]:
            root.removeHandler(h)
        for h in saved_handlers:
            root.addHandler(h)
        root.setLevel(saved_level)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess(["netboot", *map(str, args)], code, out.getvalue(), err.getvalue())


def build_system(link: Path, *nix_args: str, arch: str = "x86_64") -> Path:
    """The test system (tests/system/build) for `arch`: arm64's from Debian's arm64 packages, fetched beside
    `link` the first time."""
    need("nix-build")
    proc = subprocess.run(
        [str(ROOT / "tests/system/build"), "--arch", arch, str(link), *nix_args], capture_output=True, text=True
    )
    assert proc.returncode == 0, f"building the test system failed:\n{proc.stderr[-3000:]}"
    return Path(proc.stdout.strip().splitlines()[-1])


def vm_accel() -> str:
    """KVM where it works, else software emulation: found out once per test session (a kernel booted under
    KVM, which hangs on some machines whose /dev/kvm opens) and handed to every QEMU the tests start, through
    NETBOOT_QEMU_ACCEL. Set NETBOOT_QEMU_ACCEL to choose."""
    if not os.environ.get("NETBOOT_QEMU_ACCEL"):
        def probe(path: Path) -> None:
            kernels = sorted(Path("/boot").glob("vmlinuz-*"))  # Debian's linux-image-amd64 (make test installs it)
            works, why = qemu.kvm_works(kernels[-1]) if kernels else (False, "no kernel in /boot")
            (path / "accel").write_text("kvm" if works else "tcg")
            (path / "why").write_text(why)

        found = memoized("accel", probe)
        os.environ["NETBOOT_QEMU_ACCEL"] = (found / "accel").read_text()
        print(f"\nQEMU: {os.environ['NETBOOT_QEMU_ACCEL']} ({(found / 'why').read_text()})", file=sys.stderr)
    return os.environ["NETBOOT_QEMU_ACCEL"]


def _unpacked_kernel(bzimage: bytes) -> bytes | None:
    """The kernel ELF inside a bzImage (boot protocol 2.08+: payload_offset and payload_length at 0x248 of the
    setup header, from the protected-mode code at (setup_sects + 1) * 512), if it is XZ or gzip and has a PVH
    entry (the Xen ELF note XEN_ELFNOTE_PHYS32_ENTRY, 18, that CONFIG_PVH adds); else None."""
    pm = ((bzimage[0x1F1] or 4) + 1) * 512
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    payload = bzimage[pm + offset:pm + offset + length]
    try:
        if payload.startswith(b"\xfd7zXZ\x00"):
            elf = lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(payload)  # stops at the appended size
        elif payload.startswith(b"\x1f\x8b"):
            elf = zlib.decompressobj(wbits=31).decompress(payload)
        else:
            return None
    except (lzma.LZMAError, zlib.error):
        return None
    if elf[:5] != b"\x7fELF\x02":
        return None
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        kind, _, note_offset, _, _, size = struct.unpack_from("<IIQQQQ", elf, phoff + i * phentsize)
        at, end = note_offset, note_offset + size
        while kind == 4 and at + 12 <= end:  # PT_NOTE: namesz, descsz, type, then name and desc, 4-aligned
            namesz, descsz, note_type = struct.unpack_from("<III", elf, at)
            if elf[at + 12:at + 12 + namesz] == b"Xen\0" and note_type == 18:
                return elf
            at += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return None


def pvh_kernel(bzimage: Path) -> Path | None:
    """`bzimage`'s kernel unpacked, for QEMU to start at its PVH entry (once per session per kernel), or None
    if it has none.

    The same kernel runs, minus bzImage's decompressor, which under software emulation spends about 7 of a
    direct boot's 12 s of CPU unpacking Debian's XZ kernel. bzImage's own start stays covered: qemu/boot-dir's
    test and every network boot (iPXE loads bzImage) run it."""
    data = bzimage.read_bytes()
    made = memoized(f"pvh-{hashlib.sha256(data).hexdigest()[:20]}",
                    lambda path: (path / "vmlinux").write_bytes(_unpacked_kernel(data) or b""))
    return made / "vmlinux" if (made / "vmlinux").stat().st_size else None


def boot(out: Path, *, timeout: float = 240, append: str = "") -> qemu.BootResult:
    """Boot an output directory in QEMU (of its build's architecture; an x86 kernel at its PVH entry:
    `pvh_kernel`) and return what the console showed."""
    arch = qemu.build_arch(out)
    need(qemu.qemu_binary(arch))
    vm_accel()
    kernel = pvh_kernel(out / "bzImage") if arch == "x86_64" else None
    argv = qemu.direct_argv(out, append=append, kernel=kernel)
    result = qemu.watch(argv, timeout=timeout, expect=MARKER)
    assert not result.timed_out, f"QEMU did not finish in {timeout} s:\n{result.console[-3000:]}"
    return result


def netboot_vm(url: str, mac: str, *, uefi: bool = False, timeout: float = 300, memory: int = 1024,
               echo: TextIO | None = None) -> qemu.BootResult:
    """A VM with `mac` network-booting `url` through QEMU's iPXE ROM, until the test system's marker; `memory` in
    MiB; `echo` is handed the console as it comes (qemu.watch)."""
    need(qemu.qemu_binary())
    vm_accel()
    with tempfile.TemporaryDirectory() as tmp:
        vars_copy = None
        if uefi:
            vars_copy = Path(tmp) / "vars.fd"
            shutil.copyfile(qemu.OVMF_VARS, vars_copy)
        result = qemu.watch(qemu.net_argv(url, mac, uefi=uefi, vars_copy=vars_copy, memory=str(memory)),
                            timeout=timeout, expect=MARKER, echo=echo)
    assert not result.timed_out, f"QEMU did not finish in {timeout} s:\n{result.console[-3000:]}"
    return result


def assert_booted(result: qemu.BootResult, closure: list[str], system: Path) -> None:
    """The system's init ran and found every closure path, registered, with the right content."""
    console = result.console
    assert result.init_reached == f"{system}/init", console[-3000:]
    ok_lines = [ln for ln in result.lines if ln.startswith(MARKER)]
    assert ok_lines, f"the system's checks failed:\n{console[-3000:]}"
    files = len((system / "closure-files.sha256").read_text().splitlines())
    assert ok_lines[0].split() == [MARKER, f"paths={len(closure)}", f"files={files}"]
    assert "NETBOOT-TEST: store writable" in console


def hostname_seen(console_lines: list[str]) -> str:
    """The /etc/hostname the test system's init found (an overlay's, when one was served)."""
    return next(ln for ln in console_lines if ln.startswith("NETBOOT-TEST: hostname:")).split(": ", 2)[2].strip()


def curl_tftp(port: int, name: str, *extra: str) -> subprocess.CompletedProcess:
    """curl's TFTP GET of `name` from a server on loopback (`extra`: curl's options, e.g. --tftp-blksize)."""
    need("curl")
    return subprocess.run(["curl", "-sS", *extra, f"tftp://127.0.0.1:{port}/{name}"], capture_output=True, timeout=60)


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A loopback port nothing listens on (TCP, or UDP with SOCK_DGRAM)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_out(d: Path, fmt: str = "squashfs", compression: str = "zstd", level: int | None = 10,
             initrd_size: int = 0, arch: str | None = None) -> Path:
    """An output directory as netboot build leaves it, with stand-ins for the kernel and initrd (`initrd_size`
    random bytes, if given), for `arch` (its kernel is bzImage or Image); None: a manifest without "arch", as
    builds for x86_64 wrote before they recorded it."""
    import json

    from netboot.core.artifacts import DEFAULT_ARCH, files

    d.mkdir(parents=True)
    for name in files(arch or DEFAULT_ARCH)[:-1]:
        (d / name).write_bytes(name.encode())
    if initrd_size:
        (d / "initrd").write_bytes(os.urandom(initrd_size))
    (d / "manifest.json").write_text(json.dumps({"cmdline": "init=/x", "system": f"/nix/store/{fmt}", "format": fmt,
                                                 "compression": compression, "level": level,
                                                 **({"arch": arch} if arch else {})}))
    return d


def write_machines(path: Path, profiles: dict[str, Path], machines: dict[str, str],
                   appends: dict[str, str] | None = None) -> Path:
    """A machines file: profiles by name and directory (and kernel parameters by profile, `appends`), machines by
    MAC and profile."""
    appends = appends or {}
    lines = [f'[profiles.{name}]\ndir = "{out}"\n' + (f'append = "{appends[name]}"\n' if name in appends else "")
             for name, out in profiles.items()]
    lines += [f'[machines."{mac}"]\nprofile = "{profile}"\n' for mac, profile in machines.items()]
    path.write_text("\n".join(lines))
    return path


class ServerProcess:
    """`netboot serve` as a real process on loopback, stopped by its PID.

    `prefix` goes before the command line, e.g. `ip netns exec NS` to run it in a namespace (exec: same PID).
    """

    def __init__(self, *args: str | os.PathLike[str], prefix: Sequence[str] = (),
                 command: Sequence[str] | None = None) -> None:
        """`command`: another command line that serves as `netboot serve` does (and logs the same)."""
        import re
        import time

        if command is not None:
            args = tuple(command)
        elif "--status" not in map(str, args):
            args = (*args, "--status", "127.0.0.1:0")  # not the default port: tests run servers side by side
        if command is None and not {"--tftp-workers", "--no-tftp"} & set(map(str, args)):
            args = (*args, "--tftp-workers", "0")  # transfers in the server's own loop, unless workers are tested
        argv = [*prefix, *map(str, args)] if command else [*prefix, sys.executable, "-m", "netboot", "serve",
                                                            *map(str, args)]
        self.proc = subprocess.Popen(
            argv, cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        self.lines: list[str] = []
        self.http_port = 0
        self.tftp_port = 0
        self.status_port = 0
        deadline = time.monotonic() + 20
        assert self.proc.stderr is not None
        while not self.http_port or ("--no-tftp" not in map(str, args) and not self.tftp_port):
            line = self.proc.stderr.readline()
            if not line or time.monotonic() > deadline:
                self.stop()
                pytest.fail("netboot serve did not start:\n" + "".join(self.lines) + line)
            self.lines.append(line)
            if m := re.search(r"http: serving http://\S+:(\d+)/", line):
                self.http_port = int(m.group(1))
            if m := re.search(r"tftp: serving tftp://\S+:(\d+)/", line):
                self.tftp_port = int(m.group(1))
            if m := re.search(r"status: https?://\S+:(\d+)/ ", line):
                self.status_port = int(m.group(1))
        import threading

        self._drainer = threading.Thread(target=self._drain, daemon=True)
        self._drainer.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}/{path.lstrip('/')}"

    def logged(self, text: str, timeout: float = 20) -> bool:
        """Whether the server logs `text` within `timeout` (its log is read as it comes, after the answer)."""
        import time

        deadline = time.monotonic() + timeout
        while text not in self.log and time.monotonic() < deadline:
            time.sleep(0.05)
        return text in self.log

    def stop(self) -> None:
        """Stop the server by its PID; its log is whole afterwards (read to its end)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        drainer = getattr(self, "_drainer", None)  # none yet if it did not start
        if drainer is not None:
            drainer.join(timeout=10)


class Nginx:
    """Debian's nginx serving `root` on 127.0.0.1:`port`, one process (it stays root, so it can read the test's
    directories), its access log in `prefix`; stopped by its PID. `limit_rate`: nginx's, bytes a second per
    connection (0: no limit)."""

    def __init__(self, root: Path, prefix: Path, *, limit_rate: int = 0) -> None:
        need("nginx")
        self.port = free_port()
        self.log = prefix / "access.log"
        self.conf = prefix / "nginx.conf"
        self.prefix = prefix
        self.conf.write_text(f"""
daemon off;
master_process off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
events {{ }}
http {{
    access_log {self.log};
    default_type application/octet-stream;
    limit_rate {limit_rate};
    client_body_temp_path {prefix};
    proxy_temp_path {prefix};
    fastcgi_temp_path {prefix};
    uwsgi_temp_path {prefix};
    scgi_temp_path {prefix};
    server {{ listen 127.0.0.1:{self.port}; root {root}; }}
}}
""")
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(["nginx", "-c", str(self.conf), "-p", str(self.prefix)], stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"nginx did not start: {self.proc.stderr.read().decode() if self.proc.stderr else ''}")
                time.sleep(0.05)

    def kill(self) -> None:
        """Dies at once, in the middle of what it sends (SIGKILL), to be started again."""
        self.proc.kill()
        self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def closed_by_server(s: socket.socket) -> bool:
    """Whether the server closed this non-blocking connection."""
    try:
        return s.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
