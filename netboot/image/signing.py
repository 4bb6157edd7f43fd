"""Authenticode signatures for UEFI Secure Boot: the kernel, and the unified kernel image (uki.py).

`netboot build --sign-key KEY --sign-cert CERT` signs with the operator's key, after removing the signatures the
image had (a distribution kernel comes signed by its distribution), so that the result verifies with that key
alone. The standard tools do the work: openssl reads the key and the certificate, sbattach (sbsigntool)
removes signatures, osslsigncode signs, and sbverify checks the result against the certificate before it is
published, as the firmware and shim will.

osslsigncode rather than sbsign signs: OpenSSL stamps the current time into a signature's signed attributes
(PKCS#9 signingTime), and sbsign has no way to pin it, so two builds would differ; osslsigncode's `-time` pins it
to SOURCE_DATE_EPOCH (netboot's fixed time otherwise), and the same inputs and key give the same bytes. Firmware
and shim do not check that time (they have no trusted clock).
"""

from __future__ import annotations

import hashlib
import subprocess
from dataclasses import dataclass
from pathlib import Path

from netboot.core.errors import NetbootError
from netboot.core.run import last_words, require, run

_MAX_SIGNATURES = 16  # an image with more is not one netboot should sign


def is_pe(path: Path) -> bool:
    """Whether `path` is a PE image: "MZ", and "PE\\0\\0" where e_lfanew (at 0x3c) points (PE format, MS-DOS stub)."""
    try:
        with open(path, "rb") as f:
            head = f.read(0x40)
            if len(head) < 0x40 or head[:2] != b"MZ":
                return False
            f.seek(int.from_bytes(head[0x3C:0x40], "little"))
            return f.read(4) == b"PE\0\0"
    except OSError as e:
        raise NetbootError(f"cannot read {path}: {e.strerror}") from e


def check_pe(kernel: Path, why: str) -> None:
    if not is_pe(kernel):
        raise NetbootError(f"kernel {kernel} is not a PE image (a kernel built with its EFI stub), which {why} needs")


@dataclass(frozen=True)
class Signer:
    key: Path
    cert: Path
    sha256: str  # the certificate's fingerprint: sha256 of its DER encoding
    subject: str

    @classmethod
    def load(cls, key: Path, cert: Path) -> Signer:
        """The key and certificate, checked: both readable PEM, and the key the certificate's."""
        for tool, package in (("openssl", "openssl"), ("osslsigncode", "osslsigncode"), ("sbattach", "sbsigntool"),
                              ("sbverify", "sbsigntool")):
            require(tool, f"install Debian's {package}: --sign-key needs it")
        for flag, path in (("--sign-key", key), ("--sign-cert", cert)):
            if not path.is_file():
                raise NetbootError(f"{flag} {path}: no such file")
        der = _openssl(["x509", "-in", str(cert), "-outform", "DER"], f"--sign-cert {cert} is not a PEM certificate")
        cert_public = _openssl(["x509", "-in", str(cert), "-noout", "-pubkey"], f"--sign-cert {cert}")
        # An empty passphrase, never a prompt: a key protected by one is refused rather than waited on.
        key_public = _openssl(["pkey", "-in", str(key), "-pubout", "-passin", "pass:"],
                              f"--sign-key {key} is not an unencrypted PEM private key")
        if key_public.strip() != cert_public.strip():
            raise NetbootError(f"--sign-key {key} does not match --sign-cert {cert} (not the certificate's key)")
        subject = _openssl(["x509", "-in", str(cert), "-noout", "-subject", "-nameopt", "RFC2253"],
                           f"--sign-cert {cert}").decode(errors="replace").strip().removeprefix("subject=")
        return cls(key.absolute(), cert.absolute(), hashlib.sha256(der).hexdigest(), subject)

    def describe(self) -> dict:
        """What the manifest records of the signer."""
        colons = ":".join(self.sha256[i:i + 2] for i in range(0, len(self.sha256), 2)).upper()
        return {"certificate_sha256": self.sha256, "fingerprint": f"SHA256:{colons}", "subject": self.subject}

    def sign(self, image: Path, epoch: int) -> None:
        """Sign the PE `image` in place with this key alone, at the signing time `epoch`, and check it."""
        _strip(image)
        signed = image.with_name(image.name + ".signed")
        run(["osslsigncode", "sign", "-certs", str(self.cert), "-key", str(self.key), "-h", "sha256",
             "-time", str(epoch), "-in", str(image), "-out", str(signed)], what=f"signing {image.name}",
            stdin=subprocess.DEVNULL)
        signed.replace(image)
        run(["sbverify", "--cert", str(self.cert), str(image)], what=f"checking the signature of {image.name}")


def _strip(image: Path) -> None:
    """Remove every signature an image carries: sbattach removes one at a time, and says when none is left."""
    for _ in range(_MAX_SIGNATURES):
        proc = subprocess.run(["sbattach", "--remove", str(image)], capture_output=True, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            if b"No signature table present" in proc.stderr + proc.stdout:
                return
            raise NetbootError(f"removing the signatures of {image.name}: sbattach failed "
                               f"(exit {proc.returncode}){last_words(proc.stderr)}")
    raise NetbootError(f"{image.name} carries more than {_MAX_SIGNATURES} signatures")


def _openssl(args: list[str], what: str) -> bytes:
    """openssl's output; its failure is `what` alone (its own last words name OpenSSL's internals, not the file)."""
    proc = subprocess.run(["openssl", *args], capture_output=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise NetbootError(what)
    return proc.stdout
