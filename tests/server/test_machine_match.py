"""Machines found by what they are: the facts iPXE sends in the name of a machine's script, tables keyed by SMBIOS
UUID or serial number, and a machine's own iPXE binary chained from its script."""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path

import pytest
from initrd_reader import decompress, items
from support import fake_out

from netboot.core.errors import NetbootError
from netboot.core.machines import Machines
from netboot.server.namespace import FACTS_PATH, Namespace, NotFound

LISTED, STRANGER = "52:54:00:00:0d:01", "52:54:00:00:0d:99"
UUID = "4c4c4544-0042-3510-8052-b4c04f4d3532"
SERIAL = "SN-0042/B"  # with a "/", which iPXE decodes into the path it sends


@pytest.fixture
def fleet(tmp_path: Path) -> Path:
    fake_out(tmp_path / "squash")
    fake_out(tmp_path / "direct", "direct", "gzip", 6)
    (tmp_path / "overlay/etc").mkdir(parents=True)
    (tmp_path / "overlay/etc/hostname.j2").write_text("{{ hostname }} {{ mac }} {{ role }}\n")
    f = tmp_path / "machines.toml"
    f.write_text(f"""
[profiles.squash]
dir = "squash"
overlay = "overlay"

[profiles.direct]
dir = "direct"
ipxe_binary = "undionly.kpxe"

[machines."{LISTED}"]
profile = "direct"
ipxe_binary = "snponly.efi"

[machines."uuid:{UUID.upper()}"]
profile = "squash"
hostname = "by-uuid"
role = "db"

[machines."serial:{SERIAL.lower()}"]
profile = "direct"
""")
    return f


def name(mac: str, **facts: str) -> str:
    """A script's name as iPXE asks for it (boot.ipxe's chain, expanded): each value ${…:uristring}-escaped, then
    decoded again when iPXE parses the URI (and by aiohttp): what the server's parser is given."""
    segments = FACTS_PATH.replace("${uuid}", facts.get("uuid", ""))
    for key in ("serial", "manufacturer", "product", "buildarch", "platform"):
        segments = segments.replace(f"${{{key}:uristring}}", urllib.parse.unquote(urllib.parse.quote(
            facts.get(key, ""), safe="")))
    return f"machine/{mac.replace(':', '-')}/{segments}/boot.ipxe"


def script(ns: Namespace, path: str) -> str:
    item = ns.lookup(path)
    assert item.data is not None
    return item.data.decode()


def files(text: str) -> list[str]:
    return re.findall(r"(/machine/\S+/(?:bzImage|initrd|overlay))\b", text)


def test_facts_are_parsed_and_kept_out_of_the_name_shown(fleet: Path) -> None:
    ns = Namespace(Machines.load(fleet), single_dir=False)
    try:
        asked = name(STRANGER, uuid="01020304-0506-0708-090a-0b0c0d0e0f10", serial="A/B/product=x",
                     manufacturer="QEMU", product="Standard PC (Q35 + ICH9, 2009)", buildarch="i386",
                     platform="pcbios")
        whom = ns.attribution(asked)
        assert (whom.mac, whom.profile, whom.path) == (STRANGER, None, "machine/52-54-00-00-0d-99/boot.ipxe")
        assert dict(whom.facts) == {
            "uuid": "01020304-0506-0708-090a-0b0c0d0e0f10",
            # A value whose "/" split it is mended; a part that looks like a key is taken as one (the machine's own
            # doing), and the key's own segment, later, wins.
            "serial": "A/B", "product": "Standard PC (Q35 + ICH9, 2009)", "manufacturer": "QEMU",
            "buildarch": "i386", "platform": "pcbios"}
        # What iPXE does not know is left out; a bare name has no facts.
        assert ns.attribution(name(STRANGER, platform="efi")).facts == (("platform", "efi"),)
        assert ns.attribution("machine/52-54-00-00-0d-99/boot.ipxe").facts == ()
        # A segment that is not a fact (nor a loader's name for an architecture) is no name the server serves.
        for bad in ("machine/52-54-00-00-0d-99/colour=red/boot.ipxe", "machine/52-54-00-00-0d-99/x.y/boot.ipxe"):
            assert ns.who(bad) == (None, None)
            with pytest.raises(NotFound):
                ns.lookup(bad)
        # The unknown machine's script asks again with its facts, and is the same for any of them.
        text = script(ns, asked)
        assert f"chain --replace --autofree /machine/52-54-00-00-0d-99/{FACTS_PATH}/boot.ipxe" in text
        assert ns.lookup(asked).name == "machine/52-54-00-00-0d-99/boot.ipxe"
    finally:
        ns.close()


def test_mac_wins_then_uuid_then_serial(fleet: Path) -> None:
    ns = Namespace(Machines.load(fleet), single_dir=False)
    try:
        both = {"uuid": UUID, "serial": SERIAL}
        assert ns.who(name(LISTED, **both))[1] == "direct"  # its MAC's table
        assert ns.who(name(STRANGER, **both))[1] == "squash"  # the UUID's, over the serial's
        assert ns.who(name(STRANGER, serial=SERIAL.upper()))[1] == "direct"  # serials: any case
        assert ns.who(name(STRANGER, uuid="00000000-0000-0000-0000-000000000001"))[1] is None
    finally:
        ns.close()


def test_a_machine_matched_by_uuid_boots_its_profile_with_its_variables(fleet: Path) -> None:
    ns = Namespace(Machines.load(fleet), single_dir=False)
    try:
        text = script(ns, name(STRANGER, uuid=UUID, serial="whatever"))
        assert "boots profile squash" in text
        gen = ns.profiles["squash"].current.id
        # Its files are named by the match, so that they are found again without the server remembering it.
        assert files(text) == [f"/machine/52-54-00-00-0d-99/uuid={UUID}/{gen}/{f}" for f in
                               ("bzImage", "initrd", "overlay")]
        for path in files(text):
            item = ns.lookup(path)
            assert (item.mac, item.profile, item.name) == (STRANGER, "squash",
                                                           f"machine/52-54-00-00-0d-99/{gen}/{path.split('/')[-1]}")
        member = decompress(ns.lookup(files(text)[2]).data, "zstd")
        rendered = {e.name: e.data for e in items(member)}
        assert rendered["netboot-overlay/etc/hostname"] == f"by-uuid {STRANGER} db\n".encode()
        # Without the match in the name, a stranger's files are not served (no default profile).
        with pytest.raises(NotFound, match="has no profile"):
            ns.lookup(f"machine/52-54-00-00-0d-99/{gen}/initrd")
    finally:
        ns.close()


def test_a_machine_matched_by_a_serial_with_a_slash(fleet: Path) -> None:
    ns = Namespace(Machines.load(fleet), single_dir=False)
    try:
        text = script(ns, name(STRANGER, serial=SERIAL))
        gen = ns.profiles["direct"].current.id
        # Escaped for the script; iPXE decodes it (the "/" splits the path again) and the parser mends it.
        assert files(text)[0] == f"/machine/52-54-00-00-0d-99/serial=sn-0042%2Fb/{gen}/bzImage"
        decoded = urllib.parse.unquote(files(text)[1])
        assert ns.who(decoded) == (STRANGER, "direct")
        assert ns.lookup(decoded).file is not None
    finally:
        ns.close()


def test_the_script_chains_the_ipxe_binary_its_machine_chose(fleet: Path) -> None:
    ns = Namespace(Machines.load(fleet), single_dir=False)
    ns.binaries.clear()
    ns.binaries.update({b: ns.profiles["direct"].current.files["cmdline"] for b in ("snponly.efi", "undionly.kpxe")})
    try:
        own = script(ns, name(LISTED)).splitlines()
        assert own[2:5] == ["iseq ${platform} efi || goto netboot_binary",
                            "iseq ${netX/chip} SNP || iseq ${netX/chip} NII || iseq ${netX/chip} MNP || "
                            "chain /snponly.efi",
                            ":netboot_binary"]
        profiles = script(ns, name(STRANGER, serial=SERIAL)).splitlines()  # the direct profile's choice
        assert profiles[2:5] == ["iseq ${platform} pcbios || goto netboot_binary",
                                 "iseq ${netX/chip} undionly || chain /undionly.kpxe", ":netboot_binary"]
        assert "chain" not in script(ns, name(STRANGER, uuid=UUID))
        ns.binaries.clear()  # not installed: the machine boots with the iPXE it runs, and is told
        assert "echo netboot: snponly.efi is not installed" in script(ns, name(LISTED))
    finally:
        ns.binaries.clear()
        ns.close()


@pytest.mark.parametrize(("tables", "error"), [
    (f'[machines."uuid:{UUID}"]\n[machines."uuid:{UUID.upper().replace("-", "")}"]\n',
     f"machines.'uuid:{UUID.upper().replace('-', '')}' is the same machine as machines.'uuid:{UUID}' "
     f"(uuid:{UUID})"),
    ('[machines."serial:AB 1"]\n[machines."serial: ab 1 "]\n',
     "machines.'serial: ab 1 ' is the same machine as machines.'serial:AB 1' (serial:ab 1)"),
    ('[machines."uuid:not-a-uuid"]\n', "'not-a-uuid' is not a UUID"),
    ('[machines."serial:"]\n', "a serial number must be printable text"),
    (f'[machines."uuid:{UUID}"]\nip = "192.0.2.5"\n', "ip reserves an address for a MAC"),
    ('[machines."52:54:00:00:00:01"]\nipxe_binary = "grub.efi"\n',
     "ipxe_binary 'grub.efi' is not one of undionly.kpxe, ipxe.efi, snponly.efi"),
    ('[profiles.other]\ndir = "squash"\nipxe_binary = "ipxe.pxe"\n', "ipxe_binary 'ipxe.pxe' is not one of"),
    ('[machines."nonsense"]\n', "invalid MAC address 'nonsense' (or key it uuid:<UUID> or serial:<SERIAL>)"),
])
def test_bad_tables_are_load_errors(tmp_path: Path, tables: str, error: str) -> None:
    fake_out(tmp_path / "squash")
    f = tmp_path / "machines.toml"
    f.write_text(f'[profiles.default]\ndir = "squash"\n{tables}')
    with pytest.raises(NetbootError, match=re.escape(error)):
        Machines.load(f)
