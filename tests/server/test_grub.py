"""The Secure Boot chains on the serving side: GRUB's configurations, the loaders and the UKI, by name."""

from __future__ import annotations

import re
import subprocess
import urllib.request
from pathlib import Path

import pytest
from support import ServerProcess, cli, fake_out, need

from netboot.core import loaders
from netboot.core.errors import NetbootError
from netboot.core.loaders import Loaders, Source
from netboot.core.machines import Machines
from netboot.server.namespace import Namespace, NotFound, grub_words

SECURE, SEALED, PLAIN, STRANGER = "52:54:00:00:0b:01", "52:54:00:00:0b:02", "52:54:00:00:0b:03", "52:54:00:00:0b:99"


def make_loaders(d: Path) -> Path:
    """A --loaders directory: stand-ins under the firmware's names, and GRUB's http module."""
    (d / "x86_64-efi").mkdir(parents=True)
    for name in ("shimx64.efi", "grubx64.efi", "mmx64.efi"):
        (d / name).write_bytes(f"the {name} of this directory".encode())
    (d / "x86_64-efi/http.mod").write_bytes(b"GRUB's http module")
    return d


@pytest.fixture
def fleet(tmp_path: Path) -> Path:
    fake_out(tmp_path / "squash")
    (fake_out(tmp_path / "sealed") / "netboot.efi").write_bytes(b"MZ a unified kernel image")
    (tmp_path / "overlay/etc").mkdir(parents=True)
    (tmp_path / "overlay/etc/hostname.j2").write_text("{{ hostname }}\n")
    f = tmp_path / "machines.toml"
    f.write_text(f"""
[profiles.secure]
dir = "squash"
loader = "grub"
append = "console=ttyS0 quiet"
overlay = "overlay"

[profiles.sealed]
dir = "sealed"
loader = "uki"

[profiles.plain]
dir = "squash"

[machines."{SECURE}"]
profile = "secure"
append = 'lang="en us" x=$y'
hostname = "node1"

[machines."{SEALED}"]
profile = "sealed"

[machines."{PLAIN}"]
profile = "plain"
""")
    return f


def text(ns: Namespace, name: str) -> str:
    item = ns.lookup(name)
    assert item.data is not None
    return item.data.decode()


def grub_checks(config: str, tmp_path: Path) -> None:
    """GRUB's own parser (grub-common's grub-script-check) reads the configuration without an error."""
    f = tmp_path / "checked.cfg"
    f.write_text(config)
    proc = subprocess.run([need("grub-script-check"), str(f)], capture_output=True, text=True)
    assert proc.returncode == 0, (proc.stderr, config)


def test_grub_configurations(fleet: Path, tmp_path: Path) -> None:
    ns = Namespace(Machines.load(fleet), single_dir=False, loaders=Loaders.from_options([
        f"x86_64={make_loaders(tmp_path / 'loaders')}"]))
    ns.http_port = 8080
    try:
        chain = text(ns, "/grub/grub.cfg")  # $prefix/grub.cfg, as GRUB asks for it
        assert "source /machine/${net_default_mac}/grub.cfg" in chain
        grub_checks(chain, tmp_path)

        gen = ns.profiles["secure"].current.id
        mine = text(ns, f"/machine/{SECURE}/grub.cfg")  # as GRUB spells $net_default_mac
        assert mine == text(ns, f"machine/{SECURE.replace(':', '-').upper()}/grub.cfg")
        grub_checks(mine, tmp_path)
        base = f"/machine/{SECURE.replace(':', '-')}/{gen}"
        # The build's kernel with its command line, the profile's and the machine's appends, as the kernel will
        # read them; then the build's initrd and the machine's overlay as a second initrd.
        line = f"{base}/bzImage init=/x console=ttyS0 quiet 'lang=en us' 'x=$y'"
        assert f"if linux ${{netboot_files}}{line}; then" in mine, mine
        assert f"    linux {line}\n" in mine  # the TFTP path, when the HTTP one failed
        assert f"initrd ${{netboot_files}}{base}/initrd ${{netboot_files}}{base}/overlay\n" in mine
        # HTTP when GRUB is not locked down and loads its http module; the server GRUB came from, at the HTTP port.
        assert 'if [ "${lockdown}" != "y" ]; then' in mine
        assert 'set netboot_files="(http,${net_default_server}:8080)"' in mine
        assert re.search(r"^boot\n.*\nsleep 30\nreboot\n", mine, re.M | re.S), mine
        # What it names is served, to that machine.
        for file in ("bzImage", "initrd", "overlay"):
            assert ns.lookup(f"{base}/{file}").mac == SECURE

        # A uki profile: GRUB chainloads the build's unified kernel image, verified by shim.
        sealed = text(ns, f"machine/{SEALED}/grub.cfg")
        grub_checks(sealed, tmp_path)
        uki = f"/machine/{SEALED.replace(':', '-')}/{ns.profiles['sealed'].current.id}/netboot.efi"
        assert f"if chainloader ${{netboot_files}}{uki}; then" in sealed and "linux" not in sealed
        held = ns.lookup(uki).file
        assert held is not None and held.size == len(b"MZ a unified kernel image")
        assert ns.lookup("profile/sealed/netboot.efi").file is not None
        with pytest.raises(NotFound, match=r"has no netboot\.efi"):
            ns.lookup(f"/machine/{SECURE.replace(':', '-')}/{gen}/netboot.efi")

        # A machine of an iPXE profile that reaches GRUB anyway (another DHCP server sent it there) boots too.
        assert "linux ${netboot_files}/machine/" in text(ns, f"machine/{PLAIN}/grub.cfg")
        # No profile: the same message as iPXE's, and GRUB starts over.
        unknown = text(ns, f"machine/{STRANGER}/grub.cfg")
        grub_checks(unknown, tmp_path)
        assert f"this machine ({STRANGER}) is not in {fleet}" in unknown and unknown.endswith("reboot\n")
        assert ns.who(f"machine/{STRANGER}/grub.cfg") == (STRANGER, None)
        assert ns.who(f"machine/{SECURE}/grub.cfg") == (SECURE, "secure")
    finally:
        ns.close()


def test_loaders_are_served_under_the_firmwares_names(fleet: Path, tmp_path: Path) -> None:
    d = make_loaders(tmp_path / "loaders")
    ns = Namespace(Machines.load(fleet), single_dir=False, loaders=Loaders.from_options([f"amd64={d}"]))
    try:
        for name in ("shimx64.efi", "grubx64.efi", "mmx64.efi", "grub/x86_64-efi/http.mod"):
            held = ns.lookup(name).file
            assert held is not None and held.size == (d / name.replace("grub/", "")).stat().st_size, name
        with pytest.raises(NotFound):
            ns.lookup("grub/x86_64-efi/normal.mod")  # only the modules netboot's configurations load
    finally:
        ns.close()
    # By default, Debian's (make test installs them).
    ns = Namespace(Machines.load(fleet), single_dir=False)
    try:
        held = ns.lookup("shimx64.efi").file
        assert held is not None and held.size == Path("/usr/lib/shim/shimx64.efi.signed").stat().st_size
    finally:
        ns.close()


def test_a_profile_whose_loader_is_missing_is_refused_with_one_line(fleet: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # As on a server without Debian's shim-signed.
    monkeypatch.setitem(loaders.arch("x86_64").debian, "shimx64.efi", Source(tmp_path / "nope", "shim-signed"))
    expected = (f"profile secure: loader grub needs shimx64.efi, grubx64.efi and mmx64.efi: {tmp_path}/nope is "
                "missing (install Debian's shim-signed, or give --loaders x86_64=DIR with shimx64.efi)")
    with pytest.raises(NetbootError) as e:
        Namespace(Machines.load(fleet), single_dir=False)
    assert str(e.value) == expected
    proc = cli("serve", "--machines", fleet, "--http", "127.0.0.1:0", "--no-tftp", "--status", "none", timeout=30)
    assert (proc.returncode, proc.stderr.strip().splitlines()) == (2, [f"netboot: error: {expected}"])
    # A directory given instead, missing one of them.
    d = make_loaders(tmp_path / "loaders")
    (d / "mmx64.efi").unlink()
    proc = cli("serve", "--machines", fleet, "--http", "127.0.0.1:0", "--no-tftp", "--status", "none",
               "--loaders", f"x86_64={d}", timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"netboot: error: profile secure: loader grub needs shimx64.efi, grubx64.efi and mmx64.efi: {d}/mmx64.efi "
        f"is missing (the mmx64.efi of --loaders x86_64={d})"]
    proc = cli("serve", "--machines", fleet, "--loaders", "sparc=/tmp", timeout=30)
    assert proc.returncode == 2 and "unknown architecture 'sparc'" in proc.stderr


def test_a_uki_profile_needs_a_build_with_its_image(fleet: Path) -> None:
    (fleet.parent / "sealed/netboot.efi").unlink()
    with pytest.raises(NetbootError, match=r"^profile sealed: loader uki needs a build made with netboot build --uki: "
                       r"\S+/sealed has no netboot.efi$"):
        Namespace(Machines.load(fleet), single_dir=False)


def test_served_over_http_and_tftp(fleet: Path, tmp_path: Path) -> None:
    """The same names over both protocols, from a running server, as GRUB and shim fetch them."""
    need("curl")
    server = ServerProcess("--machines", fleet, "--http", "127.0.0.1:0", "--tftp", "127.0.0.1:0",
                           "--loaders", f"x86_64={make_loaders(tmp_path / 'loaders')}")
    try:
        over_http = urllib.request.urlopen(server.url(f"/machine/{SECURE}/grub.cfg"), timeout=10).read().decode()
        # HTTP listens on one address: GRUB is told that one.
        assert f'set netboot_files="(http,127.0.0.1:{server.http_port})"' in over_http
        for name in ("grub/grub.cfg", f"machine/{SECURE}/grub.cfg", "shimx64.efi", "grub/x86_64-efi/http.mod"):
            by_tftp = subprocess.run(["curl", "-sf", f"tftp://127.0.0.1:{server.tftp_port}/{name}"],
                                     capture_output=True, timeout=30)
            by_http = urllib.request.urlopen(server.url(name), timeout=10).read()
            assert by_tftp.returncode == 0 and by_tftp.stdout == by_http and by_http, name
        assert server.logged(f"mac={SECURE} profile=secure tftp /machine/{SECURE}/grub.cfg complete")
    finally:
        server.stop()


@pytest.mark.parametrize(("cmdline", "words"), [
    ("init=/nix/store/x-system/init console=ttyS0,115200 panic=-1", "init=/nix/store/x-system/init "
     "console=ttyS0,115200 panic=-1"),
    ('a  "b c"  d="e f"', "a 'b c' 'd=e f'"),
    ("x=$y;z #c it's", "'x=$y;z' '#c' 'it'\\''s'"),
])
def test_grub_words(cmdline: str, words: str) -> None:
    assert grub_words(cmdline) == words
