#!/bin/busybox sh
# netboot stage 1: mount the image read-only under a writable overlay, then start init=. A store image as
# NixOS netboot does (/ tmpfs, /nix/.ro-store the image, /nix/.rw-store tmpfs, /nix/store overlay); a root
# image as the root (overlay of the image and a tmpfs).
/bin/busybox mkdir -p /proc /sys /dev /mnt-root
/bin/busybox --install -s /bin
export PATH=/bin

# A rescue shell on the console, then on with the boot. Its input is the console whatever the caller's is (the
# module loop reads the module list on stdin); setsid and cttyhack make the console's real terminal its
# controlling one, so Ctrl-C reaches what it runs. Never exec'd: PID 1 exiting would panic the kernel.
fail() {
    echo "netboot stage 1: $*" >&2
    echo "netboot stage 1: the system cannot start; here is a shell (exit it to go on with the boot)" >&2
    if [ -x /bin/cttyhack ] && [ -x /bin/setsid ]; then
        setsid cttyhack sh </dev/console >/dev/console 2>&1
    else
        sh </dev/console >/dev/console 2>&1
    fi
}

mount -t proc proc /proc || fail "cannot mount /proc"
mount -t sysfs sysfs /sys || fail "cannot mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "cannot mount /dev"

# One module a line, dependencies first; "optional" ones are soft dependencies, which may refuse this machine.
while read -r module optional; do
    if [ "$module" = optional ]; then
        insmod "/$optional" 2>/dev/null || echo "netboot stage 1: optional module /$optional not loaded"
    else
        insmod "/$module" || fail "cannot load module /$module"
    fi
done < /etc/netboot-modules

init=
for arg in $(cat /proc/cmdline); do
    case "$arg" in init=*) init=${arg#init=} ;; esac
done
[ -n "$init" ] || fail "no init= on the kernel command line"

# The image: the store (a Nix system's) or the whole root (any other system), squashfs or erofs.
for image in /nix-store.squashfs /nix-store.erofs /root.squashfs /root.erofs; do
    [ -e "$image" ] && break
done
[ -e "$image" ] || fail "no image in the initrd"
fstype=${image##*.}

case "$image" in
/nix-store.*)
    # A fresh tmpfs root rather than the initramfs itself: rootfs cannot be pivot_root'ed, which
    # breaks Nix's build sandbox on the booted system.
    mount -t tmpfs -o mode=0755 root /mnt-root || fail "cannot mount the root tmpfs"
    mkdir -p /mnt-root/nix/.ro-store /mnt-root/nix/.rw-store /mnt-root/nix/store
    mount -t "$fstype" -o loop,ro "$image" /mnt-root/nix/.ro-store || fail "cannot mount the store image"
    mount -t tmpfs -o mode=0755 rw-store /mnt-root/nix/.rw-store || fail "cannot mount /nix/.rw-store"
    mkdir -p /mnt-root/nix/.rw-store/store /mnt-root/nix/.rw-store/work
    mount -t overlay -o lowerdir=/mnt-root/nix/.ro-store,upperdir=/mnt-root/nix/.rw-store/store,workdir=/mnt-root/nix/.rw-store/work \
        overlay /mnt-root/nix/store || fail "cannot mount the overlay on /nix/store"
    ;;
*)
    # The root itself: the image read-only under a tmpfs that takes the writes.
    mkdir -p /run/netboot/image /run/netboot/rw
    mount -t "$fstype" -o loop,ro "$image" /run/netboot/image || fail "cannot mount the root image"
    mount -t tmpfs -o mode=0755 rw /run/netboot/rw || fail "cannot mount the root's tmpfs"
    mkdir -p /run/netboot/rw/root /run/netboot/rw/work
    mount -t overlay -o lowerdir=/run/netboot/image,upperdir=/run/netboot/rw/root,workdir=/run/netboot/rw/work \
        overlay /mnt-root || fail "cannot mount the overlay on the root"
    ;;
esac
[ -e "/mnt-root$init" ] || [ -L "/mnt-root$init" ] || fail "init $init is not in the image"
# A machine's overlay (netboot serve, a second initrd) arrives under /netboot-overlay: its files win.
if [ -d /netboot-overlay ]; then
    cp -a /netboot-overlay/. /mnt-root/ || fail "cannot copy the overlay into the root"
fi

for fs in dev proc sys; do
    mkdir -p "/mnt-root/$fs"
    mount --move "/$fs" "/mnt-root/$fs" || fail "cannot move /$fs"
done
echo "netboot stage 1: starting $init"
exec switch_root /mnt-root "$init"
