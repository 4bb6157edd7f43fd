"""Stage 1's IPv6 network configuration (stage1-init.sh's own functions, run by the busybox stage 1 carries) on a
namespace LAN without IPv4: with the address iPXE passed (netboot.ip6=, netboot.gateway6=), and with none, from
the kernel's SLAAC after radvd's advertisement; then busybox wget fetches over IPv6 by a bracketed URL."""

from __future__ import annotations

import hashlib
import ipaddress
import re
import subprocess
import sys
import time
from importlib.resources import files

from lan_support import lan_fixture  # noqa: F401  (lan_fixture: the `lan` fixture)
from support import need

from devtools.lan import Host, Lan
from netboot.image.stage1 import HOST_BUSYBOX

SCRIPT = (files("netboot.image") / "stage1-init.sh").read_text()
SERVER = "2001:db8::10"


def functions(*names: str) -> str:
    """The definitions of stage1-init.sh's shell functions `names`, as the script has them."""
    found = []
    for name in names:
        m = re.search(rf"^{name}\(\) {{\n.*?^}}\n", SCRIPT, re.M | re.S)
        assert m, f"stage1-init.sh has no function {name}"
        found.append(m.group(0))
    return "".join(found)


def stage1(node: Host, commands: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """`commands` in busybox's sh in `node`'s namespace, after the network functions of stage 1 (busybox's
    applets as the commands, as in stage 1)."""
    need(str(HOST_BUSYBOX))
    applets = "".join(f"{a}() {{ {HOST_BUSYBOX} {a} \"$@\"; }}\n"
                      for a in ("ip", "awk", "sleep", "wget", "cat", "tr", "ipcalc"))
    # The drivers are this machine's: stage 1's modprobe by modalias is not for the test's host.
    script = (applets + "load_network_drivers() { :; }\n"
              + functions("say", "global_ipv6", "configure_ipv6", "find_interfaces", "wait_for_carrier",
                          "configure_network") + commands)
    return node.run([HOST_BUSYBOX, "sh", "-c", script], capture_output=True, text=True, timeout=timeout)


def http_server(host: Host, tmp) -> None:
    """Python's HTTP server on [SERVER]:8080 in `host`, serving `tmp`; returns once it listens."""
    host.popen([sys.executable, "-m", "http.server", "-b", SERVER, "-d", tmp, "8080"], stdout=subprocess.DEVNULL,
               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while "LISTEN" not in host.run(["ss", "-Hltn", "sport = :8080"], capture_output=True, text=True).stdout:
        assert time.monotonic() < deadline, "python -m http.server did not listen"
        time.sleep(0.05)


def test_the_address_ipxe_passed_then_a_download_by_a_bracketed_url(lan: Lan, tmp_path) -> None:
    server = lan.host("netboot", f"{SERVER}/64")
    (tmp_path / "image").write_bytes(b"the image\n" * 1000)
    http_server(server, tmp_path)
    node = lan.host("node", None)
    router = server.link_local()  # stands for the router iPXE named: a neighbour on the link
    proc = stage1(node, f"netif=eth0 ip6=2001:db8::77/64 gateway6={router}\nconfigure_ipv6 || exit 9\n"
                        f"wget -q -O /dev/stdout 'http://[{SERVER}]:8080/image' | {HOST_BUSYBOX} sha256sum\n")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"netboot stage 1: network: eth0 2001:db8::77/64 via {router} (from the loader)"
    assert lines[1].split()[0] == hashlib.sha256(b"the image\n" * 1000).hexdigest()
    addresses = node.run(["ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "global"], capture_output=True,
                         text=True).stdout
    assert "2001:db8::77/64" in addresses and "tentative" not in addresses  # usable at once: no DAD
    routes = node.run(["ip", "-6", "route", "show", "default"], capture_output=True, text=True).stdout
    assert f"default via {router} dev eth0" in routes


def test_without_ipxes_address_the_kernels_slaac_address(lan: Lan) -> None:
    lan.host("router", "2001:db8::1/64").radvd(managed=False, other=True)
    node = lan.host("node", None)
    proc = stage1(node, "netif=eth0 ip6=/ gateway6=\nconfigure_ipv6 || exit 9\n")  # iPXE knew no IPv6: "/"
    assert proc.returncode == 0, proc.stderr
    m = re.fullmatch(r"netboot stage 1: network: eth0 (\S+) \(router advertisement\)\n", proc.stdout)
    assert m, proc.stdout
    assert ipaddress.IPv6Interface(m.group(1)).network == ipaddress.IPv6Network("2001:db8::/64")


def test_no_address_from_anywhere_is_a_failure(lan: Lan) -> None:
    node = lan.host("node", None)  # no router on the LAN, nothing from iPXE
    proc = stage1(node, "netif=eth0 ip6=/ gateway6=\nconfigure_ipv6 && echo configured\n")
    assert (proc.stdout, proc.returncode) == ("", 1), proc
    assert "scope global" not in node.run(["ip", "-6", "-o", "addr", "show", "dev", "eth0"], capture_output=True,
                                          text=True).stdout


def test_an_image_on_an_ipv6_address_takes_ipv6_though_the_loader_had_ipv4_too(lan: Lan) -> None:
    """A dual-stack iPXE asked for its script at the server's IPv6 address: the image's URL is an IPv6 literal, and
    stage 1 configures iPXE's IPv6 address, not its IPv4 one (which would leave the image out of reach)."""
    node = lan.host("node", None)
    mac = node.run(["cat", "/sys/class/net/eth0/address"], capture_output=True, text=True).stdout.strip()
    facts = (f"bootif=01-{mac.replace(':', '-')} ipconf=192.0.2.77::192.0.2.1:255.255.255.0:::none: "
             "ip6=2001:db8::77/64 gateway6=")
    proc = stage1(node, f"{facts} url='http://[{SERVER}]:8080/image'\nconfigure_network || exit 9\n"
                        "echo \"netif=$netif\"\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["netboot stage 1: network: eth0 2001:db8::77/64 (from the loader)",
                                        "netif=eth0"]
    assert "inet " not in node.run(["ip", "-4", "-o", "addr", "show", "dev", "eth0"], capture_output=True,
                                   text=True).stdout
    # An image named by a host name, from a loader without IPv4: its IPv6 address, not DHCPv4.
    node.run(["ip", "-6", "addr", "flush", "dev", "eth0", "scope", "global"], check=True)
    facts = f"bootif=01-{mac.replace(':', '-')} ipconf=::::::none: ip6=2001:db8::78/64 gateway6="
    proc = stage1(node, f"{facts} url=http://mirror.example/image\nconfigure_network || exit 9\n")
    assert proc.stdout.splitlines() == ["netboot stage 1: network: eth0 2001:db8::78/64 (from the loader)"], proc
