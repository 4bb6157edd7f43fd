"""Profiles that name a system rather than a built directory: `system = "/nix/var/nix/profiles/rack"` (a Nix
profile, or any symlink chain or store path). `netboot serve` builds them itself, into its state directory:

    STATE/builds/<key>      one `netboot build` output per (store path, build options), with the build cache
    STATE/profiles/<name>   a symlink to the build the profile serves now: the profile's output directory

At start, a profile whose current system has no build yet is built before serving (a failure stops netboot,
unless an earlier build is there to serve). Then every poll resolves each profile's system again; when it
points somewhere new (`nix-env --set`, a new generation, `nix-env --rollback`), that system is built in the
background while machines keep getting the previous build, and the profile's symlink is swapped to the new one
when it is complete: the namespace then serves it to new requests and keeps the old one for the grace period.
A failed build is logged and the previous build stays; that system is not tried again until the profile moves.
The builds of the last few systems stay on disk, so a rollback to one of them is a symlink swap.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from netboot.core.errors import NetbootError
from netboot.core.machines import Machines, Profile
from netboot.core.remove import remove_tree

log = logging.getLogger("netboot.serve")

KEEP = 3  # builds kept on disk beyond those the profiles serve, most recently used first
STORE = Path("/nix/store")


def resolve(profile: Profile) -> Path:
    """The store path a profile's system points to now."""
    assert profile.system is not None
    target = Path(os.path.realpath(profile.system))
    if not target.is_relative_to(STORE) or target == STORE:
        raise NetbootError(f"profile {profile.name}: system {profile.system} is not in the Nix store "
                           f"(it resolves to {target})")
    if not target.is_dir():
        raise NetbootError(f"profile {profile.name}: system {profile.system} ({target}) is not a directory")
    return Path(STORE, target.relative_to(STORE).parts[0])


class SystemBuilds:
    def __init__(self, state_dir: Path, switched: Callable[[], None] = lambda: None) -> None:
        """`switched` runs after a background build was put in place (to serve it at once)."""
        self.state_dir = state_dir
        self.switched = switched
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._failed: dict[str, Path] = {}  # profile -> the system whose build failed (not tried again)

    def link(self, name: str) -> Path:
        return self.state_dir / "profiles" / name

    def _build_dir(self, profile: Profile, system: Path) -> Path:
        key = hashlib.sha256("\0".join([str(system), *profile.build_args]).encode()).hexdigest()[:32]
        return self.state_dir / "builds" / key

    def _argv(self, profile: Profile, system: Path, out: Path) -> list[str]:
        """The build's command (its output's parent made first: netboot build wants one)."""
        out.parent.mkdir(parents=True, exist_ok=True)
        return [sys.executable, "-m", "netboot", "build", str(system), "--out", str(out), "-q", *profile.build_args]

    def serving(self, name: str) -> Path | None:
        """The build a profile's symlink points to."""
        try:
            return Path(os.readlink(self.link(name)))
        except OSError:
            return None

    def prepare(self, machines: Machines) -> None:
        """At start: every system profile has a build to serve (built now if needed)."""
        for profile in machines.profiles.values():
            if profile.system is None:
                continue
            system = resolve(profile)
            out = self._build_dir(profile, system)
            if not (out / "manifest.json").is_file():
                log.info("profile %s: building %s", profile.name, system)
                done = subprocess.run(self._argv(profile, system, out), capture_output=True, text=True,
                                      check=False)
                if done.returncode != 0:
                    why = _last_line(done.stderr)
                    if self.serving(profile.name) is None:
                        raise NetbootError(f"profile {profile.name}: building {system} failed: {why}")
                    log.error("profile %s: building %s failed, serving the previous build: %s", profile.name,
                              system, why)
                    self._failed[profile.name] = system
                    continue
            self._switch(profile.name, out)

    def poll(self, machines: Machines) -> None:
        """Start a background build for each system profile whose system moved."""
        for profile in machines.profiles.values():
            if profile.system is None or profile.name in self._tasks:
                continue
            try:
                system = resolve(profile)
            except NetbootError as e:
                if self._failed.get(profile.name) != profile.system:
                    log.error("%s; serving the previous build", e)
                    self._failed[profile.name] = profile.system
                continue
            out = self._build_dir(profile, system)
            if self.serving(profile.name) == out or self._failed.get(profile.name) == system:
                continue
            self._tasks[profile.name] = asyncio.get_running_loop().create_task(self._build(profile, system, out))

    async def _build(self, profile: Profile, system: Path, out: Path) -> None:
        try:
            if not (out / "manifest.json").is_file():
                log.info("profile %s: %s is new; building it, serving the previous build meanwhile",
                         profile.name, system)
                proc = await asyncio.create_subprocess_exec(*self._argv(profile, system, out),
                                                            stdout=asyncio.subprocess.DEVNULL,
                                                            stderr=asyncio.subprocess.PIPE)
                try:
                    _, err = await proc.communicate()
                except BaseException:
                    proc.kill()
                    await proc.wait()
                    raise
                if proc.returncode != 0:
                    log.error("profile %s: building %s failed, serving the previous build: %s", profile.name,
                              system, _last_line(err.decode(errors="replace")))
                    self._failed[profile.name] = system
                    return
            self._failed.pop(profile.name, None)
            self._switch(profile.name, out)
            log.info("profile %s: switched to %s", profile.name, system)
            self.switched()
            self._prune()
        finally:
            del self._tasks[profile.name]

    def _switch(self, name: str, out: Path) -> None:
        """Point the profile's symlink at `out`, in one step."""
        link = self.link(name)
        link.parent.mkdir(parents=True, exist_ok=True)
        if self.serving(name) == out:
            return
        tmp = link.with_name(f".{name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        os.symlink(out, tmp)
        os.replace(tmp, link)
        os.utime(out)  # most recently used: kept longest

    def _prune(self) -> None:
        """Remove builds no profile serves, beyond the KEEP most recently used."""
        serving = {self.serving(p.name) for p in (self.state_dir / "profiles").iterdir()}
        builds = sorted((p for p in (self.state_dir / "builds").iterdir() if p not in serving and p.is_dir()),
                        key=lambda p: p.stat().st_mtime, reverse=True)
        for old in builds[KEEP:]:
            with contextlib.suppress(OSError):  # tried again at the next prune
                remove_tree(old)

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].removeprefix("netboot: error: ") if lines else "no message"
