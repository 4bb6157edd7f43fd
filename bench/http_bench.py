"""HTTP benchmarks: netboot serve against nginx serving the same directory, side by side in one run.

- 20 concurrent downloads of the initrd (curl), total time;
- per-MAC script requests per second and p99 latency with 200 concurrent connections (wrk), against nginx
  serving the static netboot.ipxe of the same directory (the nearest static equivalent).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench" / "data"
MAC = "52-54-00-12-34-56"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port}")


def prepare_out(system: Path) -> Path:
    """An output directory whose initrd is about 200 MB."""
    out = DATA / "http-out"
    if not (out / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "netboot", "build", str(system), "--out", str(out), "--format",
                        "direct", "--compress", "zstd", "--level", "19", "-q"], check=True, cwd=ROOT)
    return out


class Nginx:
    """nginx serving `root` on 127.0.0.1:`port`, its files under bench/data/`name`; `locations` go into its
    server block."""

    def __init__(self, root: Path, port: int, *, name: str = "nginx", locations: str = "",
                 connections: int = 1024) -> None:
        prefix = DATA / name
        self.conf = prefix / "nginx.conf"
        shutil.rmtree(prefix, ignore_errors=True)
        (prefix / "logs").mkdir(parents=True)
        conf = self.conf
        conf.write_text(f"""
worker_processes auto;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log;
events {{ worker_connections {connections}; }}
http {{
    sendfile on;
    tcp_nopush on;
    access_log off;
    keepalive_requests 1000;
    types {{ text/plain ipxe; }}
    default_type application/octet-stream;
    client_body_temp_path {prefix}/tmp;
    proxy_temp_path {prefix}/tmp;
    fastcgi_temp_path {prefix}/tmp;
    uwsgi_temp_path {prefix}/tmp;
    scgi_temp_path {prefix}/tmp;
    server {{ listen 127.0.0.1:{port} backlog=4096; root {root}; {locations} }}
}}
""")
        self.proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(prefix)], stderr=subprocess.DEVNULL)
        wait_port(port)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGQUIT)
        self.proc.wait(timeout=20)


class Netboot:
    def __init__(self, out: Path, port: int, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "netboot", "serve", "--dir", str(out), "--http", f"127.0.0.1:{port}", "--no-tftp",
             *args],
            cwd=ROOT, stderr=subprocess.DEVNULL,
        )
        wait_port(port)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


def rss_mb(pid: int) -> float:
    total = 0
    for p in [pid, *(int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def downloads(url: str, n: int = 20) -> float:
    started = time.monotonic()
    procs = [subprocess.Popen(["curl", "-sf", "-o", "/dev/null", url]) for _ in range(n)]
    if any(p.wait() != 0 for p in procs):
        raise RuntimeError(f"a download of {url} failed")
    return time.monotonic() - started


def wrk(url: str, seconds: int = 10) -> tuple[float, float]:
    """Requests per second and p99 latency (ms) with 200 connections."""
    out = subprocess.run(["wrk", "-t2", "-c200", f"-d{seconds}s", "--latency", url],
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    value, unit = re.search(r"99%\s+([\d.]+)(us|ms|s)", out).groups()
    p99 = float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw errors against {url}:\n{out}")
    return rps, p99


def main(system: Path, runs: int = 3) -> str:
    out = prepare_out(system)
    size = (out / "initrd").stat().st_size
    ours_t, theirs_t, ours_rss = [], [], []
    ours_port, nginx_port = free_port(), free_port()
    nginx, ours = Nginx(out, nginx_port), Netboot(out, ours_port)
    try:
        downloads(f"http://127.0.0.1:{ours_port}/initrd", 2)  # warm the page cache for both
        for _ in range(runs):
            theirs_t.append(downloads(f"http://127.0.0.1:{nginx_port}/initrd"))
            ours_t.append(downloads(f"http://127.0.0.1:{ours_port}/initrd"))
            ours_rss.append(rss_mb(ours.proc.pid))
        script_rps, script_p99 = wrk(f"http://127.0.0.1:{ours_port}/machine/{MAC}/boot.ipxe")
        static_rps, static_p99 = wrk(f"http://127.0.0.1:{nginx_port}/netboot.ipxe")
    finally:
        ours.stop()
        nginx.stop()
    t_ours, t_theirs = statistics.median(ours_t), statistics.median(theirs_t)
    lines = [
        "## HTTP",
        "",
        f"netboot serve (one asyncio process) against nginx (`worker_processes auto`, sendfile on, access log off) "
        f"serving the same directory on loopback. Initrd: {size / 1e6:.0f} MB. Median of {runs} interleaved runs.",
        "",
        "| what | compared against | netboot | nginx | ratio | target |",
        "|---|---|---|---|---|---|",
        f"| 20 concurrent initrd downloads (curl), total time | nginx | {t_ours:.2f} s | {t_theirs:.2f} s "
        f"| **{t_ours / t_theirs:.2f}x** | ≤ 1.5x (aim ≤ 1.1x) |",
        f"| per-MAC script, 200 connections (wrk -t2 -c200 -d10s) | nginx serving the static netboot.ipxe "
        f"| {script_rps:,.0f} req/s, p99 {script_p99:.1f} ms | {static_rps:,.0f} req/s, p99 {static_p99:.1f} ms "
        f"| {script_rps / static_rps:.2f}x req/s | recorded |",
        f"| netboot serve RSS after the downloads | | {max(ours_rss):.0f} MB | | | |",
        "",
        "Commands:",
        "",
        "```",
        f"netboot serve --dir {out} --http 127.0.0.1:PORT --no-tftp",
        f"nginx -c {DATA}/nginx/nginx.conf   # root {out}",
        "for i in $(seq 20); do curl -sf -o /dev/null http://127.0.0.1:PORT/initrd & done; wait",
        f"wrk -t2 -c200 -d10s --latency http://127.0.0.1:PORT/machine/{MAC}/boot.ipxe",
        "wrk -t2 -c200 -d10s --latency http://127.0.0.1:NGINX_PORT/netboot.ipxe",
        "```",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import build

    main(build.bench_system(), int(os.environ.get("BENCH_RUNS", "3")))
