"""QEMU network boot time (software emulation) through QEMU's iPXE ROM against netboot serve, HTTP and TFTP."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import build  # noqa: E402
from support import MARKER, ServerProcess  # noqa: E402

from devtools import qemu  # noqa: E402


def main(runs: int = 3) -> str:
    out = build.small_out()
    server = ServerProcess("--dir", out, "--http", "127.0.0.1:0", "--tftp", "127.0.0.1:0")
    times: dict[str, list[float]] = {"HTTP": [], "TFTP": []}
    try:
        for _ in range(runs):
            for proto, url in (("HTTP", f"http://10.0.2.2:{server.http_port}/boot.ipxe"),
                               ("TFTP", f"tftp://10.0.2.2:{server.tftp_port}/boot.ipxe")):
                result = qemu.watch(qemu.net_argv(url, "52:54:00:12:34:56"), timeout=300, expect=MARKER)
                if not result.expected_seen:
                    raise RuntimeError(f"the {proto} boot failed:\n{result.console[-2000:]}")
                times[proto].append(result.elapsed)
    finally:
        server.stop()
    initrd = (out / "initrd").stat().st_size
    lines = [
        "## QEMU network boot",
        "",
        f"From QEMU's start to the test system's marker (it has checked its whole store), BIOS, software "
        f"emulation, QEMU's iPXE ROM on user networking against `netboot serve --dir` on loopback; squashfs "
        f"format, kernel {(out / 'bzImage').stat().st_size / 1e6:.1f} MB, initrd {initrd / 1e6:.1f} MB. "
        f"Median of {runs} runs. No reference tool runs here; the figures measured on a machine like this one "
        f"for a Debian kernel and a busybox initrd were 9.7 s over HTTP and 10.2 s over TFTP.",
        "",
        "| boot over | time |",
        "|---|---|",
        *(f"| {proto} | {statistics.median(t):.1f} s |" for proto, t in times.items()),
        "",
        "Command: `qemu/netboot --url http://10.0.2.2:PORT/boot.ipxe` (or `tftp://10.0.2.2:PORT/boot.ipxe`).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
