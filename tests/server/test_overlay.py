"""Per-machine overlays: the machines file's keys, rendering, packing, errors, caching and reloads."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import stat
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from initrd_reader import decompress, items
from support import ServerProcess, cli, fake_out

from netboot.core import compress
from netboot.core.errors import NetbootError
from netboot.core.machines import Machines
from netboot.server import overlay_cache
from netboot.server.namespace import Namespace, NotFound, Pending
from netboot.server.overlay import OverlayDir, OverlayError, pack

NODE1, NODE2, NODE3 = "52:54:00:00:0a:01", "52:54:00:00:0a:02", "52:54:00:00:0a:03"
STRANGER = "52:54:00:00:0a:99"


def make_overlay(d: Path) -> Path:
    (d / "etc").mkdir(parents=True)
    (d / "etc/hostname.j2").write_text("{{ hostname }}\n")
    (d / "etc/motd.j2").write_text("{{ mac }} {{ profile }} ip={{ ip }} role={{ role }} in {{ domain }}\n")
    (d / "etc/static.conf").write_text("the same for all\n")
    (d / "etc/name").symlink_to("hostname")
    (d / "bin").mkdir()
    (d / "bin/hello").write_text("#!/bin/sh\necho hello\n")
    (d / "bin/hello").chmod(0o755)
    (d / "var/empty").mkdir(parents=True)
    return d


@pytest.fixture
def fleet(tmp_path: Path) -> Path:
    fake_out(tmp_path / "squash")
    fake_out(tmp_path / "direct", "direct", "gzip", 6)
    make_overlay(tmp_path / "overlay")
    f = tmp_path / "machines.toml"
    f.write_text(f"""
[profiles.default]
dir = "direct"
overlay = "overlay"
vars = {{ domain = "lab", role = "spare" }}

[profiles.squash]
dir = "squash"
overlay = "overlay"
vars = {{ domain = "rack1" }}

[machines."{NODE1}"]
profile = "squash"
hostname = "node1"
ip = "192.0.2.11"
role = "db"

[machines."{NODE2}"]
profile = "squash"
hostname = "node2"
role = "web"

[machines."{NODE3}"]
hostname = "node3"
""")
    return f


def lookup(ns: Namespace, path: str) -> bytes:
    item = ns.lookup(path)
    assert item.data is not None
    return item.data


def script(ns: Namespace, mac: str) -> str:
    return lookup(ns, f"machine/{mac.replace(':', '-')}/boot.ipxe").decode()


def overlay_url(text: str) -> str:
    m = re.search(r"^initrd --name overlay (\S+)$", text, re.M)
    assert m, text
    return m.group(1)


def overlay_files(ns: Namespace, mac: str, tool: str = "zstd") -> dict[str, tuple[int, bytes | str | None]]:
    """name -> (mode, content or link target) of the machine's overlay, read back by libarchive."""
    member = decompress(lookup(ns, overlay_url(script(ns, mac))), tool)
    found = {}
    for e in items(member):
        assert (e.uid, e.gid, e.mtime) == (0, 0, 1)
        found[e.name] = (e.mode, e.linkpath if e.linkpath else e.data)
    return found


def test_each_machine_gets_its_own_overlay_as_a_second_initrd(fleet: Path) -> None:
    ns = Namespace(Machines.load(fleet), single_dir=False)
    try:
        text = script(ns, NODE1)
        assert re.search(r"^kernel \S+/bzImage initrd=initrd initrd=overlay init=/x$", text, re.M), text
        # The overlay is loaded after the main initrd, so its files win.
        assert text.index("--name initrd") < text.index("--name overlay")
        files = overlay_files(ns, NODE1)
        # squashfs format: under netboot-overlay/, where stage 1 copies it from.
        assert files["netboot-overlay/etc/hostname"][1] == b"node1\n"
        assert files["netboot-overlay/etc/motd"][1] == f"{NODE1} squash ip=192.0.2.11 role=db in rack1\n".encode()
        assert files["netboot-overlay/etc/static.conf"][1] == b"the same for all\n"
        assert files["netboot-overlay/etc/name"][1] == "hostname"
        assert stat.S_IMODE(files["netboot-overlay/bin/hello"][0]) == 0o755
        assert stat.S_ISDIR(files["netboot-overlay/var/empty"][0])
        assert "netboot-overlay/etc/hostname.j2" not in files
        assert overlay_files(ns, NODE2)["netboot-overlay/etc/hostname"][1] == b"node2\n"
        # The direct format: at the root, which the kernel unpacks it over; compressed like that build (gzip).
        direct = overlay_files(ns, NODE3, "gzip")
        assert direct["etc/hostname"][1] == b"node3\n"
        assert direct["etc/motd"][1] == f"{NODE3} default ip= role=spare in lab\n".encode()
        # A machine not in the file, on a default profile with an overlay: rendered when it asks.
        stranger = overlay_files(ns, STRANGER, "gzip")
        assert stranger["etc/hostname"][1] == b"\n"
        assert stranger["etc/motd"][1].startswith(STRANGER.encode())
    finally:
        ns.close()


def test_overlays_are_reproducible_and_packed_once_per_build_and_content(fleet: Path) -> None:
    first = Namespace(Machines.load(fleet), single_dir=False)
    second = Namespace(Machines.load(fleet), single_dir=False)
    try:
        url = overlay_url(script(first, NODE1))
        data = lookup(first, url)
        assert first.overlays.packs == 1
        assert lookup(first, url) == data and first.overlays.packs == 1  # from the cache
        assert lookup(second, url) == data  # the same inputs, the same bytes, in another process's worth of state
        # Another machine's content is packed apart; the same machine under another build too.
        lookup(first, overlay_url(script(first, NODE2)))
        assert first.overlays.packs == 2
    finally:
        first.close()
        second.close()


@pytest.mark.parametrize("name", [c for c in compress.COMPRESSORS])
def test_every_compressor_packs_what_the_kernel_unpacks(tmp_path: Path, name: str) -> None:
    overlay = OverlayDir(make_overlay(tmp_path / "overlay"))
    rendered = overlay.render({"hostname": "n", "mac": "m", "profile": "p", "ip": "", "role": "r", "domain": "d"},
                              "m")
    c = compress.get(name)
    data = pack(rendered, stage1=False, compressor=c, level=c.default_level)
    member = data if name == "none" else decompress(data, name)
    assert member.startswith(b"070701")
    assert {e.name: e.data for e in items(member)}["etc/hostname"] == b"n\n"
    if name == "xz":  # the kernel's xz decoder knows CRC32 checks only
        (tmp_path / "overlay.xz").write_bytes(data)
        listing = subprocess.run(["xz", "--robot", "-lv", tmp_path / "overlay.xz"], capture_output=True, text=True,
                                 check=True).stdout
        assert "\tCRC32\t" in listing, listing


@pytest.mark.parametrize(
    ("name", "text", "error"),
    [
        ("rack.j2", "# rack\n\nrack {{ rack }}\n", "rack.j2:3: machine {node}: 'rack' is undefined"),
        ("bad.j2", "fine\n{% if hostname %}\nno end\n", "bad.j2:2: Unexpected end of template. .*"),
        ("inc.j2", '{% include "/etc/passwd" %}\n', "inc.j2:1: machine {node}: /etc/passwd"),
        ("escape.j2", "{{ ''.__class__.__mro__[1].__subclasses__() }}\n", "escape.j2:1: machine {node}: .*unsafe.*"),
    ],
)
def test_template_errors_name_the_file_line_and_machine(fleet: Path, tmp_path: Path, name: str, text: str,
                                                        error: str) -> None:
    """An undefined variable, a syntax error (every machine's), an include from outside, a sandbox escape."""
    (tmp_path / "overlay/etc" / name).write_text(text)
    with pytest.raises(NetbootError) as e:
        Namespace(Machines.load(fleet), single_dir=False)
    where = re.escape(f"{tmp_path}/overlay/etc/")
    assert re.fullmatch(rf"(profile \w+: )?{where}{error.format(node=NODE1)}", str(e.value), re.S), str(e.value)


def test_serve_refuses_to_start_with_a_broken_template(fleet: Path, tmp_path: Path) -> None:
    (tmp_path / "overlay/etc/rack.j2").write_text("{{ rack }}\n")
    done = cli("serve", "--machines", fleet, "--http", "127.0.0.1:0", "--no-tftp", "--status", "none", timeout=30)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert lines[-1] == f"netboot: error: {tmp_path}/overlay/etc/rack.j2:1: machine {NODE1}: 'rack' is undefined"


@pytest.mark.parametrize("target", ["/etc/passwd", "../../../etc/passwd", "../../outside"])
def test_a_symlink_out_of_the_overlay_is_refused(fleet: Path, tmp_path: Path, target: str) -> None:
    (tmp_path / "outside").write_text("secret\n")
    (tmp_path / "overlay/etc/leak").symlink_to(target)
    with pytest.raises(OverlayError, match=r"overlay/etc/leak is a symlink out of the overlay directory \(to "):
        Namespace(Machines.load(fleet), single_dir=False)


def test_a_template_may_include_another_of_its_overlay(fleet: Path, tmp_path: Path) -> None:
    (tmp_path / "overlay/etc/header.j2").write_text("# {{ hostname }}\n")
    (tmp_path / "overlay/etc/hosts.j2").write_text('{% include "etc/header.j2" %}127.0.0.1 {{ hostname }}\n')
    ns = Namespace(Machines.load(fleet), single_dir=False)
    try:
        assert overlay_files(ns, NODE2)["netboot-overlay/etc/hosts"][1] == b"# node2\n127.0.0.1 node2\n"
    finally:
        ns.close()


def test_a_reload_with_a_broken_template_keeps_that_machines_previous_overlay(
        fleet: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ns = Namespace(Machines.load(fleet), single_dir=False)
    try:
        before = overlay_files(ns, NODE1)
        # Only NODE2 defines `rack`: the template breaks for NODE1 and NODE3 alone.
        fleet.write_text(fleet.read_text().replace('role = "web"', 'role = "web"\nrack = "r7"'))
        (tmp_path / "overlay/etc/motd.j2").write_text("{{ hostname }} in {{ rack }}\n")
        with caplog.at_level(logging.ERROR, logger="netboot.serve"):
            ns.reload(Machines.load(fleet))
        errors = [r.getMessage() for r in caplog.records]
        assert (f"overlay: {tmp_path}/overlay/etc/motd.j2:1: machine {NODE1}: 'rack' is undefined; "
                "it keeps its previous overlay") in errors, errors
        assert overlay_files(ns, NODE1) == before
        assert overlay_files(ns, NODE2)["netboot-overlay/etc/motd"][1] == b"node2 in r7\n"
    finally:
        ns.close()


def test_a_new_machine_whose_overlay_breaks_is_told_why_and_retries(fleet: Path, tmp_path: Path) -> None:
    ns = Namespace(Machines.load(fleet), single_dir=False)
    try:
        new = "52:54:00:00:0a:04"  # without a hostname, whose first letter the new template wants
        fleet.write_text(fleet.read_text() + f'\n[machines."{new}"]\nprofile = "squash"\nrole = "spare"\n')
        (tmp_path / "overlay/etc/initial.j2").write_text("{{ hostname[0] }}\n")
        ns.reload(Machines.load(fleet))
        text = script(ns, new)
        assert f"echo netboot: this machine ({new}) cannot boot: {tmp_path}/overlay/etc/initial.j2:1:" in text
        assert f"chain --replace --autofree /machine/{new.replace(':', '-')}/uuid=${{uuid}}/" in text
        assert "initrd" not in text
        with pytest.raises(NotFound, match="has no overlay"):
            ns.lookup(f"machine/{new.replace(':', '-')}/{ns.profiles['squash'].current.id}/overlay")
        assert overlay_files(ns, NODE1)["netboot-overlay/etc/initial"][1] == b"n\n"  # the others are fine
    finally:
        ns.close()


async def test_a_request_that_goes_away_takes_nothing_from_the_others(fleet: Path) -> None:
    """A request waiting for a machine's overlay that is cancelled (a TFTP request superseded or timed out) neither
    cancels the rendering another request waits for, nor loses what it makes."""
    ns = Namespace(Machines.load(fleet), single_dir=False)
    try:
        name = f"machine/{STRANGER.replace(':', '-')}/boot.ipxe"  # not in the file: rendered on its first request
        gone, waiting = asyncio.create_task(ns.resolve(name)), asyncio.create_task(ns.resolve(name))
        await asyncio.sleep(0)
        gone.cancel()
        item = await asyncio.wait_for(waiting, 30)
        assert item.data is not None and b"initrd --name overlay" in item.data
        # Another machine, whose only request goes away: its overlay is rendered and kept all the same.
        other = "machine/52-54-00-00-0a-98/boot.ipxe"
        alone = asyncio.create_task(ns.resolve(other))
        await asyncio.sleep(0)
        alone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await alone
        for _ in range(600):
            try:
                kept = ns.lookup(other)  # on the loop: raises Pending until it is stored
                break
            except Pending:
                await asyncio.sleep(0.05)
        else:
            raise AssertionError("the overlay of a request that went away was never stored")
        assert kept.data is not None and b"initrd --name overlay" in kept.data
    finally:
        ns.close()


async def test_renders_under_way_are_bounded(fleet: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Machines not in the file are rendered on demand, and a render outlives a request that goes away: past a
    bound of renders under way, a new machine is told to ask again (and is not remembered as broken)."""
    monkeypatch.setattr(overlay_cache, "MAX_RENDERING", 2)
    ns = Namespace(Machines.load(fleet), single_dir=False)
    try:
        names = [f"machine/52-54-00-00-0b-0{i}/boot.ipxe" for i in range(3)]
        tasks = [asyncio.create_task(ns.resolve(name)) for name in names]
        first, second, third = [(await asyncio.wait_for(t, 30)).data or b"" for t in tasks]
        assert b"initrd --name overlay" in first and b"initrd --name overlay" in second
        assert b"cannot boot: the server is rendering the overlays of 2 other machines" in third, third
        assert b"chain --replace --autofree /machine/52-54-00-00-0b-02/uuid=${uuid}/" in third
        again = await asyncio.wait_for(ns.resolve(names[2]), 30)
        assert again.data is not None and b"initrd --name overlay" in again.data
    finally:
        ns.close()


@pytest.mark.parametrize(
    ("profile_extra", "machine_extra", "error"),
    [
        ("", 'role = "db"', r"unknown key 'role' \(expected .*; other keys are variables of an overlay, and "
                            r"profile 'plain' has none\)"),
        ('vars = { a = 1 }', "", r"profiles.plain: vars are for an overlay, and it has none"),
        ('overlay = "nowhere"', "", r"profiles.plain: overlay 'nowhere' is not a directory"),
        ('overlay = 3', "", r"profiles.plain: overlay must name a directory"),
        ('overlay = "overlay"\nvars = "x"', "", r"profiles.plain: vars must be a table"),
        ('overlay = "overlay"', 'mac = "x"', r"mac is the table's name; it cannot be set here"),
    ],
)
def test_machines_file_errors(tmp_path: Path, profile_extra: str, machine_extra: str, error: str) -> None:
    fake_out(tmp_path / "out")
    make_overlay(tmp_path / "overlay")
    f = tmp_path / "machines.toml"
    f.write_text(f'[profiles.plain]\ndir = "out"\n{profile_extra}\n[machines."{NODE1}"]\nprofile = "plain"\n'
                 f"{machine_extra}\n")
    with pytest.raises(NetbootError, match=rf"^{f}:\d+: .*{error}"):
        Machines.load(f)


def fetch(server: ServerProcess, path: str) -> bytes:
    with urllib.request.urlopen(server.url(path), timeout=30) as r:
        return r.read()


def test_serve_renders_again_when_a_template_is_edited(fleet: Path, tmp_path: Path) -> None:
    server = ServerProcess("--machines", fleet, "--http", "127.0.0.1:0", "--no-tftp")
    try:
        text = fetch(server, f"machine/{NODE1.replace(':', '-')}/boot.ipxe").decode()
        first = decompress(fetch(server, overlay_url(text)), "zstd")
        (tmp_path / "overlay/etc/hostname.j2").write_text("{{ hostname }}.{{ domain }}\n")
        os.utime(tmp_path / "overlay/etc/hostname.j2", ns=(0, time.time_ns() + 10**9))
        deadline = time.monotonic() + 20
        while True:
            now = {e.name: e.data for e in items(decompress(fetch(server, overlay_url(text)), "zstd"))}
            if now["netboot-overlay/etc/hostname"] == b"node1.rack1\n":
                break
            assert time.monotonic() < deadline, "the edited template was not rendered again"
            time.sleep(0.2)
        assert {e.name: e.data for e in items(first)}["netboot-overlay/etc/hostname"] == b"node1\n"
        assert server.logged(f"mac={NODE1} profile=squash http /machine/{NODE1.replace(':', '-')}/"), server.log
    finally:
        server.stop()


LOOPS, HUGE, GREEDY, FINE = "52:54:00:00:0c:01", "52:54:00:00:0c:02", "52:54:00:00:0c:03", "52:54:00:00:0c:04"


def test_a_template_that_loops_or_renders_a_gigabyte_is_refused_and_others_keep_booting(fleet: Path,
                                                                                       tmp_path: Path) -> None:
    # Machines not in the file (the default profile's overlay), each rendered on its first request: one
    # template loops for hours, one renders a gigabyte, one asks for 2 GB of memory at once.
    (tmp_path / "overlay/etc/hostile.j2").write_text(
        f'{{% if mac == "{LOOPS}" %}}{{% for a in range(100000) %}}{{% for b in range(100000) %}}'
        f'{{% endfor %}}{{% endfor %}}{{% endif %}}'
        f'{{% if mac == "{HUGE}" %}}{{% for a in range(100000) %}}{{{{ "x" * 10000 }}}}{{% endfor %}}{{% endif %}}'
        f'{{% if mac == "{GREEDY}" %}}{{{{ ("x" * 2000000000)|length }}}}{{% endif %}}ok\n')
    server = ServerProcess("--machines", fleet, "--http", "127.0.0.1:0", "--tftp", "127.0.0.1:0")
    try:
        answers: dict[str, str] = {}

        def ask(mac: str) -> None:
            answers[mac] = fetch(server, f"machine/{mac.replace(':', '-')}/boot.ipxe").decode()

        import threading

        hostile = [threading.Thread(target=ask, args=(mac,)) for mac in (LOOPS, HUGE, GREEDY)]
        for t in hostile:
            t.start()
        # Meanwhile others boot: a listed machine and one not listed, their scripts and overlays, over HTTP
        # and over TFTP (whose requests wait for the overlay's rendering without stalling the server).
        for mac in (NODE1, FINE):
            text = fetch(server, f"machine/{mac.replace(':', '-')}/boot.ipxe").decode()
            files = {e.name: e.data for e in items(decompress(fetch(server, overlay_url(text)), "zstd" if mac == NODE1
                                                                    else "gzip"))}
            assert any(name.endswith("etc/hostile") and data == b"ok\n" for name, data in files.items()), files
        tftp = subprocess.run(["curl", "-sS", f"tftp://127.0.0.1:{server.tftp_port}/machine/"
                               f"{NODE3.replace(':', '-')}/boot.ipxe"], capture_output=True, timeout=60)
        assert tftp.returncode == 0 and b"initrd --name overlay" in tftp.stdout, tftp.stderr
        unlisted = "52-54-00-00-0c-05"
        tftp = subprocess.run(["curl", "-sS", f"tftp://127.0.0.1:{server.tftp_port}/machine/{unlisted}/boot.ipxe"],
                              capture_output=True, timeout=60)
        assert tftp.returncode == 0 and b"initrd --name overlay" in tftp.stdout, tftp.stderr
        assert not answers.get(LOOPS), "the looping template finished before the others were served"
        for t in hostile:
            t.join(60)
        # Each is refused: its script says why and asks again later; one log line each.
        reasons = {LOOPS: "rendering took longer than 10 s", HUGE: "renders more than 16 MiB",
                   GREEDY: "MemoryError"}
        for mac, reason in reasons.items():
            assert f"this machine ({mac}) cannot boot:" in answers[mac] and reason in answers[mac], answers[mac]
            assert "initrd" not in answers[mac]
            assert server.logged(f"machine {mac}"), server.log  # the log is read after the answer comes
            lines = [line for line in server.log.splitlines() if f"machine {mac}" in line]
            assert len(lines) == 1 and reason in lines[0] and len(lines[0]) < 400, lines
        # And the server goes on rendering for new machines.
        text = fetch(server, "machine/52-54-00-00-0c-06/boot.ipxe").decode()
        assert "initrd --name overlay" in text
    finally:
        server.stop()


def test_a_machine_that_never_fetches_its_overlay_is_not_handed_over(fleet: Path) -> None:
    server = ServerProcess("--machines", fleet, "--http", "127.0.0.1:0", "--no-tftp")
    try:
        def fetch(path: str) -> bytes:
            with urllib.request.urlopen(server.url(path), timeout=30) as r:
                return r.read()

        def state() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.status_port}/api/machines/{NODE1}",
                                        timeout=30) as r:
                return json.loads(r.read())["state"]

        text = fetch(f"machine/{NODE1.replace(':', '-')}/boot.ipxe").decode()
        initrd = re.search(r"^initrd --name initrd (\S+)$", text, re.M)
        assert initrd is not None, text
        fetch(initrd.group(1))
        assert state() == "booting"  # the kernel has its initrd, not yet the machine's overlay
        fetch(overlay_url(text))
        assert state() == "handed-over"
    finally:
        server.stop()
