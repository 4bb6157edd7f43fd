"""A fleet network-booting through QEMU's own iPXE ROM from a real `netboot serve`, and the status listener
watching it: two registered machines, BIOS over HTTP and UEFI over TFTP alone, each with its own kernel
parameters and its own /etc/hostname from an overlay rendered from one template; a machine nobody registered, on
the default profile's direct build; then the API, the metrics and the page (in headless Chromium) must tell what
happened."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import re
import struct
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from browser import Browser
from prometheus_client.parser import text_string_to_metric_families
from support import ServerProcess, assert_booted, hostname_seen, need, netboot_vm

from devtools import qemu

NODE1, NODE2, STRANGER, LATE = "52:54:00:00:01:01", "52:54:00:00:01:02", "52:54:00:00:09:09", "52:54:00:00:01:03"
# How each VM boots: its firmware (UEFI or not) and the protocol of its boot file, which iPXE keeps to the end.
RUNS = {NODE1: ("http", False), NODE2: ("tftp", True), STRANGER: ("http", False)}


@pytest.fixture(scope="module")
def fleet(outs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """Two registered machines on the squashfs build (and LATE, which never boots), everyone else on the direct
    build by default; each profile with an overlay whose /etc/hostname is rendered from the profile's `site` and
    the machine's keys. The server, and each VM's boot by MAC."""
    need(qemu.qemu_binary())
    assert qemu.OVMF_CODE.is_file(), "OVMF is not installed (make test installs Debian's ovmf)"
    d = tmp_path_factory.mktemp("fleet")
    for overlay, template in (("overlay", "{{ site }}{{ hostname }}\n"), ("overlay-default", "{{ site }}{{ mac }}\n")):
        (d / overlay / "etc").mkdir(parents=True)
        (d / overlay / "etc/hostname.j2").write_text(template)
    f = d / "machines.toml"
    f.write_text(f"""
[profiles.default]
dir = "{outs["direct"]}"
# loglevel=7 shows the kernel's "Run … as init process": nothing else marks the start of init in direct format.
append = "loglevel=7 netboot.profile=default"
overlay = "overlay-default"
vars = {{ site = "bench-" }}

[profiles.squash]
dir = "{outs["squashfs"]}"
append = "netboot.profile=squash"
overlay = "overlay"
vars = {{ site = "rack1-" }}

[machines."{NODE1}"]
profile = "squash"
append = "hostname=node1"
hostname = "node1"

[machines."{NODE2.replace(":", "-").upper()}"]
profile = "squash"
append = "hostname=node2"
hostname = "node2"

[machines."{LATE}"]
profile = "squash"
""")
    server = ServerProcess("--machines", f, "--http", "127.0.0.1:0", "--tftp", "127.0.0.1:0")
    try:
        urls = {"http": f"http://10.0.2.2:{server.http_port}/boot.ipxe",
                "tftp": f"tftp://10.0.2.2:{server.tftp_port}/boot.ipxe"}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            results = dict(zip(RUNS, pool.map(lambda mac: netboot_vm(urls[RUNS[mac][0]], mac, uefi=RUNS[mac][1]),
                                              RUNS), strict=True))
        yield server, results
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server(fleet: tuple[ServerProcess, dict[str, qemu.BootResult]]) -> ServerProcess:
    return fleet[0]


def cmdline_of(result: qemu.BootResult) -> list[str]:
    return next(ln for ln in result.lines if ln.startswith("NETBOOT-TEST: cmdline:")).split()[2:]


def status(server: ServerProcess, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.status_port}{path}", timeout=30) as r:
        return r.read()


class TestFleet:
    """The tests of the VMs `fleet` boots: a class, so that `make test` runs them on one worker (conftest.py),
    which boots the VMs once."""

    def test_registered_machines_boot_with_their_own_parameters_and_overlays(
            self, fleet: tuple[ServerProcess, dict[str, qemu.BootResult]], system: Path, closure: list[str]) -> None:
        server, results = fleet
        # UEFI: iPXE starts the kernel through its EFI stub, which loads the initrd named by initrd=initrd.
        assert "EFI stub: Loaded initrd from command line option" in results[NODE2].console
        for mac, name in ((NODE1, "node1"), (NODE2, "node2")):
            result = results[mac]
            assert_booted(result, closure, system)
            args = cmdline_of(result)
            assert args[-2:] == ["netboot.profile=squash", f"hostname={name}"], args
            assert f"init={system}/init" in args
            assert any(ln.startswith("NETBOOT-TEST: store mount: overlay /nix/store overlay") for ln in result.lines)
            assert hostname_seen(result.lines) == f"rack1-{name}", result.console[-3000:]
            path, protocol = f"/machine/{mac.replace(':', '-')}", RUNS[mac][0]
            for step in ("boot.ipxe", r"\w+/bzImage", r"\w+/initrd", r"\w+/overlay"):
                assert re.search(rf"mac={mac} profile=squash {protocol} {path}/{step} (200|complete)", server.log), (
                    step, server.log)

    def test_an_unregistered_machine_boots_the_default_profile(
            self, fleet: tuple[ServerProcess, dict[str, qemu.BootResult]], system: Path, closure: list[str]) -> None:
        result = fleet[1][STRANGER]
        assert_booted(result, closure, system)
        args = cmdline_of(result)
        assert args[-1] == "netboot.profile=default" and f"rdinit={system}/init" in args
        assert "NETBOOT-TEST: store mount: none" in result.console  # the direct build
        assert hostname_seen(result.lines) == f"bench-{STRANGER}", result.console[-3000:]  # the overlay over the root

    def test_the_tftp_vm_booted_over_tftp_only(self, server: ServerProcess) -> None:
        assert not [ln for ln in server.lines if f"mac={NODE2} " in ln and " http " in ln], server.log
        # The HTTP VMs' first requests; the TFTP VM's went to TFTP.
        assert sum(" http /boot.ipxe " in ln for ln in server.lines) == 2, server.log
        assert sum(" tftp /boot.ipxe complete " in ln for ln in server.lines) == 1, server.log

    def test_every_vm_is_handed_over(self, server: ServerProcess, outs: dict[str, Path]) -> None:
        machines = {m["mac"]: m for m in json.loads(status(server, "/api/machines"))["machines"]}
        for mac, profile, out in ((NODE1, "squash", "squashfs"), (NODE2, "squash", "squashfs"),
                                  (STRANGER, "default", "direct")):
            m = machines[mac]
            # The overlay is the last file of a boot: the machine is handed over once it has it.
            assert (m["state"], m["profile"], m["last"]["protocol"]) == ("handed-over", profile, RUNS[mac][0]), m
            assert m["last"]["path"].endswith("/overlay"), m
            assert m["system"] == json.loads((outs[out] / "manifest.json").read_text())["system"]
            assert m["client"] == "127.0.0.1"  # QEMU's user network: the VM's packets come from the host
        assert machines[LATE]["state"] == "configured"

    def test_metrics_count_the_bytes_sent(self, server: ServerProcess) -> None:
        samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        for family in text_string_to_metric_families(status(server, "/metrics").decode()):
            for s in family.samples:
                samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
        events = json.loads(status(server, "/api/events"))["events"]
        for protocol in ("http", "tftp"):
            ok = [e for e in events if e["protocol"] == protocol and e["ok"]]
            status_of = "200" if protocol == "http" else "complete"
            sent = samples["netboot_sent_bytes_total"][("protocol", protocol), ("status", status_of)]
            assert sent == sum(e["bytes"] for e in ok if e["status"] == status_of)
            assert sent > 5_000_000  # a kernel and an initrd
        assert samples["netboot_boots_handed_over_total"] == {(("profile", "default"),): 1, (("profile", "squash"),): 2}
        assert samples["netboot_machines"][(("state", "handed-over"),)] == 3

    def test_the_page_in_a_browser_shows_the_machines_and_updates_live(self, server: ServerProcess,
                                                                       tmp_path: Path) -> None:
        browser = Browser(tmp_path / "chromium")
        try:
            shot = asyncio.run(_page(server, browser))
        finally:
            browser.stop()
        assert shot[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", shot[16:24])
        assert width >= 1000 and height >= 200
        target = os.environ.get("NETBOOT_SCREENSHOT")  # `make screenshot`: docs/api.md's picture
        (Path(target) if target else tmp_path / "status.png").write_bytes(shot)


async def _page(server: ServerProcess, browser: Browser) -> bytes:
    await browser.open()
    try:
        await browser.goto(f"http://127.0.0.1:{server.status_port}/")
        rows: list[list[Any]] = await browser.evaluate(
            "Array.from(document.querySelectorAll('#rows tr')).map(r => [r.id, r.dataset.state, r.innerText])")
        states = {row[0]: row[1] for row in rows}
        assert all(states[f"m-{mac}"] == "handed-over" for mac in RUNS), rows
        assert states[f"m-{LATE}"] == "configured"
        await browser.wait_for("document.getElementById('live').textContent === 'live'")
        # A new boot while the page is open: LATE fetches its script, as iPXE would.
        with urllib.request.urlopen(server.url(f"machine/{LATE.replace(':', '-')}/boot.ipxe"), timeout=30):
            pass
        await browser.wait_for(f"document.getElementById('m-{LATE}').dataset.state === 'booting'")
        text = await browser.evaluate(f"document.getElementById('m-{LATE}').innerText")
        assert "squash" in text and "boot.ipxe" in text
        return await browser.screenshot()
    finally:
        await browser.close()
