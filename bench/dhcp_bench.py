"""Network boot through real UEFI firmware with netboot's proxy DHCP, against dnsmasq doing the DHCP side.

On a LAN in network namespaces (devtools.lanboot): OVMF with the NIC's option ROM disabled, so EDK2's own PXE
client takes the first step; EDK2 PXE -> ipxe.efi over TFTP -> boot.ipxe over HTTP -> kernel + initrd -> init.
Both runs have dnsmasq as the site's DHCP server handing out the address and `netboot serve` serving TFTP and
HTTP; they differ only in who hands out the boot files: `netboot serve --dhcp proxy`, or dnsmasq itself
configured as README's "With your own DHCP server instead" says. Runs are interleaved.
`--update` rewrites the DHCP section of BENCHMARKS.md (as part of `make bench`, bench/run.py does).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import build  # noqa: E402
import report  # noqa: E402

from devtools import lanboot  # noqa: E402

HEADING = "## DHCP: UEFI PXE boot on a LAN"


def main(runs: int = 3) -> str:
    out = build.small_out()
    times: dict[str, list[float]] = {"proxy": [], "dnsmasq": []}
    for i in range(runs):
        for dhcp in ("proxy", "dnsmasq") if i % 2 == 0 else ("dnsmasq", "proxy"):
            run = lanboot.boot(out, dhcp=dhcp, firmware="uefi-pxe")
            if not run.result.expected_seen:
                raise RuntimeError(f"the boot with {dhcp} failed:\n{run.result.console[-2000:]}\n{run.serve_log}")
            if dhcp == "proxy" and not re.search(r"uefi-x64-pxe (OFFER|ACK) .*ipxe\.efi", run.serve_log):
                raise RuntimeError(f"netboot's proxy DHCP did not answer EDK2:\n{run.serve_log}")
            times[dhcp].append(run.result.elapsed)
            print(f"{dhcp}: {run.result.elapsed:.1f} s", flush=True)
    proxy, ref = statistics.median(times["proxy"]), statistics.median(times["dnsmasq"])
    lines = [
        HEADING,
        "",
        f"From QEMU's start to the test system's marker (it has reached its init and checked its whole store), "
        f"OVMF with EDK2's own PXE client (`romfile=`), software emulation: EDK2 PXE -> `ipxe.efi` over TFTP -> "
        f"`boot.ipxe` over HTTP -> kernel and initrd -> init, on a LAN in network namespaces (bench/dhcp_bench.py, "
        f"devtools.lanboot). dnsmasq is the site's DHCP server in both; the boot files come from `netboot serve "
        f"--dhcp proxy` or from dnsmasq itself (README's configuration). Squashfs format, initrd "
        f"{(out / 'initrd').stat().st_size / 1e6:.1f} MB. Median of {runs} interleaved runs each.",
        "",
        "| boot files from | runs | median | ratio |",
        "|---|---|---|---|",
        f"| netboot serve --dhcp proxy | {', '.join(f'{t:.1f}' for t in times['proxy'])} s | {proxy:.1f} s | "
        f"**{proxy / ref:.2f}x** |",
        f"| dnsmasq (DHCP and PXE) | {', '.join(f'{t:.1f}' for t in times['dnsmasq'])} s | {ref:.1f} s | 1 |",
        "",
        "Command: `python -m devtools.lanboot OUT --dhcp proxy|dnsmasq --firmware uefi-pxe` (`make bench-dhcp`).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="UEFI PXE boot through netboot's proxy DHCP against dnsmasq.")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--update", action="store_true", help="rewrite this section of BENCHMARKS.md")
    args = p.parse_args()
    result = main(args.runs)
    if args.update:
        report.update_section(HEADING, result)
