"""make install: netboot from the checkout (not editable) in a virtual environment of its own, its command linked
where contrib/netboot.service runs it."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from support import ROOT, need

from netboot import __version__

UNIT = ROOT / "contrib" / "netboot.service"


def make_variable(name: str, *overrides: str) -> str:
    """A variable of the Makefile as make expands it."""
    proc = subprocess.run([need("make"), "-s", "--no-print-directory", "-f", "Makefile", "-f", "-", *overrides,
                           "print"], input=f"print:\n\t@echo $({name})\n", cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_the_units_execstart_runs_the_command_make_install_links() -> None:
    execstart = re.search(r"^ExecStart=(\S+) serve ", UNIT.read_text(), re.MULTILINE)
    assert execstart, "contrib/netboot.service: no ExecStart=... serve"
    assert execstart.group(1) == make_variable("INSTALL_BIN") + "/netboot" == "/usr/local/bin/netboot"


@pytest.mark.slow
def test_make_install_into_a_prefix_gives_a_netboot_that_runs(tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    # Real pip: the wheel built from this checkout, its dependencies from PyPI; the Debian packages make install
    # needs are among the suite's, so it installs none here.
    proc = subprocess.run([need("make"), "-s", "--no-print-directory", "install", f"PREFIX={prefix}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, env={**os.environ, "MAKEFLAGS": ""})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    command = prefix / "bin" / "netboot"
    assert command.is_symlink() and command.resolve().is_relative_to(prefix / "lib" / "netboot"), command
    version = subprocess.run([command, "--version"], capture_output=True, text=True, timeout=60)
    assert (version.returncode, version.stdout.strip()) == (0, f"netboot {__version__}"), version.stderr
    # Not editable: the package is the environment's own copy, not this checkout's.
    where = subprocess.run([command.resolve().parent / "python", "-c",
                            "import netboot, netboot.tftp._lockstep as c; print(netboot.__file__, c.__file__)"],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)  # not beside the checkout
    assert where.returncode == 0, where.stderr
    package, native = (Path(p) for p in where.stdout.split())
    assert package.is_relative_to(prefix) and native.is_relative_to(prefix), where.stdout
    # The command works beyond --version: serve refuses a missing machines file in one line.
    served = subprocess.run([command, "serve", "--machines", tmp_path / "none.toml", "--no-tftp"],
                            capture_output=True, text=True, timeout=60)
    assert served.returncode == 2 and served.stderr.count("\n") == 1 and "none.toml" in served.stderr, served.stderr
    uninstalled = subprocess.run([need("make"), "-s", "uninstall", f"PREFIX={prefix}"], cwd=ROOT,
                                 capture_output=True, text=True, timeout=60)
    assert uninstalled.returncode == 0 and not command.exists() and not (prefix / "lib" / "netboot").exists()
