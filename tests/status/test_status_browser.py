"""The status pages in a real browser (headless Chromium): the machines table fits a 1,400 px window whatever a
client sends, and a machine's page opened with ?token= goes live by the cookie it sets."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import pytest
from browser import Browser
from support import ServerProcess, fake_out, write_machines

KNOWN = "52:54:00:00:0c:01"
TOKEN = "s3cret"


def hyphens(mac: str) -> str:
    return mac.replace(":", "-")


@pytest.fixture
def server(tmp_path: Path):
    machines = write_machines(tmp_path / "machines.toml", {"p": fake_out(tmp_path / "out", "direct")}, {KNOWN: "p"})
    s = ServerProcess("--machines", machines, "--http", "127.0.0.1:0", "--no-tftp", "--status-token", TOKEN)
    yield s
    s.stop()


def fetch(server: ServerProcess, path: str) -> int:
    try:
        with urllib.request.urlopen(server.url(path), timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.slow
def test_the_table_fits_1400_px_and_a_machine_page_goes_live_by_its_token(server: ServerProcess,
                                                                           tmp_path: Path) -> None:
    # A machine whose SMBIOS strings and last request are as long as the record keeps them.
    facts = "/".join(f"{key}={key[0].upper() * 60}" for key in ("manufacturer", "product", "serial"))
    assert fetch(server, f"machine/{hyphens(KNOWN)}/{facts}/boot.ipxe") == 200
    # (a build no longer served, by a machine matched by its serial)
    assert fetch(server, f"machine/{hyphens(KNOWN)}/serial={'S' * 60}/{'0' * 40}/initrd") == 404
    browser = Browser(tmp_path / "chromium")
    try:
        asyncio.run(_check(browser, f"http://127.0.0.1:{server.status_port}"))
    finally:
        browser.stop()
    assert "Traceback" not in server.log, server.log


async def _check(browser: Browser, base: str) -> None:
    await browser.open()
    try:
        await browser.send("Emulation.setDeviceMetricsOverride", width=1400, height=900, deviceScaleFactor=1,
                           mobile=False)
        await browser.goto(f"{base}/?token={TOKEN}")
        await browser.wait_for("document.getElementById('live').textContent === 'live'")
        assert await browser.evaluate("window.innerWidth") == 1400
        row = f"document.getElementById('m-{KNOWN}')"
        assert await browser.evaluate(f"{row}.dataset.state") == "failed"
        # Every column in view, the long ones cut short with their whole text in their title.
        headers = await browser.evaluate(
            "[...document.querySelectorAll('thead th')].map(th => [th.textContent, "
            "th.getBoundingClientRect().right])")
        width = await browser.evaluate("document.documentElement.clientWidth")
        assert [name for name, right in headers if right > width] == [], (width, str(headers))
        assert {"boot took", "last seen"} <= {name for name, _ in headers}
        last = await browser.evaluate(f"(c => [c.title, c.scrollWidth > c.clientWidth])({row}.querySelector('.last'))")
        assert last[0].startswith("http /machine/") and last[0].endswith("0" * 40 + "/initrd 404") and last[1], last
        assert "M" * 60 in await browser.evaluate(f"{row}.querySelector('.facts').title")

        # A machine's page opened with the token, by a browser that has no cookie yet.
        await browser.send("Network.clearBrowserCookies")
        await browser.goto(f"{base}/machines/{KNOWN}?token={TOKEN}")
        await browser.wait_for("document.getElementById('live').textContent === 'live'")
        assert await browser.evaluate("location.search") == ""  # the token left the address bar
        assert await browser.evaluate("!!document.querySelector('button.wake')")  # changes are offered
        # Its requests go by the cookie it set.
        status = await browser.evaluate(f"fetch('/api/machines/{KNOWN}').then(r => r.status)")
        assert status == 200
    finally:
        await browser.close()
