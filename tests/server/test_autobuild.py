"""Profiles that name a system: netboot serve builds them, follows a Nix profile to a new system and back
(nix-env --set, --rollback), keeps serving the previous build while building and when a build fails."""

from __future__ import annotations

import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from support import ServerProcess, build_system, need, netboot

from netboot.core.errors import NetbootError
from netboot.core.machines import Machines

NODE = "52:54:00:00:0e:01"


def nix_env(profile: Path, *args: str | Path) -> None:
    need("nix-env")
    subprocess.run(["nix-env", "-p", profile, *args], check=True, capture_output=True)


def script(server: ServerProcess) -> str:
    with urllib.request.urlopen(server.url(f"machine/{NODE.replace(':', '-')}/boot.ipxe"), timeout=30) as r:
        return r.read().decode()


def fetch(server: ServerProcess, path: str) -> bytes:
    with urllib.request.urlopen(server.url(path), timeout=30) as r:
        return r.read()


def names(text: str) -> str:
    """The system a script boots."""
    m = re.search(r"boots profile rack, (\S+)\.$", text, re.M)
    assert m, text
    return m.group(1)


def wait_for_system(server: ServerProcess, system: Path, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = script(server)
        if names(text) == str(system):
            return text
        assert time.monotonic() < deadline, f"scripts still name {names(text)}, not {system}:\n{server.log}"
        time.sleep(0.2)


def files_of(text: str) -> tuple[str, str]:
    return (re.search(r"^kernel (\S+) ", text, re.M).group(1),  # type: ignore[union-attr]
            re.search(r"^initrd --name initrd (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]


@pytest.mark.slow
def test_a_profile_follows_its_nix_profile(system: Path, tmp_path: Path) -> None:
    other = build_system(tmp_path / "other", "--argstr", "name", "netboot-test-other")
    profile = tmp_path / "profiles" / "rack"
    profile.parent.mkdir()
    nix_env(profile, "--set", system)
    machines = tmp_path / "machines.toml"
    machines.write_text(f'[profiles.rack]\nsystem = "{profile}"\nformat = "direct"\ncompress = "gzip"\nlevel = 1\n'
                        f'\n[machines."{NODE}"]\nprofile = "rack"\n')
    state = tmp_path / "state"
    server = ServerProcess("--machines", machines, "--state-dir", state, "--http", "127.0.0.1:0", "--no-tftp")
    try:
        # Built at start, with the profile's options.
        first = script(server)
        assert names(first) == str(system) and f"rdinit={system}/init" in first
        manifest = (state / "profiles/rack/manifest.json").read_text()
        assert '"format": "direct"' in manifest and '"compression": "gzip"' in manifest and '"level": 1' in manifest
        kernel, initrd = files_of(first)
        old_initrd = (state / "profiles/rack/initrd").read_bytes()

        # A new generation: built in the background, then served; a machine that started before completes.
        nix_env(profile, "--set", other)
        second = wait_for_system(server, other)
        assert files_of(second) != (kernel, initrd)
        assert fetch(server, initrd) == old_initrd
        assert len(fetch(server, kernel)) > 1 << 20
        assert f"profile rack: switched to {other}" in server.log

        # Back: that build is still on disk, so no second build of the first system.
        nix_env(profile, "--rollback")
        assert files_of(wait_for_system(server, system)) == (kernel, initrd)
        assert server.log.count(f"building {system}") == 1, server.log

        # A system that cannot be built: logged, and the previous build stays.
        broken = Path(re.search(r"(/nix/store/[^/]*busybox[^/]*)", (system / "init").read_text()).group(1))  # type: ignore[union-attr]
        nix_env(profile, "--set", broken)
        deadline = time.monotonic() + 60
        while f"profile rack: building {broken} failed, serving the previous build:" not in server.log:
            assert time.monotonic() < deadline, server.log
            time.sleep(0.2)
        assert names(script(server)) == str(system)
        assert fetch(server, initrd)  # still served
    finally:
        server.stop()


def test_serve_stops_when_a_first_build_fails(system: Path, tmp_path: Path) -> None:
    machines = tmp_path / "machines.toml"
    busybox = re.search(r"(/nix/store/[^/]*busybox[^/]*)", (system / "init").read_text()).group(1)  # type: ignore[union-attr]
    machines.write_text(f'[profiles.rack]\nsystem = "{busybox}"\n')
    done = netboot("serve", "--machines", machines, "--state-dir", tmp_path / "state", "--http", "127.0.0.1:0",
                   "--no-tftp", "--status", "none", timeout=120)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1].startswith(f"netboot: error: profile rack: building {busybox} failed: ")
    assert not (tmp_path / "state/profiles/rack").exists()


@pytest.mark.parametrize(
    ("entry", "error"),
    [
        ('dir = "out"\nsystem = "/nix/var/nix/profiles/x"', "give either dir or system, not both"),
        ('dir = "out"\nformat = "direct"', "format is a build option, for a profile with a system"),
        ('system = "relative/path"', "system must be the absolute path of a Nix profile or store path"),
        ('system = "/nix/var/nix/profiles/x"\nformat = "tar"', "format 'tar' is not one of"),
        ('system = "/nix/var/nix/profiles/x"\ncompress = "zip"', "unknown compression 'zip'"),
        ('system = "/nix/var/nix/profiles/x"\nlevel = 99', "--level 99 is out of range for zstd"),
    ],
)
def test_system_profile_errors(tmp_path: Path, entry: str, error: str) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out/manifest.json").write_text('{"cmdline": "init=/x"}')
    f = tmp_path / "machines.toml"
    f.write_text(f"[profiles.rack]\n{entry}\n")
    with pytest.raises(NetbootError, match=rf"^{f}:1: profiles.rack: {re.escape(error)}"):
        Machines.load(f, tmp_path / "state")
