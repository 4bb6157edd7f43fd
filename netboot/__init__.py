"""netboot: boot machines over the network from a built system."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("netboot")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"
