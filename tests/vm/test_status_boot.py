"""The status listener watching real boots: QEMU VMs network-boot over HTTP and over TFTP, then the API, the
metrics and the page (in headless Chromium) must tell what happened."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import struct
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from browser import Browser
from prometheus_client.parser import text_string_to_metric_families
from support import MARKER, ServerProcess, assert_booted, netboot_vm, write_machines

from devtools import qemu

HTTP_VM, TFTP_VM, LATE = "52:54:00:00:0b:01", "52:54:00:00:0b:02", "52:54:00:00:0b:03"


@pytest.fixture(scope="module")
def boots(outs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """A server, one VM booted from it over HTTP and one over TFTP; the server and each VM's boot by MAC."""
    f = write_machines(tmp_path_factory.mktemp("status") / "machines.toml",
                       {"squash": outs["squashfs"], "direct": outs["direct"]},
                       {HTTP_VM: "squash", TFTP_VM: "direct", LATE: "squash"},
                       # The kernel's "Run … as init process": nothing else marks the start of init in direct format.
                       appends={"direct": "loglevel=7"})
    server = ServerProcess("--machines", f, "--http", "127.0.0.1:0", "--tftp", "127.0.0.1:0")
    try:
        urls = {HTTP_VM: f"http://10.0.2.2:{server.http_port}/boot.ipxe",
                TFTP_VM: f"tftp://10.0.2.2:{server.tftp_port}/boot.ipxe"}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda mac: netboot_vm(urls[mac], mac), urls))
        for result in results:
            assert any(line.startswith(MARKER) for line in result.lines), result.console[-3000:]
        yield server, dict(zip(urls, results, strict=True))
    finally:
        server.stop()


@pytest.fixture(scope="module")
def booted(boots: tuple[ServerProcess, dict[str, qemu.BootResult]]) -> ServerProcess:
    return boots[0]


def status(server: ServerProcess, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.status_port}{path}", timeout=30) as r:
        return r.read()


class TestTwoBoots:
    """The tests of the VMs `boots` starts: a class, so that `make test` runs them on one worker (conftest.py),
    which boots the VMs once."""

    def test_both_vms_are_handed_over(self, booted: ServerProcess, outs: dict[str, Path]) -> None:
        machines = {m["mac"]: m for m in json.loads(status(booted, "/api/machines"))["machines"]}
        for mac, profile, out, protocol in ((HTTP_VM, "squash", "squashfs", "http"),
                                            (TFTP_VM, "direct", "direct", "tftp")):
            m = machines[mac]
            assert (m["state"], m["profile"], m["last"]["protocol"]) == ("handed-over", profile, protocol), m
            assert m["last"]["path"].endswith("/initrd") and m["last"]["bytes"] == (outs[out] / "initrd").stat().st_size
            assert m["system"] == json.loads((outs[out] / "manifest.json").read_text())["system"]
            assert m["client"] == "127.0.0.1"  # QEMU's user network: the VM's packets come from the host
        assert machines[LATE]["state"] == "configured"

    def test_the_tftp_vm_booted_over_tftp_only(self, boots: tuple[ServerProcess, dict[str, qemu.BootResult]],
                                               system: Path, closure: list[str]) -> None:
        server, results = boots
        assert_booted(results[TFTP_VM], closure, system)
        assert not [ln for ln in server.lines if f"mac={TFTP_VM} " in ln and " http " in ln], server.log
        assert sum(" http /boot.ipxe " in ln for ln in server.lines) == 1, server.log  # the HTTP VM's first request
        for step in ("boot.ipxe", "bzImage", "initrd"):
            served = [ln for ln in server.lines if " tftp " in ln and f"/{step} " in ln and " complete " in ln]
            assert served, (step, server.log[-3000:])

    def test_metrics_count_the_bytes_sent(self, booted: ServerProcess) -> None:
        samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        for family in text_string_to_metric_families(status(booted, "/metrics").decode()):
            for s in family.samples:
                samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
        events = json.loads(status(booted, "/api/events"))["events"]
        for protocol in ("http", "tftp"):
            ok = [e for e in events if e["protocol"] == protocol and e["ok"]]
            status_of = "200" if protocol == "http" else "complete"
            sent = samples["netboot_sent_bytes_total"][("protocol", protocol), ("status", status_of)]
            assert sent == sum(e["bytes"] for e in ok if e["status"] == status_of)
            assert sent > 5_000_000  # a kernel and an initrd
        assert samples["netboot_boots_handed_over_total"] == {(("profile", "direct"),): 1, (("profile", "squash"),): 1}
        assert samples["netboot_machines"][(("state", "handed-over"),)] == 2

    def test_the_page_in_a_browser_shows_the_machines_and_updates_live(self, booted: ServerProcess,
                                                                       tmp_path: Path) -> None:
        browser = Browser(tmp_path / "chromium")
        try:
            shot = asyncio.run(_page(booted, browser))
        finally:
            browser.stop()
        assert shot[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", shot[16:24])
        assert width >= 1000 and height >= 200
        target = os.environ.get("NETBOOT_SCREENSHOT")  # `make screenshot`: the README's picture
        (Path(target) if target else tmp_path / "status.png").write_bytes(shot)


async def _page(server: ServerProcess, browser: Browser) -> bytes:
    await browser.open()
    try:
        await browser.goto(f"http://127.0.0.1:{server.status_port}/")
        rows: list[list[Any]] = await browser.evaluate(
            "Array.from(document.querySelectorAll('#rows tr')).map(r => [r.id, r.dataset.state, r.innerText])")
        states = {row[0]: row[1] for row in rows}
        assert states[f"m-{HTTP_VM}"] == "handed-over" and states[f"m-{TFTP_VM}"] == "handed-over", rows
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
