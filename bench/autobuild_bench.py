#!/usr/bin/env python3
"""How soon a Nix profile's new system is served: `netboot serve` with a profile on `system = PROFILE`, the ~1 GB
benchmark closure; the time from `nix-env --set` (to the same system under another name: a new toplevel over
the same store paths, as a configuration change makes) to the first script that names it, and from
`nix-env --rollback` to the first script naming the previous one. Against it, by hand: `netboot build` of the
new system with a build cache that holds the previous one, which is the least an operator's own script waits.

    python3 bench/autobuild_bench.py [--runs 1] [--update]
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import build  # noqa: E402
import http_bench  # noqa: E402
from report import arguments, publish  # noqa: E402

SECTION = "## Systems from a Nix profile"
MAC = "52-54-00-00-0f-01"


def next_system() -> Path:
    """The benchmark system again under another name: a new toplevel, every other store path shared."""
    payload = [p for p in build.PAYLOAD_CANDIDATES if os.path.isdir(p)]
    out = subprocess.run([build.ROOT / "tests/system/build", build.DATA / "system-next", "--arg", "payload",
                          "[ " + " ".join(payload) + " ]", "--argstr", "name", "bench-next"],
                         check=True, capture_output=True, text=True).stdout
    return Path(out.strip().splitlines()[-1])


def names(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/machine/{MAC}/boot.ipxe", timeout=30) as r:
        m = re.search(r"boots profile rack, (\S+)\.$", r.read().decode(), re.M)
    assert m
    return m.group(1)


def until_served(port: int, system: Path, timeout: float = 1800) -> float:
    started = time.monotonic()
    while names(port) != str(system):
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"{system} was not served within {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - started


def nix_env(profile: Path, *args: str | Path) -> None:
    subprocess.run(["nix-env", "-p", profile, *args], check=True, capture_output=True)


def main(argv: list[str] | None = None) -> str:
    args = arguments(__doc__, runs=1).parse_args(argv)
    first, second = build.bench_system(), next_system()
    closure = build.closure_of(second)
    files, size = build.closure_stats(closure)
    served, rolled, by_hand = [], [], []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(dir=build.DATA) as tmp:
            d = Path(tmp)
            env = {**os.environ, "XDG_CACHE_HOME": str(d / "cache-by-hand")}
            netboot = [sys.executable, "-m", "netboot", "build", "-q", "--format", "direct"]
            subprocess.run([*netboot, first, "--out", d / "by-hand-first"], check=True, env=env, cwd=build.ROOT)
            started = time.monotonic()
            subprocess.run([*netboot, second, "--out", d / "by-hand-next"], check=True, env=env, cwd=build.ROOT)
            by_hand.append(time.monotonic() - started)

            profile = d / "rack"
            nix_env(profile, "--set", first)
            (d / "machines.toml").write_text(f'[profiles.rack]\nsystem = "{profile}"\nformat = "direct"\n'
                                             f'[machines."{MAC}"]\nprofile = "rack"\n')
            port = http_bench.free_port()
            server = subprocess.Popen(
                [sys.executable, "-m", "netboot", "serve", "--machines", d / "machines.toml", "--state-dir",
                 d / "state", "--http", f"127.0.0.1:{port}", "--no-tftp", "--status", "none", "-q"],
                cwd=build.ROOT, env={**os.environ, "XDG_CACHE_HOME": str(d / "cache-serve")})
            try:
                http_bench.wait_port(port, timeout=1800)
                nix_env(profile, "--set", second)
                served.append(until_served(port, second))
                nix_env(profile, "--rollback")
                rolled.append(until_served(port, first))
            finally:
                server.terminate()
                server.wait(timeout=60)
        print(f"bench: run {run + 1}: served after {served[-1]:.1f} s, rollback {rolled[-1]:.2f} s, "
              f"by hand {by_hand[-1]:.1f} s", file=sys.stderr)
    s, r, h = statistics.median(served), statistics.median(rolled), statistics.median(by_hand)
    text = "\n".join([
        SECTION, "",
        f"Measured by `python3 bench/autobuild_bench.py --runs {args.runs}` on {time.strftime('%Y-%m-%d')}: a "
        f"profile with `system = PROFILE` (direct format) on the benchmark closure ({len(closure)} store paths, "
        f"{files:,} files, {size / 1e9:.2f} GB), then `nix-env --set` to the same system under another name "
        "(a new toplevel over the same store paths) and `nix-env --rollback`; each time until the first script "
        "that names the system. "
        "By hand: `netboot build` of the new system with a build cache that holds the previous one.", "",
        "| | netboot serve | by hand | ratio |", "|---|---:|---:|---:|",
        f"| `nix-env --set` to the new system served | {s:.1f} s | {h:.1f} s (its build alone) | {s / h:.2f}x |",
        f"| `nix-env --rollback` to the previous system served | {r:.2f} s | | |", "",
    ])
    return publish(SECTION, text, args.update)


if __name__ == "__main__":
    main()
