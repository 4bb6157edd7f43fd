"""The loaders of the Secure Boot chains: architectures, their files, where they come from, and what is missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from netboot.core import loaders
from netboot.core.errors import NetbootError
from netboot.core.loaders import Loaders


def test_architectures_and_their_aliases() -> None:
    for name in ("x86_64", "amd64", "x64", "X86_64"):
        assert loaders.arch(name).files == ("shimx64.efi", "grubx64.efi", "mmx64.efi")
    for name in ("arm64", "aarch64", "aa64"):
        assert loaders.arch(name).files == ("shimaa64.efi", "grubaa64.efi", "mmaa64.efi")
    with pytest.raises(NetbootError, match=r"unknown architecture 'riscv64' \(expected x86_64, arm64, or amd64"):
        loaders.arch("riscv64")
    # RFC 4578 option 93: EDK2's x64 PXE (7) and its EFI BC twin (9), x64 HTTP Boot (16), arm64 (11, 19).
    assert [(a.name, http) for a, http in map(loaders.for_client, (7, 9, 16, 11, 19))] == [
        ("x86_64", False), ("x86_64", False), ("x86_64", True), ("arm64", False), ("arm64", True)]
    assert loaders.for_client(0) is None and loaders.for_client(None) is None


def test_debian_files_by_default(tmp_path: Path) -> None:
    x86 = loaders.arch("x86_64")
    sources = Loaders().sources(x86)
    assert {n: (str(s.path), s.package) for n, s in sources.items()} == {
        "shimx64.efi": ("/usr/lib/shim/shimx64.efi.signed", "shim-signed"),
        "grubx64.efi": ("/usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed", "grub-efi-amd64-signed"),
        "mmx64.efi": ("/usr/lib/shim/mmx64.efi.signed", "shim-helpers-amd64-signed"),
    }
    # Installed by make test: served under the firmware's names, with GRUB's http module (grub-efi-amd64-bin).
    served = Loaders().served()
    assert {"shimx64.efi", "grubx64.efi", "mmx64.efi", "grub/x86_64-efi/http.mod"} <= set(served)
    assert served["grubx64.efi"] == Path("/usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed")
    assert Loaders().missing(x86) is None
    # Debian's arm64 packages are arm64's: not on this machine, and the line names the package.
    assert Loaders().missing(loaders.arch("arm64")) == (
        "/usr/lib/shim/shimaa64.efi.signed is missing (install Debian's shim-signed:arm64, or give --loaders "
        "arm64=DIR with shimaa64.efi)")


def test_a_directory_instead(tmp_path: Path) -> None:
    d = tmp_path / "loaders"
    (d / "x86_64-efi").mkdir(parents=True)
    for name in ("shimx64.efi", "grubx64.efi"):
        (d / name).write_bytes(name.encode())
    given = Loaders.from_options([f"amd64={d}"])
    x86 = loaders.arch("x86_64")
    assert given.missing(x86) == f"{d}/mmx64.efi is missing (the mmx64.efi of --loaders x86_64={d})"
    (d / "mmx64.efi").write_bytes(b"mm")
    assert given.missing(x86) is None
    served = given.served()
    assert {n: served[n] for n in x86.files} == {n: d / n for n in x86.files}
    # Its own GRUB modules only: none here, so GRUB stays on TFTP.
    assert "grub/x86_64-efi/http.mod" not in served
    (d / "x86_64-efi" / "http.mod").write_bytes(b"mod")
    assert given.served()["grub/x86_64-efi/http.mod"] == d / "x86_64-efi" / "http.mod"


def test_arm64_directory_with_an_arm64_ipxe(tmp_path: Path) -> None:
    """--loaders arm64=DIR: arm64's shim, GRUB and MokManager by the firmware's names, and an arm64 iPXE when DIR
    has one (served as arm64/ipxe.efi, apart from x86's ipxe.efi)."""
    d = tmp_path / "aa64"
    d.mkdir()
    for name in ("shimaa64.efi", "grubaa64.efi", "mmaa64.efi"):
        (d / name).write_bytes(name.encode())
    given = Loaders.from_options([f"aarch64={d}"])
    arm = loaders.arch("arm64")
    assert given.missing(arm) is None
    assert {n: p for n, p in given.served().items() if p.parent == d} == {n: d / n for n in arm.files}
    (d / "ipxe.efi").write_bytes(b"an arm64 iPXE")
    assert given.served()["arm64/ipxe.efi"] == d / "ipxe.efi" and "ipxe.efi" not in given.served()
    # What the loaders say of their own build: iPXE's ${buildarch}, GRUB's $grub_cpu.
    assert [loaders.machine_arch(n) for n in ("x86_64", "i386", "arm64", "aarch64", "riscv64", "arm32")] == [
        "x86_64", "x86_64", "arm64", "arm64", None, None]


@pytest.mark.parametrize(("options", "message"), [
    (["x86_64"], "--loaders 'x86_64': expected ARCH=DIR"),
    (["=/tmp"], "--loaders '=/tmp': expected ARCH=DIR"),
    (["mips=/tmp"], "unknown architecture 'mips'"),
    (["x86_64=/nonexistent"], "--loaders 'x86_64=/nonexistent': /nonexistent is not a directory"),
    (["x86_64=/tmp", "amd64=/tmp"], "--loaders x86_64 is given twice"),
])
def test_bad_options(options: list[str], message: str) -> None:
    with pytest.raises(NetbootError, match=message):
        Loaders.from_options(options)
