"""The output directory: what `netboot build` writes and `netboot serve` reads, the contract between the two."""

from __future__ import annotations

FORMATS = ("squashfs", "erofs", "direct")
IMAGE_FORMATS = ("squashfs", "erofs")  # an image in the initrd, mounted by stage 1
DEFAULT_COMPRESSION = {"squashfs": "zstd", "erofs": "lz4", "direct": "zstd"}
# Where stage 1 (image/stage1-init.sh, which spells it out) finds a machine's overlay, the second initrd the
# server packs; the root filesystem formats put their modules under it too.
STAGE1_PREFIX = "netboot-overlay"

# The architectures a build is for (the manifest's "arch"), and its kernel's file name in each: the name the
# kernel's own build gives it (arch/x86/boot/bzImage, arch/arm64/boot/Image).
ARCHES = ("x86_64", "arm64")
KERNEL_FILES = {"x86_64": "bzImage", "arm64": "Image"}
# A manifest without "arch" was written before builds recorded it, when netboot built for x86_64 alone.
DEFAULT_ARCH = "x86_64"
OTHER_FILES = ("initrd", "cmdline", "netboot.ipxe", "manifest.json")


def files(arch: str) -> tuple[str, ...]:
    """The files of a build for `arch`, the kernel first."""
    return (KERNEL_FILES[arch], *OTHER_FILES)


FILES = files(DEFAULT_ARCH)
# Every name a build's file may have, whatever its architecture.
ANY_FILE = frozenset(KERNEL_FILES.values()) | set(OTHER_FILES)


def arch_of(manifest: object) -> str:
    """The architecture a manifest (parsed JSON) records; ValueError for one this netboot does not know."""
    if not isinstance(manifest, dict):
        raise ValueError("not a JSON object")
    arch = manifest.get("arch", DEFAULT_ARCH)
    if arch not in ARCHES:
        raise ValueError(f"unknown architecture {arch!r} (known: {', '.join(ARCHES)})")
    return arch


# `netboot build --uki`: the unified kernel image (systemd-stub with the kernel, initrd, command line and
# os-release as PE sections), signed when a key is given. Only in builds made with --uki.
UKI = "netboot.efi"

# --fetch: the image (a Nix system's store, or a root filesystem) as a file of its own beside the initrd, which
# then holds stage 1 alone; stage 1 downloads it at boot (image/stage1-init.sh). The kernel command line carries
# its sha256 (from the build's cmdline) and its URL (added by the iPXE script that boots it).
IMAGE = "image"
IMAGE_SHA256 = "netboot.image_sha256"
IMAGE_URL = "netboot.image_url"
