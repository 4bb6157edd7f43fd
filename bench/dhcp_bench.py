"""Network boots through real firmware on a LAN in network namespaces (devtools.lanboot), two comparisons:

proxy: OVMF with the NIC's option ROM disabled, so EDK2's own PXE client takes the first step; EDK2 PXE ->
ipxe.efi over TFTP -> boot.ipxe over HTTP -> kernel + initrd -> init. Both runs have dnsmasq as the site's DHCP
server handing out the address and `netboot serve` serving TFTP and HTTP; they differ only in who hands out the
boot files: `netboot serve --dhcp proxy`, or dnsmasq itself configured as docs/dhcp.md's "With your own DHCP server
instead" says.

ipxe: the same chain with `netboot serve --dhcp RANGE` alone, with and without option 175 (no-pxedhcp) in its
answers to iPXE. Without it iPXE waits up to 2 s for ProxyDHCP offers after the OFFER; "without" is the same
server with the option taken out of its replies by bench/serve_without_175.py.

Runs are interleaved. `--update` rewrites the two DHCP boot sections of BENCHMARKS.md (as part of `make bench`,
bench/run.py does).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import build  # noqa: E402
import report  # noqa: E402

from devtools import lanboot  # noqa: E402
from devtools.lan import Lan  # noqa: E402

HEADING = "## DHCP: UEFI PXE boot on a LAN"
IPXE_HEADING = "## DHCP: iPXE over the authoritative mode, told not to wait for ProxyDHCP"
WITHOUT_175 = ROOT / "bench" / "serve_without_175.py"
INIT = "NETBOOT-TEST: init reached"
# iPXE's console: the start of its DHCP ("Configuring (net0 MAC)...... ok"), and what it prints once DHCP is done.
CONFIGURING, CONFIGURED = "Configuring (net0", "http://192.0.2.10:8080/boot.ipxe"


def proxy_section(runs: int) -> str:
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
        f"--dhcp proxy` or from dnsmasq itself (docs/dhcp.md's configuration). Squashfs format, initrd "
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
    return "\n".join(lines)


def ipxe_boot(out: Path, with_175: bool, mac: str = "52:54:00:de:e0:03") -> tuple[float, float]:
    """One boot over the authoritative mode alone: (VM start to init, iPXE's DHCP) in seconds."""
    command = (sys.executable, "-m", "netboot") if with_175 else (sys.executable, str(WITHOUT_175))
    with Lan() as lan, tempfile.TemporaryDirectory(prefix="netboot-dhcpbench-") as tmp_name:
        tmp = Path(tmp_name)
        server = lan.host("netboot", f"{lanboot.NETBOOT_ADDRESS}/24")
        lanboot.start_serve(server, tmp / "serve.log", "--dir", str(out), "--http", "0.0.0.0:8080", "--tftp",
                            "0.0.0.0:69", "--dhcp", "192.0.2.100-192.0.2.199", "--state-dir", str(tmp / "state"),
                            command=command)
        result = lanboot.boot_vm(lan, mac, uefi=True, pxe_rom=False, marks=(CONFIGURING, CONFIGURED, INIT))
        log = (tmp / "serve.log").read_text()
    what = "with option 175" if with_175 else "without option 175"
    if not result.expected_seen or not {CONFIGURING, CONFIGURED, INIT} <= result.seen_at.keys():
        raise RuntimeError(f"the boot {what} failed:\n{result.console[-3000:]}\n{log}")
    if not re.search(rf"{mac} ipxe-uefi-x64 OFFER .*boot=http://\S+/boot\.ipxe", log):
        raise RuntimeError(f"netboot did not answer the VM's iPXE:\n{log}")
    if with_175 == ("bench: option 175 left out of the OFFER" in log):
        raise RuntimeError(f"the boot {what}: option 175 was {'' if with_175 else 'not '}left out:\n{log}")
    return result.seen_at[INIT], result.seen_at[CONFIGURED] - result.seen_at[CONFIGURING]


def ipxe_section(runs: int) -> str:
    out = build.small_out()
    arms = {True: "with option 175 (no-pxedhcp = 1)", False: "without option 175"}
    times: dict[bool, list[tuple[float, float, float]]] = {True: [], False: []}
    for i in range(runs):
        for with_175 in (True, False) if i % 2 == 0 else (False, True):
            load = os.getloadavg()[0]  # the machine is shared: what else ran shows here
            init, dhcp = ipxe_boot(out, with_175)
            times[with_175].append((init, dhcp, load))
            print(f"{arms[with_175]}: init at {init:.1f} s, iPXE's DHCP {dhcp:.2f} s (load {load:.2f})", flush=True)

    def median(arm: bool, k: int) -> float:
        return statistics.median(t[k] for t in times[arm])

    rows = []
    for arm in (True, False):
        runs_text = ", ".join(f"{t[0]:.1f}" for t in times[arm])
        dhcp_text = ", ".join(f"{t[1]:.2f}" for t in times[arm])
        loads = ", ".join(f"{t[2]:.1f}" for t in times[arm])
        ratio = f"**{median(arm, 0) / median(False, 0):.2f}x**" if arm else "1"
        rows.append(f"| {arms[arm]} | {runs_text} s | {median(arm, 0):.1f} s | {ratio} | {dhcp_text} s | "
                    f"{median(arm, 1):.2f} s | {loads} |")
    lines = [
        IPXE_HEADING,
        "",
        f"From QEMU's start to the test system's init (`{INIT}` on the console), OVMF with EDK2's own PXE client, "
        f"software emulation, on a LAN in network namespaces with `netboot serve --dhcp 192.0.2.100-192.0.2.199` "
        f"as its only DHCP server: EDK2 PXE -> `ipxe.efi` over TFTP -> iPXE's own DHCP -> `boot.ipxe` over HTTP -> "
        f"kernel and initrd -> init. netboot's OFFER and ACK to iPXE carry option 175 with sub-option 176 "
        f"(no-pxedhcp) = 1; without it, iPXE waits after the OFFER for ProxyDHCP offers that never come, until 2 s "
        f"have passed (its DHCP_DISC_PROXY_TIMEOUT_SEC), which it notices at its next retransmission. \"Without\" "
        f"is the same server with the option taken out of its replies (bench/serve_without_175.py wraps the "
        f"codec's encoder and logs each reply it changed; nothing shipped has a switch for it). iPXE's "
        f"DHCP: from `{CONFIGURING}` to `{CONFIGURED}` on the console. Squashfs format, initrd "
        f"{(out / 'initrd').stat().st_size / 1e6:.1f} MB. Median of {runs} interleaved runs each. The machine is "
        f"shared: the load average (1 min) before each run is shown, and a busy run's time to init spreads by "
        f"seconds either way, while iPXE's DHCP does not.",
        "",
        "| answers to iPXE | to init, runs | median | ratio | iPXE's DHCP, runs | median | load before each run |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Command: `python bench/dhcp_bench.py --section ipxe --update` (`make bench-dhcp` runs both sections).",
        "",
    ]
    return "\n".join(lines)


SECTIONS = {"proxy": (HEADING, proxy_section), "ipxe": (IPXE_HEADING, ipxe_section)}


def main(runs: int = 3, sections: tuple[str, ...] = tuple(SECTIONS), update: bool = False) -> str:
    texts = []
    for name in sections:
        heading, section = SECTIONS[name]
        texts.append(report.publish(heading, section(runs), update))
    return "\n".join(texts)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="UEFI PXE boots through netboot's DHCP: proxy against dnsmasq, and "
                                "iPXE over the authoritative mode with and without no-pxedhcp.")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--section", choices=sorted(SECTIONS), action="append",
                   help="run this section only (repeatable; default: both)")
    p.add_argument("--update", action="store_true", help="rewrite these sections of BENCHMARKS.md")
    args = p.parse_args()
    main(args.runs, tuple(args.section or SECTIONS), args.update)
