"""Two netboot servers on one PostgreSQL, one of them killed, a machine still booting: `make demo-ha`.

    python -m devtools.haboot OUT [--timeout S] [-q]

On a LAN in network namespaces (devtools.lan): a throwaway PostgreSQL cluster (devtools.postgres), and two
`netboot serve --dir OUT --dhcp RANGE --database URL --name a|b` on 192.0.2.10 and 192.0.2.11, both authoritative
on one range, their leases in one table. A UEFI VM (OVMF, EDK2's own PXE client, then ipxe.efi) boots from
whichever answers first; the server it booted through is then killed (SIGKILL), and the same machine boots again:
the other server acknowledges it the address the dead one had leased it, and it boots the same system to its
init. The last line says `demo: SUCCESS: ...` or `demo: FAILED: ...`; everything started is stopped and removed
on the way out, on an error or SIGTERM too. Needs root.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from ipaddress import IPv4Address
from pathlib import Path
from types import FrameType
from typing import TextIO

from devtools import qemu
from devtools.lan import Host, Lan, LanError
from devtools.lanboot import MARKER, boot_vm
from devtools.postgres import Cluster, ClusterError

SERVERS = {"a": "192.0.2.10", "b": "192.0.2.11"}
RANGE = "192.0.2.100-192.0.2.199"
MAC = "52:54:00:de:e0:29"


class DemoFailed(Exception):
    """A step did not do what the demo shows: the message says which in one line, `details` shows the evidence
    (a console's or a log's end)."""

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


def step(text: str) -> None:
    print(f"\n=== {text}", flush=True)


class Server:
    """`netboot serve` in a host's namespace, its log in a file."""

    def __init__(self, host: Host, name: str, out: Path, url: str, work: Path) -> None:
        self.host, self.name = host, name
        self.log = work / f"serve-{name}.log"
        argv = [sys.executable, "-m", "netboot", "serve", "--dir", str(out), "--http", "0.0.0.0:8080",
                "--tftp", "0.0.0.0:69", "--status", "none", "--dhcp", RANGE, "--database", url, "--name", name]
        with self.log.open("w") as log:
            self.proc = host.popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                                   cwd=Path(__file__).resolve().parent.parent)
        deadline = time.monotonic() + 30
        while "dhcp: DHCP server for" not in self.text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise DemoFailed(f"netboot serve --name {name} did not start (its log above)", self.text()[-3000:])
            time.sleep(0.05)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def served(self, mac: str) -> bool:
        """Whether this server handed `mac` its boot script (iPXE's HTTP request for it)."""
        return re.search(rf" http /machine/{mac.replace(':', '-')}/boot\.ipxe 200", self.text()) is not None

    def acks(self, mac: str) -> list[str]:
        """This server's ACK lines to `mac`, as logged."""
        return [line.split("dhcp: ", 1)[1] for line in self.text().splitlines()
                if f"dhcp: {mac} " in line and " ACK " in line]


def lease(cluster: Cluster, mac: str) -> tuple[str, str] | None:
    """The lease of `mac` in the shared table: (address, the server that granted it), or None."""
    rows = cluster.psql(f"SELECT address, server FROM lease4 WHERE mac = '{mac}' AND state = 0").splitlines()
    if len(rows) > 1:
        raise DemoFailed(f"{mac} holds {len(rows)} leases in the shared table: {rows}")
    if not rows:
        return None
    address, server = rows[0].split("|")
    return str(IPv4Address(int(address))), server


def boot(lan: Lan, label: str, timeout: float, echo: TextIO | None) -> qemu.BootResult:
    result = boot_vm(lan, MAC, uefi=True, pxe_rom=False, timeout=timeout, echo=echo)
    if not result.expected_seen or result.panicked:
        why = "timed out" if result.timed_out else "panicked" if result.panicked else "stopped"
        raise DemoFailed(f"the {label} boot {why} before the demo system's init checked its store "
                         f"({result.elapsed:.0f} s; the console's end above)", result.console[-2000:])
    print(f"\n{label} boot: the demo system's init ran and checked its store ({MARKER}) "
          f"{result.elapsed:.0f} s after power-on", flush=True)
    return result


def demo(out: Path, timeout: float, echo: TextIO | None) -> str:
    with tempfile.TemporaryDirectory(prefix="netboot-demo-ha-") as tmp, Lan("nbdemoha") as lan, \
            Cluster() as cluster:
        work = Path(tmp)
        step(f"a throwaway PostgreSQL cluster on a Unix socket ({cluster.socket_dir}), database netboot")
        step(f"two servers, one range {RANGE}, one lease table: netboot serve --dir {out} --dhcp {RANGE} "
             f"--database postgresql://netboot@/netboot?host=... --name a|b")
        servers = {}
        for name, address in SERVERS.items():
            servers[name] = Server(lan.host(name, f"{address}/24"), name, out, cluster.url, work)
            print(f"server {name} on {address}: serving (PID {servers[name].proc.pid})", flush=True)

        step(f"a UEFI VM ({MAC}) boots from the network: both servers hear its DHCP, it takes the first offer")
        boot(lan, "first", timeout, echo)
        first = lease(cluster, MAC)
        if first is None:
            raise DemoFailed(f"no lease of {MAC} in the shared table after its boot")
        through = [name for name, server in servers.items() if server.served(MAC)]
        if not through:
            raise DemoFailed("neither server's log shows the VM's boot script served")
        victim = through[-1]
        survivor = next(name for name in servers if name != victim)
        print(f"lease in the shared table: {first[0]}, granted by server {first[1]}; "
              f"boot script served by server {victim}", flush=True)

        step(f"kill -9 server {victim} (PID {servers[victim].proc.pid}): no shutdown, no goodbye to the database")
        os.kill(servers[victim].proc.pid, signal.SIGKILL)
        servers[victim].proc.wait()
        print(f"server {victim} is gone; its lease rows stay in the table", flush=True)

        step(f"the same machine boots again: only server {survivor} is left to answer")
        acks_before = len(servers[survivor].acks(MAC))
        boot(lan, "second", timeout, echo)
        second = lease(cluster, MAC)
        if not servers[survivor].served(MAC) or len(servers[survivor].acks(MAC)) <= acks_before:
            raise DemoFailed(f"server {survivor} did not serve the second boot (its log above)",
                             servers[survivor].text()[-2000:])
        if second is None or second[0] != first[0]:
            raise DemoFailed(f"the machine had {first[0]} and got {second[0] if second else 'no lease'} from "
                             f"server {survivor}")
        print(f"server {survivor} acknowledged {second[0]}, the address server {victim} had leased: "
              f"{servers[survivor].acks(MAC)[-1]}", flush=True)
        twice = cluster.psql("SELECT count(*) FROM (SELECT address FROM lease4 WHERE state = 0 "
                             "GROUP BY address HAVING count(DISTINCT mac) > 1) t")
        if twice != "0":
            raise DemoFailed(f"{twice} addresses held by two machines in the shared table")
        step("stopping the server, the VM's LAN and the PostgreSQL cluster")
        return (f"server {victim} was killed; server {survivor} gave the machine its address {first[0]} again "
                f"from the shared lease table and booted it to the demo system's init")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devtools.haboot", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, metavar="OUT", help="an output directory of `netboot build`")
    p.add_argument("--timeout", type=float, default=300, help="seconds each boot may take (default 300)")
    p.add_argument("-q", "--quiet", action="store_true", help="do not echo the VM's console")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("demo: FAILED: needs root (network namespaces and taps)")
        return 1
    if not (args.out / "manifest.json").is_file():
        print(f"demo: FAILED: {args.out} is not an output directory of netboot build")
        return 2

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(f"demo: FAILED: stopped by signal {signum}")

    # SIGTERM as a SystemExit: the with-blocks stop the servers and the VM, delete the namespaces and remove
    # the cluster on the way out.
    signal.signal(signal.SIGTERM, stop)
    try:
        done = demo(args.out.absolute(), args.timeout, None if args.quiet else sys.stdout)
    except DemoFailed as e:
        if e.details:
            print(f"\n{e.details}")
        print(f"demo: FAILED: {e}")
        return 1
    except (LanError, ClusterError, RuntimeError, OSError) as e:
        print(f"demo: FAILED: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        return 1
    print(f"\ndemo: SUCCESS: {done}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
