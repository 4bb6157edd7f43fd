# A small but real system in the layout of a NixOS toplevel, built with Nix from what Debian installed:
# the linux-image kernel and a few of its modules, busybox-static, and a test init.
#   nix-build tests/system --option sandbox false --argstr kernelVersion "$(uname -r)"
# Builders are /bin/sh scripts run without a sandbox; host files are hashed into the derivations so a
# changed host file makes new store paths. arm64.nix makes the same system from Debian's arm64 packages.
{ kernelVersion
, kernelImage ? "/boot/vmlinuz-${kernelVersion}"
, kernelFile ? "bzImage"  # its name in the kernel's store path, as the kernel's build names it
, hostModules ? "/lib/modules/${kernelVersion}"
, busyboxBin ? "/bin/busybox"
  # What lists busybox's applets (`--list`): busybox itself, unless it is for another architecture than the
  # host's, which cannot run it; then the host's busybox-static of the same Debian version.
, appletLister ? null
, console ? "ttyS0,115200"
  # The architecture's own modules besides the generic ones (crc32c, which erofs needs, and its fast variant).
, archModules ? [ "kernel/crypto/crc32c_generic.ko" "kernel/arch/x86/crypto/crc32c-intel.ko" ]
  # Extra host directories, each copied into a store path of its own (benchmarks use this for bulk).
, payload ? [ ]
  # Bytes of random (incompressible) data in a store path of their own; the init checks their size, not their
  # sha256 (which stage 1 of --fetch checked for the whole image already).
, randomBytes ? 0
  # How the selected modules are stored: "none", "xz" or "zst" (the kernel's own choices).
, moduleCompression ? "none"
, name ? "netboot-test"
}:
let
  system = builtins.currentSystem;
  mk = name: env: script: derivation ({
    inherit name system;
    builder = "/bin/sh";
    args = [ "-ec" script ];
    PATH = "/usr/sbin:/usr/bin:/sbin:/bin";
  } // env);

  busybox = mk "busybox-static-1.35" { hash = builtins.hashFile "sha256" busyboxBin; } ''
    mkdir -p $out/bin
    cp ${busyboxBin} $out/bin/busybox
    for applet in $(${if appletLister == null then "$out/bin/busybox" else appletLister} --list); do [ -e $out/bin/$applet ] || ln -s busybox $out/bin/$applet; done
  '';

  kernel = mk "linux-${kernelVersion}" { hash = builtins.hashFile "sha256" kernelImage; } ''
    mkdir -p $out
    cp ${kernelImage} $out/${kernelFile}
  '';

  # What the squashfs and erofs formats need (loop, squashfs, erofs and its soft dependency crc32c, overlay),
  # a module with a chain of dependencies, and network drivers for --fetch (virtio's and an Intel card's, with
  # virtio_pci, the bus virtio's sits on).
  modules = mk "linux-${kernelVersion}-modules" {
    hash = builtins.hashFile "sha256" "${hostModules}/modules.dep";
    inherit moduleCompression;
  } ''
    src=${hostModules}
    dst=$out/lib/modules/${kernelVersion}
    mkdir -p $dst
    for m in kernel/drivers/block/loop.ko kernel/fs/squashfs/squashfs.ko kernel/fs/overlayfs/overlay.ko \
             kernel/fs/isofs/isofs.ko \
             $(grep '^kernel/drivers/target/loopback/tcm_loop.ko:' $src/modules.dep | tr -d :) \
             $(grep '^kernel/fs/erofs/erofs.ko:' $src/modules.dep | tr -d :) \
             $(grep -E '^kernel/drivers/(net/virtio_net|virtio/virtio_pci|net/ethernet/intel/e1000/e1000).ko:' \
                 $src/modules.dep | tr -d :) \
             ${toString archModules}; do
      mkdir -p $dst/$(dirname $m)
      case $moduleCompression in
        xz) xz --check=crc32 -c $src/$m > $dst/$m.xz ;;
        zst) zstd -q -c $src/$m > $dst/$m.zst ;;
        mixed) case $m in  # both kinds in one tree: loop .zst; squashfs, overlay, erofs .xz
                 */squashfs.ko|*/overlay.ko|*/erofs.ko) xz --check=crc32 -c $src/$m > $dst/$m.xz ;;
                 *) zstd -q -c $src/$m > $dst/$m.zst ;;
               esac ;;
        *) cp $src/$m $dst/$m ;;
      esac
    done
    cp $src/modules.builtin $src/modules.builtin.modinfo $src/modules.order $dst/
    depmod -b $out ${kernelVersion}
  '';

  testInit = mk "netboot-test-init" { } ''
    mkdir -p $out/bin
    cat > $out/bin/init <<EOF
    #!${busybox}/bin/sh
    # The system's init: checks the store it was booted with, prints a marker, powers off.
    top=\$1
    export PATH=${busybox}/bin
    [ -e /proc/self ] || mount -t proc proc /proc
    [ -e /sys/kernel ] || mount -t sysfs sysfs /sys
    echo "NETBOOT-TEST: init reached: \$0"
    echo "NETBOOT-TEST: cmdline: \$(cat /proc/cmdline)"
    echo "NETBOOT-TEST: store mount: \$(grep ' /nix/store ' /proc/mounts || echo none)"
    echo "NETBOOT-TEST: lockdown: \$(mount -t securityfs securityfs /sys/kernel/security 2>/dev/null; cat /sys/kernel/security/lockdown 2>/dev/null || echo unknown)"
    echo "NETBOOT-TEST: hostname: \$(cat /etc/hostname 2>/dev/null || echo none)"
    echo "NETBOOT-TEST: machine: \$(uname -m)"
    ok=1
    n=0
    [ -s "\$top/closure-paths" ] || { echo "NETBOOT-TEST: no closure list"; ok=0; }
    for p in \$(cat \$top/closure-paths); do
      n=\$((n + 1))
      [ -e "\$p" ] || [ -L "\$p" ] || { echo "NETBOOT-TEST: missing \$p"; ok=0; }
      grep -q "^\$p\\\$" /nix/store/nix-path-registration || { echo "NETBOOT-TEST: not registered \$p"; ok=0; }
    done
    checked=\$(cd / && sha256sum -c \$top/closure-files.sha256 | grep -c ': OK\$')
    [ "\$checked" = "\$(wc -l < \$top/closure-files.sha256)" ] || { echo "NETBOOT-TEST: content differs"; ok=0; }
    if touch /nix/store/.netboot-write-test && rm /nix/store/.netboot-write-test; then
      echo "NETBOOT-TEST: store writable"
    else
      echo "NETBOOT-TEST: store not writable"; ok=0
    fi
    while read -r f size; do
      [ "\$(stat -c %s "\$f")" = "\$size" ] || { echo "NETBOOT-TEST: size differs \$f"; ok=0; }
    done < \$top/closure-bulk
    [ \$ok = 1 ] && echo "NETBOOT-TEST-OK paths=\$n files=\$checked"
    poweroff -f
    EOF
    chmod 555 $out/bin/init
  '';

  # Store paths of the other shapes a closure holds: a lone file, a lone symlink, hard links.
  motd = builtins.toFile "netboot-test-motd" "booted over the network\n";
  motdLink = mk "netboot-test-motd-link" { } "ln -s ${motd} $out";
  hardlinks = mk "netboot-test-hardlinks" { } ''
    mkdir -p $out/share
    echo "one inode, two names" > $out/share/a
    ln $out/share/a $out/share/b
    printf 'odd name\n' > "$out/share/with space"
    mkdir -p $out/share/empty-dir
  '';

  payloadPaths = builtins.genList (i:
    let src = builtins.elemAt payload i; in
    mk "netboot-payload-${toString i}-${baseNameOf src}" { inherit src; } "cp -r $src $out"
  ) (builtins.length payload);

  random = mk "netboot-random" { inherit randomBytes; } ''
    mkdir -p $out
    head -c $randomBytes /dev/urandom > $out/data
  '';
  bulk = if randomBytes > 0 then [ random ] else [ ];

  checked = [ busybox kernel modules testInit motd motdLink hardlinks ] ++ payloadPaths;
  deps = checked ++ bulk;
in
mk "nixos-system-${name}-${kernelVersion}" { } ''
  mkdir -p $out
  ln -s ${kernel}/${kernelFile} $out/kernel
  ln -s ${modules} $out/kernel-modules
  echo "console=${console} panic=-1 loglevel=4" > $out/kernel-params
  ln -s ${motdLink} $out/motd
  ln -s ${hardlinks} $out/hardlinks
  ${builtins.concatStringsSep "\n" (map (p: "ln -s ${p} $out/payload-$(basename ${p})") payloadPaths)}
  ${builtins.concatStringsSep "\n" (map (p: "ln -s ${p} $out/random") bulk)}
  cat > $out/init <<EOF
  #!${busybox}/bin/sh
  exec ${testInit}/bin/init $out
  EOF
  chmod 555 $out/init
  for p in ${toString deps} $out; do echo $p; done > $out/closure-paths
  (cd / && find ${toString checked} -type f | sort | xargs -d '\n' sha256sum) > $out/closure-files.sha256
  for p in ${toString bulk}; do find $p -type f -printf '%p %s\n'; done > $out/closure-bulk
''
