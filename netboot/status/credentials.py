"""The status listener's secrets, read and checked at start (before anything is served), each failure one line
naming its file: the token from a file kept private (`token_from_file`), the certificate and key that make the
listener HTTPS only (`tls_context`)."""

from __future__ import annotations

import os
import ssl
import stat
from pathlib import Path

from netboot.core.errors import NetbootError


def token_from_file(path: Path) -> str:
    """The token a file holds: the whole file, one line, without the newline that ends it. The file must be its
    owner's alone, as ssh's keys must: a token others can read is no secret. A credential systemd handed over
    (LoadCredential=) is private by construction."""
    what = f"--status-token-file {path}"
    try:
        with open(path, "rb") as f:
            mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)  # the file read, not whatever the name is later
            text = f.read().decode()
    except OSError as e:
        raise NetbootError(f"{what}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise NetbootError(f"{what}: not text") from None
    if mode & 0o077 and not _systemd_credential(path):
        raise NetbootError(f"{what}: its group or others may read or change it (mode {mode:04o}): chmod 600 {path}")
    token = text.strip()
    if not token:
        raise NetbootError(f"{what}: the file holds no token")
    if "\n" in token:
        raise NetbootError(f"{what}: the token is the whole file, on one line; this file has more lines")
    return token


def _systemd_credential(path: Path) -> bool:
    """Whether `path` is in this service's credentials directory. systemd writes each credential 0400, owned by
    root, and lets the service's user read it with an ACL entry, whose mask `stat` shows in the group bits (0440;
    systemd's write_credential); the directory is the unit's own, read-only, and no one else's."""
    given = os.environ.get("CREDENTIALS_DIRECTORY")
    return given is not None and path.resolve().parent == Path(given).resolve()


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context with `cert` (PEM, the server's certificate first, then its chain) and its `key` (PEM,
    unencrypted: the server starts unattended)."""
    try:
        pem = cert.read_text()
    except OSError as e:
        raise NetbootError(f"--status-cert {cert}: {e.strerror}") from None
    except UnicodeDecodeError:
        pem = ""
    # load_cert_chain says "PEM lib" for a bad certificate and a bad key alike: the certificate is parsed
    # alone first, so that an error names the right file.
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=pem)
    except ssl.SSLError:
        raise NetbootError(f"--status-cert {cert}: not a PEM certificate") from None
    try:
        key.open("rb").close()
    except OSError as e:
        raise NetbootError(f"--status-key {key}: {e.strerror}") from None

    def encrypted() -> str:  # (OpenSSL would otherwise ask for the passphrase on the terminal)
        raise NetbootError(f"--status-key {key}: the key is encrypted; give it without a passphrase")

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # TLS 1.0 and 1.1 are deprecated (RFC 8996)
    try:
        context.load_cert_chain(cert, key, password=encrypted)
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            raise NetbootError(f"--status-key {key}: not the key of --status-cert {cert}") from None
        raise NetbootError(f"--status-key {key}: not a PEM private key") from None
    except OSError as e:
        raise NetbootError(f"--status-cert {cert} or --status-key {key}: {e.strerror}") from None
    return context
