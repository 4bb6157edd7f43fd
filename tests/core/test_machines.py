"""The machines file and MAC spellings."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import cli

from netboot.core.errors import NetbootError
from netboot.core.mac import BadMac, exact, normalize
from netboot.core.machines import Machines


@pytest.mark.parametrize(
    "spelling",
    [
        "52:54:00:12:34:56",
        "52-54-00-12-34-56",
        "525400123456",
        "52:54:00:12:34:56".upper(),
        "52-54-00-12-34-56".upper(),
        " 525400123456 ",
    ],
)
def test_every_mac_spelling(spelling: str) -> None:
    assert normalize(spelling) == "52:54:00:12:34:56"


@pytest.mark.parametrize(
    "bad",
    ["", "52:54:00:12:34", "52:54:00:12:34:5g", "5254001234567", "52:54:00-12:34:56:78", "52:5:400:12:34:56", "zz"],
)
def test_invalid_macs(bad: str) -> None:
    with pytest.raises(BadMac, match="invalid MAC address"):
        normalize(bad)


@pytest.mark.parametrize("blanks", [" 525400123456", "52:54:00:12:34:56\n", "52-54-00-12-34-56\r\n", "\t525400123456"])
def test_a_mac_a_client_names_has_nothing_around_it(blanks: str) -> None:
    """What an operator types may have blanks around it; what a client sends in a name may not (namespace.py)."""
    assert normalize(blanks) == exact(blanks.strip()) == "52:54:00:12:34:56"
    with pytest.raises(BadMac, match="invalid MAC address"):
        exact(blanks)


def fake_out(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "manifest.json").write_text('{"cmdline": "init=/x"}')
    return d


def write(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "machines.toml"
    f.write_text(text)
    return f


def test_valid_file(tmp_path: Path) -> None:
    fake_out(tmp_path / "out")
    fake_out(tmp_path / "rescue-out")
    m = Machines.load(
        write(
            tmp_path,
            """
[profiles.default]
dir = "out"
append = "console=ttyS0"

[profiles.rescue]
dir = "rescue-out"

[machines."52:54:00:12:34:56"]
profile = "rescue"
append = "hostname=node1"

[machines.525400123457]
append = "hostname=node2"
ip = "192.0.2.42"
hostname = "node2.lab"
""",
        )
    )
    assert m.for_mac("52:54:00:12:34:56")[0].name == "rescue"
    assert m.for_mac("52:54:00:12:34:56")[1] == "hostname=node1"
    assert m.for_mac("52:54:00:12:34:57")[0].name == "default"
    assert m.for_mac("52:54:00:12:34:57")[1] == "console=ttyS0 hostname=node2"
    assert m.for_mac("52:54:00:99:99:99")[1] == "console=ttyS0"
    assert m.profiles["default"].dir == tmp_path / "out"
    assert (m.machines["52:54:00:12:34:57"].ip, m.machines["52:54:00:12:34:57"].hostname) == ("192.0.2.42",
                                                                                            "node2.lab")
    assert (m.machines["52:54:00:12:34:56"].ip, m.machines["52:54:00:12:34:56"].hostname) == ("", "")


def test_loaders(tmp_path: Path) -> None:
    fake_out(tmp_path / "out")
    m = Machines.load(write(tmp_path, """
[profiles.default]
dir = "out"
[profiles.secure]
dir = "out"
loader = "grub"
[profiles.sealed]
system = "/nix/store/00000000000000000000000000000000-system"
loader = "uki"
"""), state_dir=tmp_path / "state")
    assert [p.loader for p in m.profiles.values()] == ["ipxe", "grub", "uki"]
    # A profile built by netboot serve itself gets its unified kernel image built too.
    assert m.profiles["sealed"].build_args == ("--uki",)


def test_a_build_per_architecture(tmp_path: Path) -> None:
    """dir = { ARCH = DIR }: one profile per build, the profile's own name serving x86_64, and each machine of
    the profile served by the one of its architecture."""
    fake_out(tmp_path / "x86")
    fake_out(tmp_path / "arm")
    m = Machines.load(write(tmp_path, """
[profiles.rack]
dir = { arm64 = "arm", x86_64 = "x86" }
append = "quiet"
[profiles.arm]
dir = { arm64 = "arm" }
[machines."52:54:00:12:34:56"]
profile = "rack"
"""))
    variants = {"x86_64": "rack", "arm64": "rack@arm64"}
    assert sorted(m.profiles) == ["arm", "rack", "rack@arm64"]
    rack, arm = m.profiles["rack"], m.profiles["rack@arm64"]
    assert (rack.dir, rack.arch, rack.variants, rack.append) == (tmp_path / "x86", "x86_64", variants, "quiet")
    assert (arm.dir, arm.arch, arm.variants, arm.append) == (tmp_path / "arm", "arm64", variants, "quiet")
    found = m.for_mac("52:54:00:12:34:56")
    assert found is not None and found[0] is rack
    assert [m.for_arch(rack, a).name for a in ("x86_64", "arm64", None)] == ["rack", "rack@arm64", "rack"]
    assert m.variants_of(rack) == [rack, arm]
    # Only an arm64 build: the profile's own name is it, and x86_64 machines have none.
    only = m.profiles["arm"]
    assert (only.arch, only.variants, m.for_arch(only, "x86_64")) == ("arm64", {"arm64": "arm"}, only)


@pytest.mark.parametrize(("text", "message"), [
    ("[profiles.r]\ndir = { mips = 'out' }\n", "machines.toml:1: profiles.r: dir.mips: unknown architecture "
                                                "(expected x86_64, arm64)"),
    ("[profiles.r]\ndir = { arm64 = 1 }\n", "profiles.r: dir.arm64 must be an output directory of netboot build"),
    ("[profiles.r]\ndir = { arm64 = 'missing' }\n", "profiles.r: dir.arm64 'missing' does not exist"),
    ("[profiles.r]\ndir = {}\n", "profiles.r: dir = {} names no build (one per architecture: x86_64 = DIR, "
                                   "arm64 = DIR)"),
    ("[profiles.r]\ndir = { arm64 = 'out', x86_64 = 'out' }\n[profiles.'r@arm64']\ndir = 'out'\n",
     "profiles.r: dir.arm64 needs the name 'r@arm64', which another profile has"),
])
def test_bad_builds_per_architecture(tmp_path: Path, text: str, message: str) -> None:
    fake_out(tmp_path / "out")
    with pytest.raises(NetbootError) as e:
        Machines.load(write(tmp_path, text))
    assert message in str(e.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[profiles.default\ndir = 'out'\n",
            "machines.toml: invalid TOML: Expected ']' at the end of a table declaration (at line 1",
        ),
        (
            "[profiles.default]\ndir = 'out'\n[machines.'52:54:00:12:34:56']\nprofile = 'resue'\n",
            "machines.toml:3: machines.'52:54:00:12:34:56': profile 'resue' is not defined in [profiles]",
        ),
        ("[profiles.default]\ndir = 'missing'\n", "machines.toml:1: profiles.default: dir 'missing' does not exist"),
        (
            "[profiles.default]\ndir = 'out'\n[machines.'52:54:00:12:34:56']\n[machines.'52-54-00-12-34-56']\n",
            "machines.toml:4: machines.'52-54-00-12-34-56' is the same machine as machines.'52:54:00:12:34:56'",
        ),
        (
            "[profiles.default]\ndir = 'out'\n[machines.'52:54:00:12:34']\n",
            "machines.toml:3: machines.'52:54:00:12:34': invalid MAC",
        ),
        (
            "[profiles.default]\ndir = 'out'\nappend = 'a'\nkernel = 'x'\n",
            "machines.toml:4: profiles.default: unknown key 'kernel'",
        ),
        ("[machines.'52:54:00:12:34:56']\n", "no [profiles.NAME] defined"),
        ("[profiles.default]\n", "profiles.default needs dir ="),
        ("[profile.default]\ndir = 'out'\n", "unknown section 'profile'"),
        ("[profiles.default]\ndir = 'plain'\n", "dir 'plain' has no manifest.json; is it an output of netboot build?"),
        (
            "[profiles.default]\ndir = 'out'\n[machines.'52:54:00:12:34:56']\nip = '192.0.2.300'\n",
            "machines.toml:3: machines.'52:54:00:12:34:56': ip '192.0.2.300' is not an IPv4 address",
        ),
        (
            "[profiles.default]\ndir = 'out'\n[machines.'52:54:00:12:34:56']\nip = 42\n",
            "machines.toml:3: machines.'52:54:00:12:34:56': ip 42 is not an IPv4 address",
        ),
        (
            "[profiles.default]\ndir = 'out'\n[machines.'52:54:00:12:34:56']\nip = '192.0.2.42'\n"
            "[machines.'52:54:00:12:34:57']\nip = '192.0.2.42'\n",
            "machines.toml:5: machines.'52:54:00:12:34:57': ip 192.0.2.42 is already reserved for "
            "machines.'52:54:00:12:34:56'",
        ),
        (
            "[profiles.default]\ndir = 'out'\n[machines.'52:54:00:12:34:56']\nhostname = 'node_1'\n",
            "machines.toml:3: machines.'52:54:00:12:34:56': hostname 'node_1' is not a valid host name",
        ),
        (
            "[profiles.default]\ndir = 'out'\n[machines.'52:54:00:12:34:56']\nhostname = '-node'\n",
            "hostname '-node' is not a valid host name",
        ),
        (
            "[profiles.default]\ndir = 'out'\nloader = 'shim'\n",
            "machines.toml:1: profiles.default: loader 'shim' is not one of ipxe, grub, uki",
        ),
        # A unified kernel image's initrd and command line are under its signature: nothing can be added.
        (
            "[profiles.default]\ndir = 'out'\nloader = 'uki'\noverlay = 'plain'\n",
            "machines.toml:1: profiles.default: an overlay cannot reach the machines of a uki profile",
        ),
        (
            "[profiles.default]\ndir = 'out'\nloader = 'uki'\nappend = 'quiet'\n",
            "machines.toml:1: profiles.default: append cannot reach the machines of a uki profile",
        ),
        (
            "[profiles.default]\ndir = 'out'\nloader = 'uki'\n[machines.'52:54:00:12:34:56']\nappend = 'x=1'\n",
            "machines.toml:4: machines.'52:54:00:12:34:56': append cannot reach the machines of a uki profile",
        ),
        # A MAC outside quotes is no TOML key: the line as it should be.
        (
            "[profiles.default]\ndir = 'out'\n[machines.52:54:00:12:34:56]\n",
            "machines.toml:3: a MAC address must be quoted in TOML (its colons are not allowed in a bare key): "
            '[machines."52:54:00:12:34:56"]',
        ),
        (
            "[profiles.default]\ndir = 'out'\n[machines]\n52:54:00:AB:34:56 = { profile = 'default' } # node\n",
            "machines.toml:4: a MAC address must be quoted in TOML (its colons are not allowed in a bare key): "
            "\"52:54:00:AB:34:56\" = { profile = 'default' } # node",
        ),
        (
            "[profiles.default]\ndir = 'out'\n[machines.'52:54:00:12:34:56'\n",
            "machines.toml: invalid TOML: Expected ']' at the end of a table declaration (at line 3",
        ),
        # Without a default profile, a table that names none: its misspelt key, at its line, else what to add.
        (
            "[profiles.rack]\ndir = 'out'\nappend = 'hw=52:54:00:12:34:56'\n\n[machines.'52:54:00:12:34:56']\n"
            "hostname = 'n1'\nprofle = 'rack'\n",
            "machines.toml:7: machines.'52:54:00:12:34:56': unknown key 'profle' (expected append, hostname, ip, "
            "ipxe_binary, profile; it names no profile, and there is no [profiles.default])",
        ),
        (
            "[profiles.rack]\ndir = 'out'\nappend = 'hw=52:54:00:12:34:56'\n[profiles.b]\ndir = 'out'\n"
            "[machines.'52:54:00:12:34:56']\nhostname = 'n1'\n",
            "machines.toml:6: machines.'52:54:00:12:34:56' names no profile, and there is no [profiles.default]: "
            "add profile = \"NAME\" (one of b, rack) or define [profiles.default]",
        ),
    ],
)
def test_bad_files(tmp_path: Path, text: str, message: str) -> None:
    fake_out(tmp_path / "out")
    (tmp_path / "plain").mkdir()
    f = write(tmp_path, text)
    with pytest.raises(NetbootError) as e:
        Machines.load(f)
    assert message in str(e.value)
    # The command refuses to start with that one line and exit status 2.
    proc = cli("serve", "--machines", f, "--http", "127.0.0.1:0", "--no-tftp", timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"netboot: error: {e.value}"]
