"""A LAN in network namespaces: a bridge, servers in namespaces of their own, QEMU VMs on tap devices.

For trying netboot with real PXE firmware and real DHCP servers (tests, `make demo-proxy`, benchmarks).

    with Lan() as lan:
        server = lan.host("netboot", "192.0.2.10/24")    # a namespace whose eth0 is on the bridge
        dhcp = lan.host("dhcp", "192.0.2.2/24")
        dnsmasq = dhcp.dnsmasq("--dhcp-boot=ipxe.efi,,192.0.2.10", leasefile=tmp / "leases")
        server.popen(["netboot", "serve", "--dir", "out"])
        tap = lan.tap()
        qemu.watch(lan.vm(qemu.lan_argv(tap, "52:54:00:00:00:01", uefi=False)), timeout=120)

Everything goes through the `ip` command (iproute2), so each step is a command line one can repeat by hand.
The switch is a namespace of its own holding the bridge `br0`, the switch ends of the hosts' veth pairs and the
VMs' taps; a VM's QEMU runs in it so that it can open its tap. Names carry the process ID and a counter, so
LANs of parallel runs never meet. `close()` kills what was started in the namespaces and deletes them, which
removes their interfaces. Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

_counter = itertools.count(1)


class LanError(RuntimeError):
    """A command that builds or runs the LAN failed; the message names it and quotes its stderr."""


def _run(argv: Sequence[str]) -> str:
    argv = list(argv)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise LanError(f"`{argv[0]}` is not installed (Debian: iproute2)") from e
    if proc.returncode != 0:
        raise LanError(f"`{' '.join(argv)}` failed (exit status {proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def ip(*args: str) -> str:
    """Run `ip ARGS`; a failure is a LanError naming the command and quoting its stderr."""
    return _run(["ip", *args])


# Router advertisements on the LAN's bridge, twice a second: ICMPv6 type 134 (RFC 4861 §4.2) with router lifetime
# 0 and no options, so no host gets a route or an address from them. iPXE configures IPv6 beside DHCP and, on a
# LAN where no router answers its solicitations, waits about 18 s (its "Configuring ..." dots) before it goes on;
# with an advertisement it goes on once DHCP is done. The kernel fills in the checksum (RFC 3542 §3.1).
_ADVERTISE = """
import socket, sys, time
index = socket.if_nametoindex(sys.argv[1])
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
while True:
    try:
        s.sendto(bytes([134]) + bytes(15), ("ff02::1", 0, 0, index))
    except OSError:  # the bridge has no link-local address until a port is up
        pass
    time.sleep(0.5)
"""


class Lan:
    """A bridge in a "switch" namespace; hosts on veth pairs and VMs on taps join it. A context manager."""

    def __init__(self, name: str = "nblan") -> None:
        self.name = f"{name}-{os.getpid()}-{next(_counter)}"
        self.switch = f"{self.name}-sw"
        self.hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen] = []
        self._directories: list[Path] = []  # the servers' configuration files, removed with the LAN
        self._links = itertools.count(1)
        self._advertising = False
        _remove_orphans(name)
        try:
            self._add_namespace(self.switch)
            ip("-n", self.switch, "link", "add", "br0", "type", "bridge", "forward_delay", "0", "stp_state", "0")
            ip("-n", self.switch, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    def _add_namespace(self, netns: str) -> None:
        ip("netns", "add", netns)
        self._namespaces.append(netns)
        ip("-n", netns, "link", "set", "lo", "up")

    def host(self, name: str, address: str | None) -> Host:
        """A namespace joined to the bridge by a veth pair: `eth0` inside, with `address` (CIDR), up. None: no
        address but the IPv6 link-local one the kernel gives it, as a machine has before it is configured."""
        if name in self.hosts:
            raise LanError(f"{self.name} already has a host named {name}")
        if address is not None and "/" not in address:
            raise LanError(f"{address}: give the address with its prefix length, e.g. 192.0.2.10/24")
        netns = f"{self.name}-{name}"
        self._add_namespace(netns)
        veth = f"veth{next(self._links)}"
        ip("-n", self.switch, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        ip("-n", self.switch, "link", "set", veth, "master", "br0", "up")
        # nodad: the address is ours at once; duplicate address detection would hold it "tentative" (unusable
        # for a bind) for a second or more (RFC 4862 §5.4).
        if address is not None:
            ip("-n", netns, "addr", "add", address, "dev", "eth0", *(("nodad",) if ":" in address else ()))
        ip("-n", netns, "link", "set", "eth0", "up")
        host = Host(self, name, netns, "eth0", address or "")
        self.hosts[name] = host
        return host

    def tap(self) -> str:
        """A tap device on the bridge, up, in the switch namespace; run its QEMU with `vm()`. The first also starts
        the LAN's router advertisements (_ADVERTISE), for the VMs' iPXE."""
        tap = f"tap{next(self._links)}"
        ip("-n", self.switch, "tuntap", "add", tap, "mode", "tap")
        ip("-n", self.switch, "link", "set", tap, "master", "br0", "up")
        if not self._advertising:  # nor when radvd advertises (Host.radvd)
            self._procs.append(subprocess.Popen(self.vm([sys.executable, "-c", _ADVERTISE, "br0"]),
                                                stdin=subprocess.DEVNULL))
            self._advertising = True
        return tap

    def vm(self, argv: Sequence[str]) -> list[str]:
        """A QEMU command line run in the switch namespace, where its tap is (`ip netns exec` execs it: same PID)."""
        return ["ip", "netns", "exec", self.switch, *argv]

    def close(self) -> None:
        """Stop every process started in the LAN, then delete its namespaces. Idempotent."""
        procs, self._procs = self._procs, []
        for proc in procs:
            _stop(proc)
        directories, self._directories = self._directories, []
        for directory in directories:
            shutil.rmtree(directory, ignore_errors=True)
        namespaces, self._namespaces = self._namespaces, []
        errors = []
        for netns in reversed(namespaces):
            # Whatever still runs in the namespace was started into it (a VM by vm(), a server's children):
            # it would keep the namespace alive after its name is gone.
            _kill_all_in(netns)
            try:
                ip("netns", "del", netns)
            except LanError as e:
                errors.append(str(e))
        if errors:
            raise LanError("; ".join(errors))

    def __enter__(self) -> Lan:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class Host:
    """A machine on the LAN: a network namespace whose `eth0` has `address` ("": none of its own)."""

    def __init__(self, lan: Lan, name: str, netns: str, ifname: str, cidr: str) -> None:
        self.lan = lan
        self.name = name
        self.netns = netns
        self.ifname = ifname
        self.cidr = cidr
        self.address = cidr.split("/")[0]

    def __repr__(self) -> str:
        return f"Host({self.name!r}, netns={self.netns!r}, address={self.cidr!r})"

    def argv(self, argv: Sequence[str | os.PathLike[str]]) -> list[str]:
        """The command line run in this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *map(str, argv)]

    def popen(self, argv: Sequence[str | os.PathLike[str]], **kw) -> subprocess.Popen:
        """Start a process in this host's namespace; the LAN stops it by its PID when it closes."""
        proc = subprocess.Popen(self.argv(argv), **kw)
        self.lan._procs.append(proc)
        return proc

    def run(self, argv: Sequence[str | os.PathLike[str]], **kw) -> subprocess.CompletedProcess:
        """Run a command in this host's namespace to completion (subprocess.run's keywords)."""
        return subprocess.run(self.argv(argv), **kw)

    def drop_udp(self, percent: float) -> None:
        """Lose `percent`% of the UDP datagrams this namespace receives, at random, loopback included (nftables
        `numgen random` on the input hook; this is how the tests and benchmarks make a lossy network)."""
        if not 0 <= percent <= 100:
            raise LanError(f"{percent}: a loss rate is a percentage, 0-100")
        ruleset = f"""table inet netboot_loss {{
    chain input {{
        type filter hook input priority 0; policy accept;
        meta l4proto udp numgen random mod 10000 < {round(percent * 100)} counter drop
    }}
}}
"""
        proc = subprocess.run(self.argv(["nft", "-f", "-"]), input=ruleset, capture_output=True, text=True)
        if proc.returncode != 0:
            raise LanError(f"nft in {self.netns} failed (exit status {proc.returncode}): {proc.stderr.strip()}")

    def dropped_udp(self) -> int:
        """UDP datagrams dropped so far by `drop_udp`."""
        out = self.run(["nft", "list", "table", "inet", "netboot_loss"], capture_output=True, text=True).stdout
        m = re.search(r"counter packets (\d+)", out)
        return int(m.group(1)) if m else 0

    def dnsmasq(self, *extra: str, leasefile: Path,
                range: str = "192.0.2.100,192.0.2.199,255.255.255.0,1h", timeout: float = 10) -> Dnsmasq:
        """Debian's dnsmasq as this LAN's DHCP server on eth0 (no DNS, no /etc/dnsmasq.conf), plus `extra`.

        Returns once it listens on UDP port 67 (547, DHCPv6's, for a range of IPv6 addresses). Its log
        (--log-dhcp, every option of every exchange) is kept.
        """
        port = 547 if ":" in range else 67
        argv = [
            "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--pid-file=", "--log-facility=-", "--port=0",
            f"--interface={self.ifname}", "--bind-interfaces", f"--dhcp-range={range}",
            f"--dhcp-leasefile={leasefile}", "--log-dhcp", *extra,
        ]
        try:
            proc = self.popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
        except FileNotFoundError as e:  # `ip` itself
            raise LanError("`ip` is not installed (Debian: iproute2)") from e
        server = Dnsmasq(proc, leasefile)
        deadline = time.monotonic() + timeout
        while not self.listening(port, proc.pid):
            if proc.poll() is not None:
                server.drained.wait(2)
                raise LanError(f"`{' '.join(argv)}` in {self.netns} exited with status {proc.returncode}: "
                               f"{server.log.strip()}")
            if time.monotonic() > deadline:
                raise LanError(f"`{' '.join(argv)}` in {self.netns} did not listen on UDP port {port} within "
                               f"{timeout:.0f} s: {server.log.strip()}")
            time.sleep(0.05)
        return server

    def link_local(self, timeout: float = 10) -> str:
        """eth0's IPv6 link-local address once duplicate address detection has passed (RFC 4862 §5.4: until then
        it is "tentative", and nothing can send from it)."""
        deadline = time.monotonic() + timeout
        while True:
            out = ip("-n", self.netns, "-6", "-o", "addr", "show", "dev", self.ifname, "scope", "link")
            m = re.search(r"inet6 (fe80::\S+)/64", out)
            if m and "tentative" not in out:
                return m.group(1)
            if time.monotonic() > deadline:
                raise LanError(f"{self.netns}: {self.ifname} has no usable link-local address after {timeout:.0f} s"
                               f" ({out.strip() or 'none'})")
            time.sleep(0.05)

    def radvd(self, prefix: str = "2001:db8::/64", *, managed: bool = True, other: bool = False,
              timeout: float = 10) -> Radvd:
        """Debian's radvd as this LAN's router on eth0, advertising `prefix` (on-link, for SLAAC) with the M flag
        (`managed`: addresses from DHCPv6, what EDK2's PXE over IPv6 asks for) or the O flag (`other`: addresses
        from SLAAC, the rest from DHCPv6, which iPXE asks for). Returns once its first advertisement is out.

        The LAN's own stand-in advertisements (Lan.tap) are not started: one router on the link. The LAN stops
        radvd by its PID when it closes.
        """
        # radvd refuses an interface without a link-local address to advertise from (RFC 4861 §6.2.2), and
        # ignores forwarding's being off only with a warning: a router forwards.
        self.link_local(timeout)
        self.run(["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"], check=True)
        directory = Path(tempfile.mkdtemp(prefix="netboot-radvd-"))
        self.lan._directories.append(directory)
        config = directory / "radvd.conf"
        # The shortest intervals radvd takes (radvd.conf(5)): a booting client does not wait for them anyway, it
        # solicits, and radvd answers a solicitation at once (RFC 4861 §6.2.6: within 0.5 s).
        config.write_text(f"""interface {self.ifname} {{
    AdvSendAdvert on;
    MinRtrAdvInterval 3;
    MaxRtrAdvInterval 4;
    AdvManagedFlag {"on" if managed else "off"};
    AdvOtherConfigFlag {"on" if other or managed else "off"};
    prefix {prefix} {{
        AdvOnLink on;
        AdvAutonomous {"off" if managed else "on"};
    }};
}};
""")
        argv = ["radvd", "--nodaemon", "--config", str(config), "--pidfile", str(directory / "radvd.pid"),
                "--logmethod", "stderr", "--debug", "3"]
        self.lan._advertising = True
        try:
            proc = self.popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
        except FileNotFoundError as e:
            raise LanError("`ip` is not installed (Debian: iproute2)") from e
        server = Radvd(proc)
        deadline = time.monotonic() + timeout
        while "(myself)" not in server.log:  # its own first advertisement, heard back (--debug 3)
            if proc.poll() is not None:
                server.drained.wait(2)
                raise LanError(f"`{' '.join(argv)}` in {self.netns} exited with status {proc.returncode} "
                               f"(Debian: radvd): {server.log.strip()}")
            if time.monotonic() > deadline:
                raise LanError(f"`{' '.join(argv)}` in {self.netns} sent no advertisement within {timeout:.0f} s:"
                               f" {server.log.strip()}")
            time.sleep(0.05)
        return server

    def listening(self, port: int, pid: int | None = None) -> bool:
        """Whether a UDP socket in this namespace is bound to `port` (by process `pid`, if given)."""
        out = _run(self.argv(["ss", "-Hnlup", f"sport = :{port}"]))
        return bool(out.strip()) if pid is None else f"pid={pid}," in out


class Logged:
    """A running server of the LAN: its process and its log lines (stderr) so far."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.drained = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
        self.drained.set()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def stop(self) -> None:
        _stop(self.proc)


class Dnsmasq(Logged):
    """A running dnsmasq: its process, its log lines so far, its leases."""

    def __init__(self, proc: subprocess.Popen, leasefile: Path) -> None:
        super().__init__(proc)
        self.leasefile = leasefile

    def leases(self) -> dict[str, str]:
        return leases(self.leasefile)


class Radvd(Logged):
    """A running radvd: its process and its log lines so far."""


def leases(leasefile: Path) -> dict[str, str]:
    """A dnsmasq lease file as {MAC: IPv4 address} (lines: expiry MAC IP hostname client-id)."""
    try:
        text = leasefile.read_text()
    except FileNotFoundError:
        return {}
    result = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3 and re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", fields[1].lower()):
            result[fields[1].lower()] = fields[2]
    return result


def _remove_orphans(name: str) -> None:
    """Delete the namespaces of LANs whose process died without closing them (killed with SIGKILL)."""
    try:
        listed = ip("netns", "list")
    except LanError:
        return
    for line in listed.splitlines():
        netns = line.split(" ", 1)[0]
        m = re.fullmatch(rf"{re.escape(name)}-(\d+)-\d+-.+", netns)
        if m is None or Path(f"/proc/{m.group(1)}").exists():
            continue
        _kill_all_in(netns)
        with contextlib.suppress(LanError):
            ip("netns", "del", netns)


def _stop(proc: subprocess.Popen, grace: float = 5) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _kill_all_in(netns: str, timeout: float = 5) -> None:
    """SIGKILL every process in a namespace and wait (a little) until none is left."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pids = [int(pid) for pid in ip("netns", "pids", netns).split()]
        except LanError:
            return
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
