"""Real TFTP clients (curl, tftp-hpa, atftp, busybox, tftpy) against the real server on loopback."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from tftp_support import EACH, ServerThread, pattern, tool

from netboot.tftp import FileSystemResolver


def run(argv: list[str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def curl(port: int, name: str, out: Path, *options: str, host: str = "127.0.0.1"
         ) -> subprocess.CompletedProcess[str]:
    netloc = f"[{host}]" if ":" in host else host
    return run([tool("curl"), "-sS", *options, "-o", str(out), f"tftp://{netloc}:{port}/{name}"], out.parent)


def hpa(port: int, command: str, name: str, local: Path, mode: str = "binary", host: str = "127.0.0.1"
        ) -> subprocess.CompletedProcess[str]:
    """tftp-hpa's client: plain RFC 1350 requests, no options at all."""
    family = ["-6"] if ":" in host else []
    files = [name, str(local)] if command == "get" else [str(local), name]
    return run([tool("tftp"), *family, "-m", mode, host, str(port), "-c", command, *files], local.parent, 120)


def assert_same(got: Path, expected: Path) -> None:
    assert got.exists(), f"{got.name} was not downloaded"
    assert got.read_bytes() == expected.read_bytes(), f"{got.name} differs from {expected.name}"


@EACH
@pytest.mark.parametrize("blksize", [512, 1468, 65464])
def test_curl_blksize(served: ServerThread, tftp_root: Path, tmp_path: Path, blksize: int) -> None:
    out = tmp_path / "out"
    result = curl(served.port, "3m.bin", out, "--tftp-blksize", str(blksize))
    assert result.returncode == 0, result.stderr
    assert_same(out, tftp_root / "3m.bin")
    (stats,) = served.wait_stats(1)
    assert stats.outcome == "complete"
    assert ("blksize", str(blksize)) in stats.options
    assert ("tsize", str((tftp_root / "3m.bin").stat().st_size)) in stats.options
    assert stats.retransmissions == 0


@EACH
def test_curl_without_options(served: ServerThread, tftp_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = curl(served.port, "3m.bin", out, "--tftp-no-options")
    assert result.returncode == 0, result.stderr
    assert_same(out, tftp_root / "3m.bin")
    assert served.wait_stats(1)[0].options == ()


# An empty file is fetched with tftp-hpa below: curl 7.88 fails on it after an OACK with any server
# ("getpeername() failed", tftpd-hpa too).
@EACH
@pytest.mark.parametrize("name", ["exact.bin", "small.bin", "sub/inner.bin", "/sub/inner.bin"])
def test_curl_edge_sizes_and_names(served: ServerThread, tftp_root: Path, tmp_path: Path, name: str) -> None:
    out = tmp_path / "out"
    result = curl(served.port, name, out)
    assert result.returncode == 0, result.stderr
    assert_same(out, tftp_root / name.lstrip("/"))


@EACH
@pytest.mark.parametrize("mode", ["binary", "netascii"])
def test_tftp_hpa(served: ServerThread, tftp_root: Path, tmp_path: Path, mode: str) -> None:
    for name in ("3m.bin", "text.txt", "exact.bin", "empty.bin"):
        out = tmp_path / f"{mode}-{name}"
        result = hpa(served.port, "get", name, out, mode)
        output = result.stdout + result.stderr
        assert result.returncode == 0 and "Error" not in output, output
        assert_same(out, tftp_root / name)
    stats = served.wait_stats(4)
    assert {s.outcome for s in stats} == {"complete"}
    assert all(s.options == () for s in stats)


@EACH
def test_netascii_is_converted_on_the_wire(served: ServerThread, tftp_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "text.txt"
    result = hpa(served.port, "get", "text.txt", out, "netascii")
    assert result.returncode == 0, result.stderr
    (stats,) = served.wait_stats(1)
    original = (tftp_root / "text.txt").read_bytes()
    # RFC 764: every LF became CR LF and every CR became CR NUL, so the wire carried more bytes.
    assert stats.bytes_sent == len(original) + original.count(b"\n") + original.count(b"\r")
    assert out.read_bytes() == original


@EACH
@pytest.mark.parametrize("options", [["windowsize 16", "tsize 0"], ["blksize 1468", "windowsize 8"], []])
def test_atftp(served: ServerThread, tftp_root: Path, tmp_path: Path, options: list[str]) -> None:
    out = tmp_path / "out"
    argv = [tool("atftp")]
    for option in options:
        argv += ["--option", option]
    result = run([*argv, "-g", "-r", "3m.bin", "-l", str(out), "127.0.0.1", str(served.port)], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_same(out, tftp_root / "3m.bin")
    (stats,) = served.wait_stats(1)
    assert stats.outcome == "complete"
    for option in options:
        name, value = option.split()
        if name == "tsize":
            value = str((tftp_root / "3m.bin").stat().st_size)
        assert (name, value) in stats.options


@EACH
@pytest.mark.parametrize("blksize", [None, 1468])
def test_busybox(served: ServerThread, tftp_root: Path, tmp_path: Path, blksize: int | None) -> None:
    out = tmp_path / "out"
    argv = [tool("busybox"), "tftp", *(["-b", str(blksize)] if blksize else []), "-g", "-r", "3m.bin",
            "-l", str(out), "127.0.0.1", str(served.port)]
    result = run(argv, tmp_path)
    assert result.returncode == 0, result.stderr
    assert_same(out, tftp_root / "3m.bin")


@EACH
def test_tftpy(served: ServerThread, tftp_root: Path, tmp_path: Path) -> None:
    import tftpy

    out = tmp_path / "out"
    tftpy.TftpClient("127.0.0.1", served.port, options={"blksize": 1468, "tsize": 0}).download(
        "3m.bin", str(out), timeout=5)
    assert_same(out, tftp_root / "3m.bin")
    assert served.wait_stats(1)[0].outcome == "complete"


def test_ipv6(tftp_server: Callable[..., ServerThread], tftp_root: Path, tmp_path: Path) -> None:
    served = tftp_server(hosts=("::1",))
    out = tmp_path / "curl"
    result = curl(served.port, "3m.bin", out, "--tftp-blksize", "1468", host="::1")
    assert result.returncode == 0, result.stderr
    assert_same(out, tftp_root / "3m.bin")
    out = tmp_path / "hpa"
    result = hpa(served.port, "get", "small.bin", out, host="::1")
    assert result.returncode == 0, result.stderr
    assert_same(out, tftp_root / "small.bin")
    assert [s.peer.startswith("[::1]:") for s in served.wait_stats(2)] == [True, True]


def test_dual_stack_listener(tftp_server: Callable[..., ServerThread], tftp_root: Path, tmp_path: Path
                             ) -> None:
    # "::" answers IPv4 clients too (as v4-mapped addresses); bound to lo, it hears no other network.
    served = tftp_server(hosts=("::",), interface="lo")
    for host in ("127.0.0.1", "::1"):
        out = tmp_path / host.replace(":", "_")
        result = curl(served.port, "small.bin", out, host=host)
        assert result.returncode == 0, result.stderr
        assert_same(out, tftp_root / "small.bin")


@pytest.mark.slow
def test_rollover_beyond_65535_blocks(tmp_path_factory: pytest.TempPathFactory,
                                      tftp_server: Callable[..., ServerThread], tmp_path: Path) -> None:
    # 512 x 65535 is just under 32 MiB: this file needs block numbers to wrap to 0 (tftp-hpa, curl agree).
    root = tmp_path_factory.mktemp("big")
    big = root / "big.bin"
    big.write_bytes(pattern(512 * 70000 + 100, 9))
    served = tftp_server(resolver=FileSystemResolver(root))
    out = tmp_path / "out"
    result = curl(served.port, "big.bin", out, "--tftp-blksize", "512")
    assert result.returncode == 0, result.stderr
    assert_same(out, big)
    out = tmp_path / "hpa"
    result = hpa(served.port, "get", "big.bin", out)
    assert result.returncode == 0, result.stderr
    assert_same(out, big)


@EACH
def test_missing_file_is_an_error_and_nothing_else(served: ServerThread, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = curl(served.port, "no-such-file", out)
    assert result.returncode != 0
    assert not out.exists() or out.stat().st_size == 0


@EACH
def test_write_request_is_refused_and_nothing_written(served: ServerThread, tftp_root: Path, tmp_path: Path
                                                      ) -> None:
    before = sorted(p.relative_to(tftp_root) for p in tftp_root.rglob("*"))
    local = tmp_path / "upload.bin"
    local.write_bytes(b"x" * 3000)
    result = hpa(served.port, "put", "upload.bin", local)
    assert "Access violation" in result.stdout + result.stderr or "read-only" in result.stdout + result.stderr
    result = curl(served.port, "small.bin", tmp_path / "small.bin", "-T", str(local))
    assert result.returncode != 0
    assert sorted(p.relative_to(tftp_root) for p in tftp_root.rglob("*")) == before
