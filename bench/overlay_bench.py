#!/usr/bin/env python3
"""What a machine's overlay costs per request: rendered and packed (cold), and from the cache; against the plain
tools an operator would script, GNU cpio and zstd, packing the same rendered files.

The overlay is a typical one: hostname, hosts, a network unit, an SSH key list, a motd (five templates) and a few
static files, for the small test system's squashfs build (zstd -10). Every machine is a MAC not in the machines
file, on the default profile, so each cold request renders as well as packs.

    python3 bench/overlay_bench.py [--runs 5] [--update]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import build  # noqa: E402
from report import arguments, publish  # noqa: E402

from netboot.core.machines import Machines  # noqa: E402
from netboot.server.namespace import Namespace  # noqa: E402

SECTION = "## Overlays"
MACHINES = 2000

TEMPLATES = {
    "etc/hostname.j2": "{{ hostname or 'node-' ~ mac.replace(':', '') }}\n",
    "etc/hosts.j2": "127.0.0.1 localhost\n{% for n in range(1, 33) %}192.0.2.{{ n }} node{{ n }}.{{ domain }}\n"
                    "{% endfor %}",
    "etc/systemd/network/10-lan.network.j2":
        "[Match]\nMACAddress={{ mac }}\n[Network]\nDHCP=yes\nDomains={{ domain }}\n",
    "etc/ssh/authorized_keys.j2": "{% for k in keys %}{{ k }}\n{% endfor %}",
    "etc/motd.j2": "{{ hostname }} ({{ profile }}) in {{ domain }}: booted over the network\n",
}
STATIC = {"etc/resolv.conf": "nameserver 192.0.2.1\n", "etc/issue": "netboot\n", "usr/local/bin/site": "#!/bin/sh\n"}


def make_fleet(d: Path, out: Path) -> Path:
    for name, text in {**TEMPLATES, **STATIC}.items():
        (d / "overlay" / name).parent.mkdir(parents=True, exist_ok=True)
        (d / "overlay" / name).write_text(text)
    keys = ", ".join(f'"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI{i:040d} admin{i}"' for i in range(8))
    f = d / "machines.toml"
    f.write_text(f'[profiles.default]\ndir = "{out}"\noverlay = "overlay"\n'
                 f'vars = {{ domain = "lab.example", keys = [{keys}] }}\n')
    return f


def mac(n: int) -> str:
    return "02-" + "-".join(f"{b:02x}" for b in n.to_bytes(5, "big"))


def overlay_url(ns: Namespace, n: int) -> str:
    """The machine's script, and in it the URL of its overlay."""
    script = ns.lookup(f"machine/{mac(n)}/boot.ipxe").data
    assert script is not None
    return next(ln.split()[-1] for ln in script.decode().splitlines() if ln.startswith("initrd --name overlay"))


def per_machine(ns: Namespace, macs: range) -> float:
    """Microseconds per machine for its two requests that involve the overlay: the script (where it is
    rendered, to name it or tell what is wrong with it) and the overlay (packed)."""
    started = time.perf_counter()
    for n in macs:
        ns.lookup(overlay_url(ns, n))
    return (time.perf_counter() - started) / len(macs) * 1e6


def cpio_zstd(ns: Namespace, tmp: Path, n: int) -> float:
    """Microseconds to pack one machine's rendered files with `cpio -o -H newc --reproducible | zstd -10`."""
    profile = ns.machines.profiles["default"]
    rendered = ns.overlays.for_machine(mac(n).replace("-", ":"), profile, listed=False)
    root = tmp / "rendered"
    for e in rendered.entries:  # type: ignore[union-attr]
        path = root / e.name
        if e.kind == "dir":
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(e.data)
    names = "\n".join(sorted(str(p.relative_to(root)) for p in root.rglob("*"))) + "\n"
    started = time.perf_counter()
    subprocess.run("cpio -o -H newc --reproducible --quiet | zstd -q -10 > /dev/null", shell=True, cwd=root,
                   input=names.encode(), check=True)
    return (time.perf_counter() - started) * 1e6


def main(argv: list[str] | None = None) -> str:
    p = arguments(__doc__)
    args = p.parse_args(argv)
    out = build.small_out()
    cold, cached, tools, size = [], [], [], 0
    with tempfile.TemporaryDirectory() as tmp:
        machines = make_fleet(Path(tmp), out)
        for run in range(args.runs):
            ns = Namespace(Machines.load(machines), single_dir=False)
            try:
                macs = range(run * MACHINES, (run + 1) * MACHINES)
                cold.append(per_machine(ns, macs))
                cached.append(per_machine(ns, macs))
                assert ns.overlays.packs == MACHINES
                size = len(ns.lookup(overlay_url(ns, macs[0])).data or b"")
                tools.append(statistics.median(cpio_zstd(ns, Path(tmp) / str(run), n) for n in macs[:50]))
            finally:
                ns.close()
            print(f"bench: run {run + 1}: cold {cold[-1]:.0f} µs, cached {cached[-1]:.1f} µs, "
                  f"cpio | zstd {tools[-1]:.0f} µs", file=sys.stderr)
    c, h, t = statistics.median(cold), statistics.median(cached), statistics.median(tools)
    text = "\n".join([
        SECTION, "",
        f"Measured by `python3 bench/overlay_bench.py --runs {args.runs}` on {time.strftime('%Y-%m-%d')}: a "
        f"machine's overlay (5 templates, 3 static files; {size} bytes packed) for the small test system's "
        f"squashfs build (zstd -10), requested for {MACHINES:,} machines not in the machines file, so that each "
        "first request renders as well as packs; then the same again, from the cache. Against it, the plain "
        "tools packing one machine's already rendered files: `cpio -o -H newc --reproducible | zstd -10`. "
        "Rendering runs in the overlays' worker processes (a round trip each) and packing in a thread, as "
        "when serving. Medians of the runs.", "",
        "| per machine (its script and overlay requests) | netboot | cpio \\| zstd (packing only) | ratio |",
        "|---|---:|---:|---:|",
        f"| cold: render and pack | {c:,.0f} µs | {t:,.0f} µs | {c / t:.2f}x |",
        f"| cached | {h:,.1f} µs | | |", "",
    ])
    return publish(SECTION, text, args.update)


if __name__ == "__main__":
    main()
