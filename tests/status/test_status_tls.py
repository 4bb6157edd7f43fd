"""The status listener over HTTPS (--status-cert, --status-key) and its token from a file (--status-token-file), on
a real `netboot serve`, read by curl with a CA of the test's own; the bad certificates, keys and token files that
are refused at start, each in one line."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest
from support import ServerProcess, cli, fake_out, need, status_pki, write_machines

KNOWN = "52:54:00:00:0c:01"
TOKEN = "tls-s3cret"


@pytest.fixture
def pki() -> Path:
    return status_pki()


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return fake_out(tmp_path / "out", "direct")


def token_file(path: Path, text: str = TOKEN + "\n", mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def curl(*args: str | Path) -> subprocess.CompletedProcess:
    need("curl")
    return subprocess.run(["curl", "-sS", "--max-time", "30", *map(str, args)], capture_output=True, text=True,
                          timeout=60)


def test_with_a_certificate_the_listener_speaks_https_only(pki: Path, out: Path, tmp_path: Path) -> None:
    machines = write_machines(tmp_path / "machines.toml", {"p": out}, {KNOWN: "p"})
    server = ServerProcess("--machines", machines, "--http", "127.0.0.1:0", "--no-tftp",
                           "--status-cert", pki / "server.pem", "--status-key", pki / "server-key.pem",
                           "--status-token-file", token_file(tmp_path / "token"))
    port = server.status_port
    https = f"https://127.0.0.1:{port}"
    try:
        assert f"status: https://127.0.0.1:{port}/ " in server.log
        answer = curl("--cacert", pki / "ca.pem", "-H", f"Authorization: Bearer {TOKEN}", f"{https}/api/machines")
        assert answer.returncode == 0, answer.stderr
        assert KNOWN in {m["mac"] for m in json.loads(answer.stdout)["machines"]}
        # The certificate is checked against the CA like any site's: without it, curl refuses the server.
        assert curl(f"{https}/api/machines").returncode == 60  # CURLE_PEER_FAILED_VERIFICATION
        # The page's cookie goes only over HTTPS.
        headers = curl("--cacert", pki / "ca.pem", "-D", "-", "-o", "/dev/null", f"{https}/?token={TOKEN}")
        cookie = next(line for line in headers.stdout.splitlines() if line.lower().startswith("set-cookie:"))
        assert "; Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie, cookie
        # Plain HTTP on the same port: no answer at all, let alone the API's.
        plain = curl("-H", f"Authorization: Bearer {TOKEN}", f"http://127.0.0.1:{port}/api/machines")
        assert plain.returncode != 0 and KNOWN not in plain.stdout, (plain.returncode, plain.stdout)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(f"GET /api/machines HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
                      .encode())
            assert not s.recv(65536).startswith(b"HTTP/")
        # TLS 1.2, the least it speaks, and 1.3. (TLS 1.1 is not tried: this machine's OpenSSL will not speak it,
        # as client or as server, whatever netboot asks.)
        for version in ("1.2", "1.3"):
            assert curl("--cacert", pki / "ca.pem", f"--tlsv{version}", "--tls-max", version, "-H",
                        f"Authorization: Bearer {TOKEN}", f"{https}/api/machines").returncode == 0, version
    finally:
        server.stop()


def refusal(*args: str | Path) -> str:
    """What `netboot serve` with ARGS says as it refuses to start: one line, exit status 2."""
    proc = cli("serve", *map(str, args), timeout=30)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # (nothing was served: serving is logged)
    return lines[0]


def test_bad_certificates_and_keys_are_refused_at_start(pki: Path, out: Path, tmp_path: Path) -> None:
    args = ("--dir", out, "--http", "127.0.0.1:0", "--no-tftp", "--status", "127.0.0.1:0")
    cert, key = pki / "server.pem", pki / "server-key.pem"
    assert "--status-key" in refusal(*args, "--status-cert", cert)
    assert "--status-cert" in refusal(*args, "--status-key", key)
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    missing = tmp_path / "missing.pem"
    for bad_cert, said in ((missing, "No such file or directory"), (tmp_path, "Is a directory"),
                           (junk, "not a PEM certificate"), (key, "not a PEM certificate")):
        line = refusal(*args, "--status-cert", bad_cert, "--status-key", key)
        assert f"--status-cert {bad_cert}: {said}" in line, line
    for bad_key, said in ((missing, "No such file or directory"), (junk, "not a PEM private key"),
                          (cert, "not a PEM private key"), (pki / "other-key.pem", "not the key of --status-cert"),
                          (pki / "encrypted-key.pem", "the key is encrypted")):
        line = refusal(*args, "--status-cert", cert, "--status-key", bad_key)
        assert f"--status-key {bad_key}: {said}" in line, line


def test_bad_token_files_are_refused_at_start(out: Path, tmp_path: Path) -> None:
    args = ("--dir", out, "--http", "127.0.0.1:0", "--no-tftp", "--status", "127.0.0.1:0")
    for mode in (0o644, 0o640, 0o604, 0o620):
        line = refusal(*args, "--status-token-file", token_file(tmp_path / f"token-{mode:o}", mode=mode))
        assert f"(mode {mode:04o}): chmod 600 {tmp_path}/token-{mode:o}" in line, line
    for text, said in (("", "holds no token"), ("\n", "holds no token"), (f"{TOKEN}\nanother\n", "on one line")):
        assert said in refusal(*args, "--status-token-file", token_file(tmp_path / "token", text))
    assert "No such file or directory" in refusal(*args, "--status-token-file", tmp_path / "missing")
    assert "Is a directory" in refusal(*args, "--status-token-file", tmp_path)
    both = refusal(*args, "--status-token", TOKEN, "--status-token-file", token_file(tmp_path / "token"))
    assert "--status-token-file: not allowed with argument --status-token" in both, both
