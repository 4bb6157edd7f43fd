"""Secure Boot at build: the kernel and the unified kernel image signed with the operator's key, and what fails."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from support import cli, need, netboot_ok, signed_build, signing_keys

from netboot.image.modules import SIGNATURE_MAGIC
from netboot.image.uki import SECTIONS


def sbverify(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([need("sbverify"), *map(str, args)], capture_output=True, text=True)


def sections(image: Path) -> dict[str, tuple[int, int]]:
    """name -> (address, size) of a PE image's sections, as objdump reads them."""
    out = subprocess.run([need("objdump"), "-h", str(image)], capture_output=True, text=True, check=True).stdout
    return {m[1]: (int(m[3], 16), int(m[2], 16))
            for m in re.finditer(r"^\s*\d+\s+(\S+)\s+([0-9a-f]+)\s+([0-9a-f]+)\s", out, re.M)}


def section(image: Path, name: str, tmp_path: Path) -> bytes:
    dest = tmp_path / name.lstrip(".")
    subprocess.run([need("objcopy"), "-O", "binary", f"--only-section={name}", str(image), str(dest)], check=True)
    return dest.read_bytes()


def test_signed_kernel_and_unified_kernel_image(system: Path, tmp_path: Path) -> None:
    keys = signing_keys()
    out = signed_build(system)
    # The kernel verifies with the operator's certificate, and carries its signature alone: Debian's is gone.
    assert sbverify("--cert", keys / "cert.pem", out / "bzImage").returncode == 0
    listed = sbverify("--list", out / "bzImage").stdout
    assert re.findall(r"^signature \d+$", listed, re.M) == ["signature 1"], listed
    assert "/CN=netboot test key" in listed and "Debian" not in listed, listed
    assert sbverify("--cert", keys / "other-cert.pem", out / "bzImage").returncode != 0
    assert "Debian" in sbverify("--list", system / "kernel").stdout  # the system's own kernel, as it came

    # The manifest records the signer by its certificate's fingerprint (openssl's).
    manifest = json.loads((out / "manifest.json").read_text())
    der = subprocess.run([need("openssl"), "x509", "-in", keys / "cert.pem", "-outform", "DER"], capture_output=True,
                         check=True).stdout
    shown = subprocess.run(["openssl", "x509", "-in", keys / "cert.pem", "-noout", "-fingerprint", "-sha256"],
                           capture_output=True, text=True, check=True).stdout.strip().split("=", 1)[1]
    assert manifest["signer"] == {"certificate_sha256": hashlib.sha256(der).hexdigest(),
                                  "fingerprint": f"SHA256:{shown}", "subject": "CN=netboot test key"}
    for name in ("bzImage", "netboot.efi"):
        assert manifest["artifacts"][name]["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest()

    # The unified kernel image: systemd's stub with the four sections, none overlapping, signed as a whole.
    uki = out / "netboot.efi"
    assert sbverify("--cert", keys / "cert.pem", uki).returncode == 0
    found = sections(uki)
    placed = sorted(found.values())
    assert all(a + size <= b for (a, size), (b, _) in itertools.pairwise(placed)), found
    assert [found[name][0] for name, _ in SECTIONS] == [address for _, address in SECTIONS]  # systemd-stub(7)'s
    assert section(uki, ".cmdline", tmp_path).decode() == (out / "cmdline").read_text().strip()
    assert section(uki, ".linux", tmp_path) == (system / "kernel").read_bytes()
    assert section(uki, ".initrd", tmp_path) == (out / "initrd").read_bytes()
    assert b"PRETTY_NAME=" in section(uki, ".osrel", tmp_path)
    assert section(uki, ".sdmagic", tmp_path).startswith(b"#### LoaderInfo: systemd-stub")

    # Reproducible: the same inputs and key, the same bytes (signatures included).
    keys_args = ["--sign-key", keys / "key.pem", "--sign-cert", keys / "cert.pem"]
    netboot_ok("build", system, "--format", "squashfs", *keys_args, "--uki", "--out", tmp_path / "again",
               "--no-cache")
    for name in ("bzImage", "initrd", "netboot.efi", "manifest.json"):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes(), name


def test_unsigned_unified_kernel_image(system: Path, tmp_path: Path) -> None:
    netboot_ok("build", system, "--format", "direct", "--uki", "--out", tmp_path / "out")
    out = tmp_path / "out"
    assert "No signature table present" in sbverify("--list", out / "netboot.efi").stderr
    assert "signer" not in json.loads((out / "manifest.json").read_text())
    assert (out / "bzImage").read_bytes() == (system / "kernel").read_bytes()  # Debian's signature kept
    assert section(out / "netboot.efi", ".cmdline", tmp_path).decode().startswith("rdinit=")


@pytest.mark.parametrize("case", ["other key", "key alone", "not a key", "not a certificate", "no such key",
                                  "not a PE kernel"])
def test_bad_keys_and_kernels_are_one_line_and_nothing_is_written(case: str, tmp_path: Path) -> None:
    keys = signing_keys()
    root = tmp_path / "root"
    (root / "sbin").mkdir(parents=True)
    (root / "sbin/init").write_text("#!/bin/sh\n")
    (root / "sbin/init").chmod(0o755)
    kernel = sorted(Path("/boot").glob("vmlinuz-*"))[-1]  # Debian's, a PE image (make test installs it)
    key, cert = keys / "key.pem", keys / "cert.pem"
    match case:
        case "other key":
            key, expected = keys / "other-key.pem", f"--sign-key {keys}/other-key.pem does not match --sign-cert " \
                f"{cert} (not the certificate's key)"
        case "key alone":
            cert, expected = None, "--sign-key and --sign-cert go together (the key and its certificate)"
        case "not a key":
            key, expected = cert, f"--sign-key {cert} is not an unencrypted PEM private key"
        case "not a certificate":
            cert, expected = key, f"--sign-cert {key} is not a PEM certificate"
        case "no such key":
            key, expected = tmp_path / "missing.pem", f"--sign-key {tmp_path}/missing.pem: no such file"
        case "not a PE kernel":
            kernel = tmp_path / "bzImage"
            kernel.write_bytes(b"\0" * 4096)
            expected = f"kernel {kernel} is not a PE image (a kernel built with its EFI stub), which --sign-key needs"
    signing = ["--sign-key", key] + (["--sign-cert", cert] if cert is not None else [])
    proc = cli("build", "--rootfs", root, "--kernel", kernel, "--format", "direct", *signing, "--uki",
               "--out", tmp_path / "out")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"netboot: error: {expected}"]
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["bzImage"] if case == "not a PE kernel" else []) + ["root"]


def test_unsigned_stage1_modules_are_warned(system: Path, tmp_path: Path) -> None:
    """Under Secure Boot the kernel is locked down and loads only signed modules: stage 1's are checked."""
    keys = signing_keys()
    root = tmp_path / "root"
    (root / "sbin").mkdir(parents=True)
    (root / "sbin/init").write_text("#!/bin/sh\n")
    (root / "sbin/init").chmod(0o755)
    (version,) = (system / "kernel-modules/lib/modules").iterdir()
    modules = tmp_path / "modules" / version.name
    shutil.copytree(version, modules, symlinks=True)
    loop = modules / "kernel/drivers/block/loop.ko"
    data = loop.read_bytes()
    assert data.endswith(SIGNATURE_MAGIC)  # Debian signs its modules
    loop.unlink()
    loop.write_bytes(data[:-len(SIGNATURE_MAGIC)])  # what is left carries no signature
    args = ["build", "--rootfs", root, "--kernel", system / "kernel", "--format", "squashfs", "--sign-key",
            keys / "key.pem", "--sign-cert", keys / "cert.pem"]
    done = netboot_ok(*args, "--modules", modules, "--out", tmp_path / "out")
    warned = [line for line in done.stderr.splitlines() if "warning" in line]
    assert warned == ["netboot: warning: stage 1 loads modules that carry no signature (loop): with Secure Boot on, "
                      "the kernel is locked down and refuses them; sign them with the kernel's module key, or use "
                      "--format direct"], done.stderr
    # Debian's own, all signed: no warning; nor without --sign-key.
    done = netboot_ok(*args, "--modules", version, "--out", tmp_path / "out2")
    assert "warning" not in done.stderr
    done = netboot_ok("build", "--rootfs", root, "--kernel", system / "kernel", "--format", "squashfs", "--modules",
                      modules, "--out", tmp_path / "out3")
    assert "warning" not in done.stderr
