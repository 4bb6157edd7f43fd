"""The output directory: what `netboot build` writes and `netboot serve` reads, the contract between the two."""

from __future__ import annotations

FILES = ("bzImage", "initrd", "cmdline", "netboot.ipxe", "manifest.json")
FORMATS = ("squashfs", "erofs", "direct")
IMAGE_FORMATS = ("squashfs", "erofs")  # an image in the initrd, mounted by stage 1
DEFAULT_COMPRESSION = {"squashfs": "zstd", "erofs": "lz4", "direct": "zstd"}
# Where stage 1 (image/stage1-init.sh, which spells it out) finds a machine's overlay, the second initrd the
# server packs; the root filesystem formats put their modules under it too.
STAGE1_PREFIX = "netboot-overlay"
# --fetch: the image (a Nix system's store, or a root filesystem) as a file of its own beside the initrd, which
# then holds stage 1 alone; stage 1 downloads it at boot (image/stage1-init.sh). The kernel command line carries
# its sha256 (from the build's cmdline) and its URL (added by the iPXE script that boots it).
IMAGE = "image"
IMAGE_SHA256 = "netboot.image_sha256"
IMAGE_URL = "netboot.image_url"
