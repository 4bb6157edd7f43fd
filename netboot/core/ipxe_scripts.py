"""Templates from ipxe-scripts/, iPXE scripts and GRUB configurations alike, with @name@ placeholders (iPXE and
GRUB own ${...})."""

from __future__ import annotations

import functools
import re
from importlib.resources import files
from pathlib import Path

_PLACEHOLDER = re.compile(r"@([a-z_]+)@")


def template_dir() -> Path:
    installed = Path(str(files("netboot"))) / "ipxe-scripts"
    return installed if installed.is_dir() else Path(__file__).resolve().parents[2] / "ipxe-scripts"


@functools.cache
def _template(name: str) -> str:
    return (template_dir() / name).read_text()


def render(name: str, **values: str) -> str:
    text = _template(name)

    def substitute(m: re.Match[str]) -> str:
        if m.group(1) not in values:
            raise KeyError(f"template {name} needs a value for @{m.group(1)}@")
        return values[m.group(1)]

    return _PLACEHOLDER.sub(substitute, text)
