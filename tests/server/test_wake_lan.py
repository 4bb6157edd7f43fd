"""Wake-on-LAN on a namespace LAN: `POST /api/machines/<mac>/wake` sends the magic packet to the broadcast address
of the machine's network, and a listener in another namespace of the LAN receives it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from lan_support import lan_fixture, serve_in  # noqa: F401  (lan_fixture: the `lan` fixture)
from support import fake_out, need

from devtools.lan import Host, Lan, ip

TOKEN = "wake-token"
SEEN, NEVER = "52:54:00:00:11:01", "52:54:00:00:11:02"
LISTEN = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 9))
s.settimeout(30)
print("listening", flush=True)
for _ in range(int(sys.argv[1])):
    data, source = s.recvfrom(2048)
    print(source[0], data.hex(), flush=True)
"""


def listen(host: Host, count: int) -> subprocess.Popen:
    proc = host.popen([sys.executable, "-c", LISTEN, str(count)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                      text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "listening\n", proc.stderr
    return proc


def curl(host: Host, *args: str) -> str:
    need("curl")
    proc = host.run(["curl", "-sS", "--fail-with-body", *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_a_magic_packet_reaches_the_machines_network(lan: Lan, tmp_path: Path) -> None:
    (tmp_path / "machines.toml").write_text(f'[profiles.default]\ndir = "{fake_out(tmp_path / "out")}"\n')
    netboot = lan.host("netboot", "192.0.2.10/25")
    # A second network of the server's, where no machine of this test is: a packet for a machine never seen
    # goes to both, one for a machine seen goes to its own alone.
    ip("-n", netboot.netns, "link", "add", "other0", "type", "veth", "peer", "name", "other1")
    ip("-n", netboot.netns, "addr", "add", "192.0.2.129/25", "dev", "other0")
    for end in ("other0", "other1"):
        ip("-n", netboot.netns, "link", "set", end, "up")
    server = serve_in(netboot, "--machines", tmp_path / "machines.toml", "--no-tftp", "--status", "192.0.2.10:9480",
                      "--status-token", TOKEN)
    sleeper = lan.host("sleeper", "192.0.2.20/25")
    # SEEN asks for its script from the sleeper's address: netboot has seen it on that network.
    curl(sleeper, f"http://192.0.2.10:8080/machine/{SEEN.replace(':', '-')}/boot.ipxe")
    listener = listen(sleeper, 2)
    wake = ["-X", "POST", "-H", f"Authorization: Bearer {TOKEN}"]
    seen = json.loads(curl(sleeper, *wake, f"http://192.0.2.10:9480/api/machines/{SEEN}/wake"))
    never = json.loads(curl(sleeper, *wake, f"http://192.0.2.10:9480/api/machines/{NEVER}/wake"))
    out, err = listener.communicate(timeout=60)
    assert seen == {"mac": SEEN, "sent": ["eth0 192.0.2.127:9"]}
    assert never == {"mac": NEVER, "sent": ["eth0 192.0.2.127:9", "other0 192.0.2.255:9"]}
    packets = [line.split() for line in out.splitlines()]
    assert packets == [["192.0.2.10", ("ff" * 6) + SEEN.replace(":", "") * 16],
                       ["192.0.2.10", ("ff" * 6) + NEVER.replace(":", "") * 16]], err
    assert server.logged(f"wake: magic packet for {SEEN} sent on eth0 192.0.2.127:9")
    server.stop()
