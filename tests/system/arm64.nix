# The test system of default.nix for arm64, built on any host from Debian's arm64 kernel, modules and
# busybox-static unpacked into debRoot (tests/system/arm64-packages): nothing of arm64 runs while it is built.
{ debRoot, kernelVersion, ... }@args:
import ./default.nix ({
  kernelImage = "${debRoot}/boot/vmlinuz-${kernelVersion}";  # an uncompressed Image with an EFI stub
  kernelFile = "Image";
  hostModules = "${debRoot}/lib/modules/${kernelVersion}";
  busyboxBin = "${debRoot}/bin/busybox";
  appletLister = "/bin/busybox";  # the host's busybox-static, of the same Debian version
  console = "ttyAMA0";  # the PL011 UART of QEMU's virt board and of most arm64 servers
  archModules = [ "kernel/crypto/crc32c_generic.ko" ];
} // removeAttrs args [ "debRoot" ])
