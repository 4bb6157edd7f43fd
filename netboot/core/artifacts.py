"""The output directory: what `netboot build` writes and `netboot serve` reads, the contract between the two."""

from __future__ import annotations

FILES = ("bzImage", "initrd", "cmdline", "netboot.ipxe", "manifest.json")
FORMATS = ("squashfs", "erofs", "direct")
IMAGE_FORMATS = ("squashfs", "erofs")  # an image in the initrd, mounted by stage 1
DEFAULT_COMPRESSION = {"squashfs": "zstd", "erofs": "lz4", "direct": "zstd"}
# Where stage 1 (image/stage1-init.sh, which spells it out) finds a machine's overlay, the second initrd the
# server packs; the root filesystem formats put their modules under it too.
STAGE1_PREFIX = "netboot-overlay"
# `netboot build --uki`: the unified kernel image (systemd-stub with the kernel, initrd, command line and
# os-release as PE sections), signed when a key is given. Only in builds made with --uki.
UKI = "netboot.efi"
