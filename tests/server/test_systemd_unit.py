"""contrib/netboot.service: systemd's own checks of the unit (syntax, directives, sandboxing)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from support import ROOT, need

UNIT = ROOT / "contrib" / "netboot.service"


def installed_copy(tmp_path: Path) -> Path:
    """The unit as installed here: ExecStart names this checkout's netboot (systemd checks it exists)."""
    netboot = Path(sys.executable).parent / "netboot"
    assert netboot.exists(), f"{netboot}: the package's command is not installed (make venv)"
    copy = tmp_path / "netboot.service"
    copy.write_text(UNIT.read_text().replace("/usr/local/bin/netboot", str(netboot)))
    return copy


def test_the_unit_verifies_without_warnings(tmp_path: Path) -> None:
    need("systemd-analyze")
    unit = installed_copy(tmp_path)
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
    text = UNIT.read_text()
    assert "ExecReload=/bin/kill -HUP $MAINPID" in text and "StateDirectory=netboot" in text


def test_the_unit_is_sandboxed(tmp_path: Path) -> None:
    need("systemd-analyze")
    unit = installed_copy(tmp_path)
    proc = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    found = re.search(r"Overall exposure level for netboot.service: ([\d.]+) (\w+)", proc.stdout)
    assert found, proc.stdout + proc.stderr
    # systemd's scale: 0 (sandboxed) to 10 (exposed); below 2 is "OK".
    assert float(found.group(1)) < 2.0, proc.stdout
