"""The Secure Boot chains against the iPXE chain, and GRUB's HTTP against its TFTP, on one system.

On a LAN in network namespaces (devtools.lanboot): OVMF with EDK2's own PXE client (`romfile=`), dnsmasq as the
site's DHCP server naming netboot as the next server, `netboot serve --dhcp proxy` handing out the boot files.
One build of the small test system, its kernel signed and its unified kernel image made with a key of this run
(`--sign-key --sign-cert --uki`), is booted by every chain:

- ipxe: EDK2 PXE -> ipxe.efi -> boot.ipxe -> kernel + initrd over HTTP (Secure Boot off: iPXE is not signed);
- grub: Secure Boot on, the key in shim's MOK list: shim -> GRUB -> kernel + initrd over TFTP;
- uki: the same, GRUB chainloads netboot.efi over TFTP;
- GRUB's transports, Secure Boot off (the only case where GRUB can load its http module): the grub chain with
  GRUB's http module served (kernel + initrd over HTTP), and with `--loaders x86_64=DIR` holding shim, GRUB and
  MokManager alone (no module: TFTP).

Times run from QEMU's start to the system's marker (its init has checked the whole store). Runs are interleaved.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import build  # noqa: E402
import report  # noqa: E402

from devtools import lanboot  # noqa: E402
from devtools.lan import Lan  # noqa: E402
from netboot.core import loaders  # noqa: E402

HEADING = "## Secure Boot: the grub and uki chains against iPXE"
MAC = "52:54:00:5b:00:01"
# name: (loader, Secure Boot on, the transport GRUB must use: "http", "tftp" or None for iPXE)
CHAINS = {
    "ipxe": ("ipxe", False, None),
    "grub": ("grub", True, "tftp"),
    "uki": ("uki", True, "tftp"),
    "grub-http": ("grub", False, "http"),
    "grub-tftp": ("grub", False, "tftp"),
}


def signed_out() -> tuple[Path, Path]:
    """The small test system built with a key made for this benchmark, and the key's certificate."""
    keys = build.DATA / "secureboot-keys"
    keys.mkdir(parents=True, exist_ok=True)
    if not (keys / "cert.pem").is_file():
        subprocess.run(["openssl", "req", "-new", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "3650",
                        "-subj", "/CN=netboot benchmark/", "-keyout", keys / "key.pem", "-out", keys / "cert.pem"],
                       check=True, capture_output=True)
    system = subprocess.run([ROOT / "tests/system/build", build.DATA / "boot-system"], check=True,
                            capture_output=True, text=True).stdout.strip().splitlines()[-1]
    out = build.DATA / "secureboot-out"
    subprocess.run([sys.executable, "-m", "netboot", "build", system, "--out", str(out), "--sign-key",
                    str(keys / "key.pem"), "--sign-cert", str(keys / "cert.pem"), "--uki", "-q"], check=True, cwd=ROOT)
    return out, keys / "cert.pem"


def boot(chain: str, out: Path, cert: Path, tmp: Path) -> float:
    """One boot of `chain` on a LAN of its own; the seconds from QEMU's start to the marker."""
    loader, secure, transport = CHAINS[chain]
    machines = tmp / f"{chain}.toml"
    machines.write_text(f'[profiles.default]\ndir = "{out}"\nloader = "{loader}"\n')
    serve_args = ["--machines", str(machines), "--http", "0.0.0.0:8080", "--tftp", "0.0.0.0:69", "--dhcp", "proxy"]
    if chain == "grub-tftp":
        only = tmp / "loaders"
        only.mkdir(exist_ok=True)
        for name, source in loaders.arch("x86_64").debian.items():
            (only / name).write_bytes(source.path.read_bytes())
        serve_args += ["--loaders", f"x86_64={only}"]
    with Lan() as lan:
        # GRUB takes its server from the acknowledgement of its address (docs/secure-boot-arm64.md).
        lan.host("site", f"{lanboot.SITE_ADDRESS}/24").dnsmasq(
            f"--dhcp-option=option:server-ip-address,{lanboot.NETBOOT_ADDRESS}", leasefile=tmp / "dnsmasq.leases")
        log = tmp / f"{chain}.log"
        lanboot.start_serve(lan.host("netboot", f"{lanboot.NETBOOT_ADDRESS}/24"), log, *serve_args)
        result = lanboot.boot_vm(lan, MAC, uefi=True, pxe_rom=False, secure_boot=secure, mok=[cert] if secure else [])
    served = log.read_text()
    if not result.expected_seen:
        raise RuntimeError(f"the {chain} chain did not boot:\n{result.console[-2000:]}\n{served}")
    secure_seen = "EFI stub: UEFI Secure Boot is enabled." in result.console
    if secure_seen != secure:
        raise RuntimeError(f"the {chain} chain booted with Secure Boot {'off' if secure else 'on'}")
    fetched = [ln for ln in served.splitlines() if "/bzImage " in ln or "/netboot.efi " in ln]
    want = {"http": " http ", "tftp": " tftp ", None: " http "}[transport]
    if not fetched or any(want not in ln for ln in fetched):
        raise RuntimeError(f"the {chain} chain did not fetch its kernel over{want.rstrip()}:\n{served}")
    return result.elapsed


def main(runs: int = 3) -> str:
    out, cert = signed_out()
    times: dict[str, list[float]] = {chain: [] for chain in CHAINS}
    with tempfile.TemporaryDirectory(prefix="netboot-sbbench-") as tmp:
        for i in range(runs):
            order = list(CHAINS) if i % 2 == 0 else list(reversed(CHAINS))
            for chain in order:
                times[chain].append(boot(chain, out, cert, Path(tmp)))
                print(f"{chain}: {times[chain][-1]:.1f} s", flush=True)
    load = os.getloadavg()[0]  # the machine may be busy with other work: these times move with it
    med = {chain: statistics.median(t) for chain, t in times.items()}

    def row(chain: str, what: str, ref: str) -> str:
        return (f"| {what} | {', '.join(f'{t:.1f}' for t in times[chain])} s | {med[chain]:.1f} s | "
                f"**{med[chain] / med[ref]:.2f}x** |")

    size = ((out / "bzImage").stat().st_size + (out / "initrd").stat().st_size) / 1e6
    lines = [
        HEADING,
        "",
        f"From QEMU's start to the test system's marker (its init has checked the whole store), OVMF with EDK2's "
        f"own PXE client, software emulation, one VM at a time, on a LAN in network namespaces: dnsmasq as the "
        f"site's DHCP server, `netboot serve --dhcp proxy` (bench/secureboot_bench.py). One build of the small "
        f"test system, kernel signed, with `--uki` (kernel + initrd {size:.1f} MB, netboot.efi "
        f"{(out / 'netboot.efi').stat().st_size / 1e6:.1f} MB), for every chain. Secure Boot on: "
        f"`OVMF_CODE_4M.secboot.fd`, Microsoft's keys, the build's certificate in shim's MOK list. "
        f"Median of {runs} interleaved runs each. Load average (1 min) after the runs: {load:.1f}; on a busy "
        f"machine the runs of one chain spread widely, and differences smaller than that spread are noise.",
        "",
        "| chain | runs | median | ratio |",
        "|---|---|---|---|",
        row("ipxe", "iPXE: ipxe.efi -> kernel + initrd over HTTP (Secure Boot off)", "ipxe"),
        row("grub", "grub: shim -> GRUB -> kernel + initrd over TFTP (Secure Boot on)", "ipxe"),
        row("uki", "uki: shim -> GRUB -> netboot.efi over TFTP (Secure Boot on)", "ipxe"),
        "",
        "GRUB's transports, Secure Boot off (under Secure Boot Debian's signed GRUB loads no module, so TFTP only):",
        "",
        "| kernel + initrd over | runs | median | ratio |",
        "|---|---|---|---|",
        row("grub-http", "HTTP (GRUB's http module served)", "grub-tftp"),
        row("grub-tftp", "TFTP (`--loaders x86_64=DIR` without the module)", "grub-tftp"),
        "",
        f"Command: `python bench/secureboot_bench.py --runs {runs} --update` (`make bench-secureboot`).",
        "",
    ]
    return report.publish(HEADING, "\n".join(lines), False)


if __name__ == "__main__":
    args = report.arguments(__doc__, runs=3).parse_args()
    text = main(args.runs)
    if args.update:
        report.update_section(HEADING, text)
