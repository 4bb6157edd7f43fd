"""Build hook: compiles netboot/tftp/_lockstep.c, the TFTP worker's lock-step loop, into the package.

A plain C compiler call (no setuptools): one source file, no libraries. Without a compiler or the Python
headers the package still installs and works, its TFTP workers in Python alone (slower under load); the
hook says so. Editable installs get the module next to its source, where the package imports it from.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sysconfig
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SOURCE = Path("netboot/tftp/_lockstep.c")


class CustomBuildHook(BuildHookInterface):
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        root = Path(self.root)
        target = SOURCE.with_name("_lockstep" + sysconfig.get_config_var("EXT_SUFFIX"))
        compiler = shlex.split(os.environ.get("CC") or "cc")
        argv = [*compiler, "-O2", "-Wall", "-shared", "-fPIC", f"-I{sysconfig.get_paths()['include']}",
                str(root / SOURCE), "-o", str(root / target), "-lm"]
        try:
            subprocess.run(argv, check=True)
        except (OSError, subprocess.CalledProcessError) as e:
            print(f"netboot: not compiling {SOURCE} ({e}); TFTP workers will run in Python alone")
            return
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        if version != "editable":
            build_data["force_include"][str(root / target)] = str(target)
