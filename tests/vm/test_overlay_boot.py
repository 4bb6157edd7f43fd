"""Overlays on real boots: QEMU VMs of a squashfs profile and of a direct profile each see their own
/etc/hostname, rendered from one template, over BIOS and UEFI and over HTTP and TFTP."""

from __future__ import annotations

import concurrent.futures
import json
import re
import urllib.request
from pathlib import Path

import pytest
from support import MARKER, ServerProcess, netboot_vm

SQUASH1, SQUASH2, DIRECT = "52:54:00:00:0c:01", "52:54:00:00:0c:02", "52:54:00:00:0c:03"
HOSTNAMES = {SQUASH1: "rack1-node1", SQUASH2: "rack1-node2", DIRECT: "bench-node3"}


@pytest.fixture(scope="module")
def server(outs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("overlay-boot")
    (d / "overlay/etc").mkdir(parents=True)
    (d / "overlay/etc/hostname.j2").write_text("{{ site }}{{ hostname }}\n")
    f = d / "machines.toml"
    f.write_text(f"""
[profiles.squash]
dir = "{outs["squashfs"]}"
overlay = "overlay"
vars = {{ site = "rack1-" }}

[profiles.direct]
dir = "{outs["direct"]}"
overlay = "overlay"
vars = {{ site = "bench-" }}

[machines."{SQUASH1}"]
profile = "squash"
hostname = "node1"

[machines."{SQUASH2}"]
profile = "squash"
hostname = "node2"

[machines."{DIRECT}"]
profile = "direct"
hostname = "node3"
""")
    server = ServerProcess("--machines", f, "--http", "127.0.0.1:0", "--tftp", "127.0.0.1:0")
    yield server
    server.stop()


def hostname_seen(console_lines: list[str]) -> str:
    return next(ln for ln in console_lines if ln.startswith("NETBOOT-TEST: hostname:")).split(": ", 2)[2].strip()


def test_each_vm_sees_its_own_hostname(server: ServerProcess) -> None:
    http = f"http://10.0.2.2:{server.http_port}/boot.ipxe"
    tftp = f"tftp://10.0.2.2:{server.tftp_port}/boot.ipxe"
    runs = [(SQUASH1, http, False), (SQUASH2, tftp, True), (DIRECT, http, False)]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda run: netboot_vm(run[1], run[0], uefi=run[2]), runs))
    for (mac, url, _), result in zip(runs, results, strict=True):
        protocol = url.split(":")[0]
        assert any(line.startswith(MARKER) for line in result.lines), result.console[-3000:]
        assert hostname_seen(result.lines) == HOSTNAMES[mac], result.console[-3000:]
        fetched = rf"mac={mac} profile=\w+ {protocol} /machine/{mac.replace(':', '-')}/\w+/overlay (200|complete)"
        assert re.search(fetched, server.log), server.log
    # The overlay is the last file of a boot: the machine is handed over once it has it.
    with urllib.request.urlopen(f"http://127.0.0.1:{server.status_port}/api/machines", timeout=30) as r:
        machines = {m["mac"]: m for m in json.loads(r.read())["machines"]}
    for mac in HOSTNAMES:
        assert machines[mac]["state"] == "handed-over", machines[mac]
        assert machines[mac]["last"]["path"].endswith("/overlay"), machines[mac]
