"""The fleet as operators run it, on real boots: a QEMU VM nobody listed (its SMBIOS UUID and serial given with
-uuid and -smbios) is recorded with them and does not boot; the page, in headless Chromium, shows the counts, the
machine's own page and the chart, and adopts it (a profile and a host name), which writes the machines file with its
comments kept; the same VM, asking again, boots that profile with its host name from the overlay. Meanwhile a VM
whose MAC is unknown but whose UUID is listed boots that table's profile, through the iPXE binary its profile
chose (undionly.kpxe, chained from its script)."""

from __future__ import annotations

import asyncio
import json
import struct
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from browser import Browser
from support import MARKER, ServerProcess, hostname_seen, need, vm_accel

from devtools import qemu

TOKEN = "fleet-token"
ADOPTED, BY_UUID = "52:54:00:00:12:01", "52:54:00:00:12:02"
ADOPTED_UUID, LISTED_UUID = "6b1a2c3d-0000-4000-8000-000000001201", "6b1a2c3d-0000-4000-8000-000000001202"


def machines_file(outs: dict[str, Path]) -> str:
    return f"""\
# The lab's machines. Unknown ones are adopted from the status page.
[profiles.rack]
dir = "{outs["squashfs"]}"   # the rack's build
overlay = "overlay"
vars = {{ site = "rack-" }}

[profiles.bench]
dir = "{outs["direct"]}"
overlay = "overlay"
vars = {{ site = "bench-" }}
ipxe_binary = "undionly.kpxe"   # this NIC's iPXE driver hangs: the firmware's UNDI driver instead

# the bench machine, known by its board's UUID (its NIC gets replaced)
[machines."uuid:{LISTED_UUID.upper()}"]
profile = "bench"
hostname = "by-uuid"
"""


@pytest.fixture(scope="module")
def lab(outs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("inventory-boot")
    (d / "overlay/etc").mkdir(parents=True)
    (d / "overlay/etc/hostname.j2").write_text("{{ site }}{{ hostname }}\n")
    (d / "machines.toml").write_text(machines_file(outs))
    server = ServerProcess("--machines", d / "machines.toml", "--http", "127.0.0.1:0", "--tftp", "127.0.0.1:0",
                           "--status-token", TOKEN)
    yield server, d / "machines.toml"
    server.stop()


def api(server: ServerProcess, path: str, method: str = "GET", body: Any = None,
        token: str | None = TOKEN) -> tuple[int, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{server.status_port}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def vm(url: str, mac: str, uuid: str, serial: str, results: dict[str, qemu.BootResult]) -> threading.Thread:
    """A VM network-booting `url` with an SMBIOS UUID and serial of its own, in a thread, until the marker."""
    argv = [*qemu.net_argv(url, mac), "-uuid", uuid,
            "-smbios", f"type=1,serial={serial},manufacturer=netboot-lab,product=rack-node"]

    def run() -> None:
        results[mac] = qemu.watch(argv, timeout=480, expect=MARKER)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def eventually(read: Any, done: Any, timeout: float = 240) -> Any:
    deadline = time.monotonic() + timeout
    while not done(value := read()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return value


def test_an_unknown_vm_is_recorded_adopted_on_the_page_and_boots(lab: tuple[ServerProcess, Path],
                                                                  outs: dict[str, Path], tmp_path: Path) -> None:
    server, machines = lab
    need(qemu.qemu_binary())
    vm_accel()
    results: dict[str, qemu.BootResult] = {}
    # The unknown VM over TFTP (its facts in the path of its script's name), the one listed by UUID over HTTP.
    threads = [vm(f"tftp://10.0.2.2:{server.tftp_port}/boot.ipxe", ADOPTED, ADOPTED_UUID, "SER-1201", results),
               vm(f"http://10.0.2.2:{server.http_port}/boot.ipxe", BY_UUID, LISTED_UUID, "SER-1202", results)]
    try:
        # Recorded with what it is, and not booting: it asked for its script only.
        status, entry = eventually(lambda: api(server, f"/api/machines/{ADOPTED}"),
                                   lambda r: r[0] == 200 and r[1]["state"] == "unknown-mac")
        assert status == 200 and entry["state"] == "unknown-mac", entry
        assert entry["facts"] == {"uuid": ADOPTED_UUID, "serial": "SER-1201", "manufacturer": "netboot-lab",
                                  "product": "rack-node", "buildarch": "i386", "platform": "pcbios"}
        assert {e["path"] for e in entry["events"]} == {"/machine/52-54-00-00-12-01/boot.ipxe"}
        assert entry["last"]["protocol"] == "tftp"
        # Adopting it takes the token.
        assert api(server, f"/api/machines/{ADOPTED}", "PUT", {"profile": "rack"}, token=None)[0] == 401
        assert machines.read_text() == machines_file(outs)

        browser = Browser(tmp_path / "chromium")
        try:
            shot = asyncio.run(_adopt_on_the_page(server, browser))
        finally:
            browser.stop()
        # The page wrote the file: the machine's table added, everything else as it was.
        assert machines.read_text() == machines_file(outs) + (f'\n[machines."{ADOPTED}"]\nprofile = "rack"\n'
                                                              'hostname = "adopted1"\n')
    finally:
        for thread in threads:
            thread.join(600)
    adopted, by_uuid = results[ADOPTED], results[BY_UUID]
    # The same VM, asking again, boots its new profile with the host name the page gave it.
    assert any(line.startswith(MARKER) for line in adopted.lines), adopted.console[-3000:]
    assert hostname_seen(adopted.lines) == "rack-adopted1", adopted.console[-3000:]
    # The UUID's table: its profile and host name, through the binary its profile chose.
    assert any(line.startswith(MARKER) for line in by_uuid.lines), by_uuid.console[-3000:]
    assert hostname_seen(by_uuid.lines) == "bench-by-uuid", by_uuid.console[-3000:]
    assert server.logged("http /undionly.kpxe 200")
    status, entry = api(server, f"/api/machines/{BY_UUID}")
    assert (entry["state"], entry["profile"], entry["facts"]["uuid"]) == ("handed-over", "bench", LISTED_UUID)
    assert entry["boot_seconds"] > 0 and entry["last"]["path"].endswith("/overlay")
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", shot[16:24])[0] >= 1000


async def _adopt_on_the_page(server: ServerProcess, browser: Browser) -> bytes:
    await browser.open()
    try:
        base = f"http://127.0.0.1:{server.status_port}"
        await browser.goto(f"{base}/?token={TOKEN}")
        assert await browser.evaluate("location.search") == ""  # the token left the address bar
        counts = await browser.evaluate(
            "Object.fromEntries(Array.from(document.querySelectorAll('#counts li'))"
            ".map(li => [li.dataset.state, Number(li.querySelector('b').textContent)]))")
        assert counts["unknown-mac"] >= 1 and set(counts) == {"configured", "booting", "handed-over", "failed",
                                                                "unknown-mac"}, counts
        assert await browser.evaluate("document.querySelector('#chart').tagName") == "svg"
        assert await browser.evaluate("Number(document.querySelector('#chart').dataset.started)") >= 0
        # The machine's own page: its facts and its events.
        await browser.evaluate(f"document.getElementById('m-{ADOPTED}').querySelector('a').click()")
        await browser.wait_for(f"location.pathname === '/machines/{ADOPTED}'")
        await browser.wait_for("document.readyState === 'complete' && !!document.getElementById('facts')")
        facts = await browser.evaluate(
            "Object.fromEntries(Array.from(document.querySelectorAll('[data-fact]')).map(d => [d.dataset.fact, "
            "d.textContent]))")
        assert (facts["uuid"], facts["serial"]) == (ADOPTED_UUID, "SER-1201"), facts
        assert await browser.evaluate("document.querySelectorAll('#timeline tr[data-seq]').length") >= 1
        # Back to the table: adopt it with a profile and a host name.
        await browser.goto(f"{base}/")
        await browser.wait_for("document.getElementById('live').textContent === 'live'")
        form = f"document.querySelector('form.adopt[data-mac=\"{ADOPTED}\"]')"
        await browser.evaluate(f"(() => {{ const f = {form}; f.elements.profile.value = 'rack'; "
                               "f.elements.hostname.value = 'adopted1'; f.requestSubmit(); })()")
        adopted = eventually(lambda: api(server, f"/api/machines/{ADOPTED}")[1], lambda m: m["configured"], 60)
        assert (adopted["configured"], adopted["profile"]) == (True, "rack"), adopted
        # It is configured now: its row updates by itself (the event stream), from unknown to booting and on.
        row = f"document.getElementById('m-{ADOPTED}')"
        await browser.wait_for(f"{row}.dataset.state === 'booting' || {row}.dataset.state === 'handed-over'", 120)
        await browser.wait_for(f"{row}.dataset.state === 'handed-over'", 240)
        await browser.wait_for("Number(document.querySelector('#chart').dataset.handedOver) >= 1", 60)
        assert await browser.evaluate("document.querySelectorAll('#chart rect.handed-over').length") >= 1
        return await browser.screenshot()
    finally:
        await browser.close()
