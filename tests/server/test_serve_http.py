"""`netboot serve` over HTTP: scripts per MAC, files with Range/HEAD/ETag, no way out of the namespace, reloads."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import time
import urllib.error
import urllib.request
from email.message import Message
from pathlib import Path

import pytest
from support import ServerProcess, built, fake_out, netboot, netboot_ok, write_machines

MAC = "52:54:00:12:34:56"


def get(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, Message, bytes]:
    """Status, headers (case-insensitive) and body of one request."""
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def raw_get(port: int, path: str) -> tuple[int, bytes]:
    """A request line sent exactly as written (no client-side normalisation of .. or %2e)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


def machines_file(d: Path, outs: dict[str, Path]) -> Path:
    shutil.copytree(outs["squashfs"], d / "squashfs-out")
    shutil.copytree(outs["direct"], d / "direct-out")
    f = d / "machines.toml"
    f.write_text(f"""
[profiles.default]
dir = "direct-out"
append = "from=default"

[profiles.squash]
dir = "squashfs-out"
append = "from=squash"

[machines."{MAC}"]
profile = "squash"
append = "hostname=node1"
""")
    return f


@pytest.fixture(scope="module")
def machines(outs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return machines_file(tmp_path_factory.mktemp("serve-http"), outs)


@pytest.fixture(scope="module")
def server(machines: Path):
    """One server for the tests that only read from it."""
    s = ServerProcess("--machines", machines, "--http", "127.0.0.1:0", "--no-tftp")
    yield s
    s.stop()


@pytest.fixture
def own_machines(outs: dict[str, Path], tmp_path: Path) -> Path:
    return machines_file(tmp_path, outs)


@pytest.fixture
def own_server(own_machines: Path):
    """A server of the test's own, for the tests that rebuild or edit what it serves."""
    s = ServerProcess("--machines", own_machines, "--http", "127.0.0.1:0", "--no-tftp")
    yield s
    s.stop()


# The address a machine's script shows: IPv4's, or IPv6's on a network without IPv4.
AT = "isset ${netX/ip} && set netboot-at ${netX/ip} || set netboot-at ${netX/ip6}"


def script_lines(body: bytes) -> list[str]:
    return [ln for ln in body.decode().splitlines() if ln and not ln.startswith("#")]


@pytest.mark.parametrize("spelling", [MAC, MAC.replace(":", "-"), MAC.replace(":", ""), MAC.upper().replace(":", "-")])
def test_script_for_every_mac_spelling(server: ServerProcess, machines: Path, spelling: str) -> None:
    status, headers, body = get(server.url(f"machine/{spelling}/boot.ipxe"))
    assert status == 200
    assert headers["Cache-Control"] == "no-store"
    out = machines.parent / "squashfs-out"
    cmdline = (out / "cmdline").read_text().strip()
    lines = script_lines(body)
    gen = lines[2].split()[1].split("/")[3]
    assert lines == [
        AT,
        f"echo netboot: {MAC} at ${{netboot-at}} boots profile squash",
        f"kernel /machine/52-54-00-12-34-56/{gen}/bzImage initrd=initrd {cmdline} from=squash hostname=node1",
        f"initrd --name initrd /machine/52-54-00-12-34-56/{gen}/initrd",
        "boot",
    ]
    # The files the script names are this profile's.
    assert get(server.url(f"machine/{spelling}/{gen}/initrd"))[2] == (out / "initrd").read_bytes()
    assert server.logged(f"127.0.0.1 mac={MAC} profile=squash http /machine/{spelling}/boot.ipxe 200"), server.log


FACTS = ("uuid=${uuid}/serial=${serial:uristring}/manufacturer=${manufacturer:uristring}/"
         "product=${product:uristring}/buildarch=${buildarch:uristring}/platform=${platform:uristring}")


def test_boot_ipxe_chains_by_mac_with_the_machines_facts(server: ServerProcess) -> None:
    status, _, body = get(server.url("boot.ipxe"))
    assert status == 200 and script_lines(body) == [f"chain /machine/${{mac:hexhyp}}/{FACTS}/boot.ipxe"]


def test_unregistered_mac_gets_the_default_profile(server: ServerProcess, machines: Path) -> None:
    _, _, body = get(server.url("machine/52-54-00-aa-bb-cc/boot.ipxe"))
    lines = script_lines(body)
    assert lines[:2] == [AT, "echo netboot: 52:54:00:aa:bb:cc at ${netboot-at} boots profile default"]
    assert lines[2].endswith(" from=default")
    assert (machines.parent / "direct-out/cmdline").read_text().strip() in lines[2]


def test_unknown_mac_without_default_waits_and_retries(tmp_path: Path, outs: dict[str, Path]) -> None:
    f = tmp_path / "machines.toml"
    f.write_text(f'[profiles.only]\ndir = "{outs["direct"]}"\n[machines."{MAC}"]\nprofile = "only"\n')
    s = ServerProcess("--machines", f, "--http", "127.0.0.1:0", "--no-tftp")
    try:
        status, _, body = get(s.url("machine/02-00-00-00-00-01/boot.ipxe"))
    finally:
        s.stop()
    lines = script_lines(body)
    assert status == 200
    assert lines[0] == (
        f"echo netboot: this machine (02:00:00:00:00:01) is not in {f} and there is no [profiles.default]."
    )
    # It asks again with its facts, so that a table added meanwhile for its UUID or serial is found.
    assert lines[2:] == ["sleep 30", f"chain --replace --autofree /machine/02-00-00-00-00-01/{FACTS}/boot.ipxe"]


def test_invalid_mac_is_400(server: ServerProcess) -> None:
    status, _, body = get(server.url("machine/52-54-00-12-34/boot.ipxe"))
    assert (status, body) == (400, b"invalid MAC address '52-54-00-12-34'\n")


def test_range_head_etag(server: ServerProcess, machines: Path) -> None:
    initrd = (machines.parent / "squashfs-out/initrd").read_bytes()
    url = server.url("profile/squash/initrd")
    status, headers, body = get(url)
    assert status == 200 and body == initrd
    assert int(headers["Content-Length"]) == len(initrd)
    assert headers["Content-Type"] == "application/octet-stream" and headers["Accept-Ranges"] == "bytes"
    etag, modified = headers["ETag"], headers["Last-Modified"]

    status, headers, body = get(url, {"Range": "bytes=100-199"})
    assert (status, body) == (206, initrd[100:200])
    assert headers["Content-Range"] == f"bytes 100-199/{len(initrd)}"
    status, _, body = get(url, {"Range": "bytes=-10"})
    assert (status, body) == (206, initrd[-10:])

    status, headers, body = get(url, method="HEAD")
    assert (status, body, int(headers["Content-Length"])) == (200, b"", len(initrd))
    assert get(url, {"If-None-Match": etag})[0] == 304
    assert get(url, {"If-Modified-Since": modified})[0] == 304

    status, headers, _ = get(server.url("boot.ipxe"), method="HEAD")
    assert status == 200 and int(headers["Content-Length"]) > 0
    assert get(server.url("profile/squash/cmdline"))[1]["Content-Type"] == "text/plain; charset=utf-8"


@pytest.mark.parametrize(
    "path",
    [
        "/profile/squash/../../../../etc/passwd",
        "/profile/squash/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/profile/squash/..%2f..%2f..%2fetc%2fpasswd",
        "/..\\..\\etc\\passwd",
        "/profile\\squash\\initrd",
        "/machine/52-54-00-12-34-56/../../etc/passwd",
        "//etc/passwd",
        "/etc/passwd",
        "/profile/squash/kernel-params",
        "/profile/nope/initrd",
        "/initrd",  # only with --dir are the files at the root
    ],
)
def test_nothing_outside_the_namespace(server: ServerProcess, path: str) -> None:
    status, body = raw_get(server.http_port, path)
    assert status in (400, 404), (path, status)
    assert b"root:" not in body


def test_symlink_out_of_a_directory_is_refused(tmp_path: Path, outs: dict[str, Path]) -> None:
    out = tmp_path / "out"
    shutil.copytree(outs["direct"], out)
    (out / "initrd").unlink()
    (out / "initrd").symlink_to("/etc/passwd")
    proc = netboot("serve", "--dir", out, "--http", "127.0.0.1:0", "--no-tftp", timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"netboot: error: {out}/initrd is not a regular file inside {out} or the Nix store"


def test_dir_mode_serves_the_directory_at_the_root(outs: dict[str, Path]) -> None:
    s = ServerProcess("--dir", outs["squashfs"], "--http", "127.0.0.1:0", "--no-tftp")
    try:
        for name in ("bzImage", "initrd", "cmdline", "netboot.ipxe", "manifest.json"):
            assert get(s.url(name))[2] == (outs["squashfs"] / name).read_bytes(), name
        lines = script_lines(get(s.url(f"machine/{MAC}/boot.ipxe"))[2])
        assert lines[:2] == [AT, f"echo netboot: {MAC} at ${{netboot-at}} boots profile default"]
    finally:
        s.stop()


def slow_download(port: int, path: str) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path)
    return conn, conn.getresponse()


def wait_for(predicate, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_rebuild_while_a_transfer_is_in_progress(own_server: ServerProcess, own_machines: Path, system: Path) -> None:
    out = own_machines.parent / "squashfs-out"
    old_initrd = (out / "initrd").read_bytes()
    old_script = script_lines(get(own_server.url(f"machine/{MAC}/boot.ipxe"))[2])
    old_gen = old_script[2].split()[1].split("/")[3]
    conn, response = slow_download(own_server.http_port, f"/machine/{MAC.replace(':', '-')}/{old_gen}/initrd")
    first = response.read(4096)  # the transfer has started

    netboot_ok("build", system, "--out", out, "--format", "direct", "--compress", "gzip", "--append", "rebuilt")
    new_initrd = (out / "initrd").read_bytes()
    assert new_initrd != old_initrd

    def new_script() -> bool:
        return "rebuilt" in get(own_server.url(f"machine/{MAC}/boot.ipxe"))[2].decode()

    wait_for(new_script, "the server to pick up the rebuild")
    rest = response.read()
    conn.close()
    assert first + rest == old_initrd  # the transfer in progress finished from the old files
    lines = script_lines(get(own_server.url(f"machine/{MAC}/boot.ipxe"))[2])
    new_gen = lines[2].split()[1].split("/")[3]
    assert new_gen != old_gen and lines[2].split()[3].startswith("rdinit=")
    assert get(own_server.url(f"machine/{MAC}/{new_gen}/initrd"))[2] == new_initrd
    # A machine that fetched its script before the rebuild still gets the matching initrd (grace period).
    assert get(own_server.url(f"machine/{MAC}/{old_gen}/initrd"))[2] == old_initrd
    assert get(own_server.url("profile/squash/initrd"))[2] == new_initrd
    assert "profile squash: now serving" in own_server.log


def test_machines_file_reload(own_server: ServerProcess, own_machines: Path) -> None:
    other = "52:54:00:00:00:02"
    assert "profile default" in get(own_server.url(f"machine/{other}/boot.ipxe"))[2].decode()
    own_machines.write_text(own_machines.read_text() + f'\n[machines."{other}"]\nprofile = "squash"\n')
    wait_for(lambda: "profile squash" in get(own_server.url(f"machine/{other}/boot.ipxe"))[2].decode(), "file reload")

    # A broken file is refused and the previous configuration stays.
    good = own_machines.read_text()
    own_machines.write_text(good + "\n[machines.broken\n")
    wait_for(lambda: "keeping the previous configuration" in own_server.log, "the reload error")
    assert "profile squash" in get(own_server.url(f"machine/{other}/boot.ipxe"))[2].decode()

    # SIGHUP reloads at once, whatever the file's timestamps say.
    own_machines.write_text(good.replace(f'[machines."{other}"]\nprofile = "squash"\n', ""))
    os.kill(own_server.proc.pid, signal.SIGHUP)
    wait_for(lambda: "profile default" in get(own_server.url(f"machine/{other}/boot.ipxe"))[2].decode(), "SIGHUP")


def test_initrd_checksum_matches_manifest(server: ServerProcess, machines: Path) -> None:
    import json

    manifest = json.loads(get(server.url("profile/squash/manifest.json"))[2])
    body = get(server.url("profile/squash/initrd"))[2]
    assert hashlib.sha256(body).hexdigest() == manifest["artifacts"]["initrd"]["sha256"]


@pytest.mark.parametrize("name", ["undionly.kpxe", "ipxe.efi", "snponly.efi"])
def test_debian_ipxe_binaries_are_served(server: ServerProcess, name: str) -> None:
    path = Path("/usr/lib/ipxe") / name
    assert path.is_file(), "Debian's ipxe package is not installed (make test installs it)"
    status, _, body = get(server.url(name))
    assert (status, body) == (200, path.read_bytes())


def test_a_broken_rebuild_keeps_the_previous_build(own_server: ServerProcess, own_machines: Path) -> None:
    out = own_machines.parent / "squashfs-out"
    initrd = (out / "initrd").read_bytes()
    broken = own_machines.parent / "broken"
    shutil.copytree(out, broken)
    (broken / "initrd").unlink()
    (broken / "initrd").symlink_to("/etc/passwd")
    (broken / "manifest.json").write_text((out / "manifest.json").read_text().replace('"cmdline"', '"cmdline" '))
    os.rename(out, own_machines.parent / "old")
    os.rename(broken, out)
    wait_for(lambda: "keeping the previous build" in own_server.log, "the rebuild to be refused")
    time.sleep(2.5)  # more looks at the directory: reported once, not at each
    assert own_server.log.count("keeping the previous build") == 1
    assert f"{out}/initrd is not a regular file inside {out} or the Nix store" in own_server.log
    assert get(own_server.url("profile/squash/initrd"))[2] == initrd


def test_each_build_served_by_its_kernels_name(tmp_path: Path) -> None:
    """An arm64 build's kernel is Image, an x86_64 one's bzImage (its manifest says, or says nothing: a build from
    before builds recorded their architecture); scripts and names follow, and neither name reaches the other's."""
    old = fake_out(tmp_path / "old")
    x86 = fake_out(tmp_path / "x86", arch="x86_64")
    arm = fake_out(tmp_path / "arm", arch="arm64")
    other = "52:54:00:00:00:02"
    machines = write_machines(tmp_path / "machines.toml", {"default": old, "x86": x86, "arm": arm},
                              {MAC: "arm", other: "x86"})
    s = ServerProcess("--machines", machines, "--http", "127.0.0.1:0", "--no-tftp")
    try:
        for mac, kernel in ((MAC, "Image"), (other, "bzImage"), ("52:54:00:00:00:03", "bzImage")):
            lines = script_lines(get(s.url(f"machine/{mac}/boot.ipxe"))[2])
            files = f"/machine/{mac.replace(':', '-')}/{lines[2].split()[1].split('/')[3]}"
            assert lines[2] == f"kernel {files}/{kernel} initrd=initrd init=/x", lines
            assert get(s.url(f"{files}/{kernel}"))[2] == kernel.encode()
            assert get(s.url(f"{files}/{({'Image', 'bzImage'} - {kernel}).pop()}"))[0] == 404
        for profile, kernel, absent in (("arm", "Image", "bzImage"), ("x86", "bzImage", "Image"),
                                        ("default", "bzImage", "Image")):
            assert get(s.url(f"profile/{profile}/{kernel}"))[:3:2] == (200, kernel.encode())
            assert get(s.url(f"profile/{profile}/{absent}"))[0] == 404
    finally:
        s.stop()


FETCHER, MIRRORED = "52:54:00:12:34:70", "52:54:00:12:34:71"


def test_a_fetch_build_serves_its_image_and_names_it_in_the_script(system: Path, outs: dict[str, Path],
                                                                    tmp_path: Path) -> None:
    """A --fetch build: the script names the image by the address the machine asked at (its Host), or on the
    mirror; the image is served with Range and HEAD; the status shows its download as a step of the boot."""
    out = built(system, "--format", "squashfs", "--fetch")
    image = (out / "image").read_bytes()
    digest = hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest()
    f = tmp_path / "machines.toml"
    f.write_text(f"""
[profiles.fetch]
dir = "{out}"

[profiles.mirrored]
dir = "{out}"
base_url = "http://mirror.example/nb/"

[profiles.plain]
dir = "{outs["squashfs"]}"

[machines."{FETCHER}"]
profile = "fetch"
append = "hostname=f1"

[machines."{MIRRORED}"]
profile = "mirrored"
""")
    server = ServerProcess("--machines", f, "--http", "127.0.0.1:0", "--no-tftp")
    try:
        script = get(server.url(f"machine/{FETCHER}/boot.ipxe"), {"Host": f"10.0.2.2:{server.http_port}"})[2].decode()
        (kernel,) = [ln for ln in script_lines(script.encode()) if ln.startswith("kernel ")]
        args = kernel.split()
        (url,) = [a.split("=", 1)[1] for a in args if a.startswith("netboot.image_url=")]
        base = f"http://10.0.2.2:{server.http_port}/machine/{FETCHER.replace(':', '-')}/"
        assert url.startswith(base) and url.endswith("/image"), kernel
        assert f"netboot.image_sha256={hashlib.sha256(image).hexdigest()}" in args
        assert "BOOTIF=01-${netX/mac:hexhyp}" in args and args[-1] == "hostname=f1"  # the appends last
        assert "ip=${netX/ip}::${netX/gateway}:${netX/netmask}:::none:${dns}" in args
        assert {"netboot.ip6=${netX/ip6}/${netX/len6}", "netboot.gateway6=${netX/gateway6}",
                "netboot.dns6=${dns6}"} <= set(args)
        # A machine that knows us by an IPv6 address: the image's URL names it in brackets (RFC 3986 §3.2.2).
        script = get(server.url(f"machine/{FETCHER}/boot.ipxe"), {"Host": "[2001:db8::10]:8080"})[2].decode()
        assert "netboot.image_url=http://[2001:db8::10]:8080/machine/" in script
        # A Host that is not a plain host and port is not written into a script: the address asked at is.
        script = get(server.url(f"machine/{FETCHER}/boot.ipxe"), {"Host": "x/${evil} y"})[2].decode()
        assert f"netboot.image_url=http://127.0.0.1:{server.http_port}/machine/" in script and "evil" not in script

        local = server.url(url.removeprefix(f"http://10.0.2.2:{server.http_port}/"))
        status, headers, body = get(local)
        assert status == 200 and body == image and headers["Accept-Ranges"] == "bytes"
        status, headers, body = get(local, {"Range": f"bytes=4096-{len(image) - 1}"})
        assert (status, body) == (206, image[4096:])
        assert headers["Content-Range"] == f"bytes 4096-{len(image) - 1}/{len(image)}"
        status, headers, body = get(local, method="HEAD")
        assert (status, body, int(headers["Content-Length"])) == (200, b"", len(image))
        assert get(server.url("profile/fetch/image"))[2] == image
        status, _, body = get(server.url("profile/plain/image"))
        assert status == 404 and b"was not built with --fetch" in body

        script = get(server.url(f"machine/{MIRRORED}/boot.ipxe"))[2].decode()
        assert f"netboot.image_url=http://mirror.example/nb/{digest}/image " in script
        assert f"kernel http://mirror.example/nb/{digest}/bzImage " in script

        assert server.logged(f"mac={FETCHER} profile=fetch http /{local.removeprefix(server.url(''))} 200")
        status_url = f"http://127.0.0.1:{server.status_port}/api/machines"
        with urllib.request.urlopen(status_url, timeout=30) as r:
            machines = {m["mac"]: m for m in json.load(r)["machines"]}
        fetcher = machines[FETCHER]
        assert fetcher["state"] == "handed-over", fetcher
        assert any(e["path"].endswith("/image") and e["status"] == "200" and e["bytes"] == len(image)
                   for e in fetcher["events"]), fetcher
    finally:
        server.stop()
