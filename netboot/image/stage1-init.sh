#!/bin/busybox sh
# netboot stage 1: mount the image read-only under a writable overlay, then start init=. A store image as
# NixOS netboot does (/ tmpfs, /nix/.ro-store the image, /nix/.rw-store tmpfs, /nix/store overlay); a root
# image as the root (overlay of the image and a tmpfs). The image is in the initrd, or (netboot build --fetch)
# downloaded over HTTP into memory and checked against the sha256 on the kernel command line.
/bin/busybox mkdir -p /proc /sys /dev /mnt-root
/bin/busybox --install -s /bin
export PATH=/bin

say() {
    echo "netboot stage 1: $*"
}

# A rescue shell on the console, then on with the boot. Its input is the console whatever the caller's is (the
# module loop reads the module list on stdin); setsid and cttyhack make the console's real terminal its
# controlling one, so Ctrl-C reaches what it runs. Never exec'd: PID 1 exiting would panic the kernel.
fail() {
    say "$*" >&2
    say "the system cannot start; here is a shell (exit it to go on with the boot)" >&2
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
        insmod "/$optional" 2>/dev/null || say "optional module /$optional not loaded"
    else
        insmod "/$module" || fail "cannot load module /$module"
    fi
done < /etc/netboot-modules

init= sha256= url= bootif= ipconf= ip6= gateway6= dns6= tries=5 streams=
set -f  # the command line's words are not file name patterns
for arg in $(cat /proc/cmdline); do
    case "$arg" in
    init=*) init=${arg#init=} ;;
    netboot.image_sha256=*) sha256=${arg#*=} ;;
    netboot.image_url=*) url=${arg#*=} ;;
    netboot.fetch_tries=*) tries=${arg#*=} ;;
    netboot.fetch_streams=*) streams=${arg#*=} ;;
    BOOTIF=*) bootif=${arg#BOOTIF=} ;;
    ip=*) ipconf=${arg#ip=} ;;
    netboot.ip6=*) ip6=${arg#*=} ;;
    netboot.gateway6=*) gateway6=${arg#*=} ;;
    netboot.dns6=*) dns6=${arg#*=} ;;
    esac
done
set +f
[ -n "$init" ] || fail "no init= on the kernel command line"

# Hundredths of a second since boot (/proc/uptime has two decimals), for the download's timings.
centis() {
    local up _
    read -r up _ < /proc/uptime
    echo "${up%.*}${up#*.}"
}

# Hundredths as seconds with one decimal.
seconds() {
    echo "$(($1 / 100)).$(($1 / 10 % 10))"
}

# The network drivers of this machine's cards, by modalias, as udev's coldplug would load them: stage 1 carries
# the kernel's wired network drivers with a modules.alias of their own. Three rounds, since a bus driver
# (virtio_pci) makes the devices the next round finds.
load_network_drivers() {
    local round
    for round in 1 2 3; do
        modprobe -q -a $(cat /sys/bus/*/devices/*/modalias 2>/dev/null) 2>/dev/null
    done
}

# The interfaces to try: the one that booted (BOOTIF=01-<MAC>, as the iPXE script passes it) or, without it,
# every one but lo; waits up to 10 seconds for the driver to make it.
find_interfaces() {
    local mac= waited=0 dev
    [ -z "$bootif" ] || mac=$(echo "${bootif#01-}" | tr 'ABCDEF-' 'abcdef:')
    while :; do
        interfaces=
        for dev in /sys/class/net/*; do
            if [ "${dev##*/}" = lo ] || [ ! -e "$dev/address" ]; then
                continue
            fi
            if [ -z "$mac" ] || [ "$(cat "$dev/address")" = "$mac" ]; then
                interfaces="$interfaces ${dev##*/}"
            fi
        done
        [ -z "$interfaces" ] || return 0
        [ $waited -lt 10 ] || break
        sleep 1
        waited=$((waited + 1))
    done
    if [ -n "$mac" ]; then
        say "no network interface with the MAC address that booted, $mac (no driver here for its card?)"
    else
        say "no network interface (no driver here for this machine's network card?)"
    fi
    return 1
}

# Up to 10 seconds for the link (a real card negotiates for a second or more after it is brought up).
wait_for_carrier() {
    local waited=0
    while [ "$(cat "/sys/class/net/$1/carrier" 2>/dev/null)" != 1 ] && [ $waited -lt 50 ]; do
        sleep 0.2
        waited=$((waited + 1))
    done
}

# udhcpc's script: the lease's address, default route and DNS servers.
write_dhcp_script() {
    mkdir -p /run/netboot
    cat > /run/netboot/udhcpc <<'SCRIPT'
#!/bin/sh
case "$1" in
deconfig)
    ip addr flush dev "$interface"
    ip link set "$interface" up
    ;;
bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    for gateway in $router; do
        ip route add default via "$gateway" dev "$interface" && break
    done
    for server in $dns; do echo "nameserver $server"; done > /etc/resolv.conf
    ;;
esac
SCRIPT
    chmod 755 /run/netboot/udhcpc
}

# An IPv6 address of $1 that is not link-local and has passed duplicate address detection, if any.
global_ipv6() {
    ip -6 -o addr show dev "$1" scope global 2>/dev/null | awk '!/tentative/ { print $4; exit }'
}

# IPv6 from what iPXE knew (netboot.ip6=ADDR/LEN, netboot.gateway6=ROUTER, netboot.dns6=SERVER; LEN missing when no
# advertisement named the prefix: the address alone, the routes then come from the router's advertisements), else the
# kernel's own SLAAC from the router's advertisements (RFC 4862), up to 10 seconds. The address is iPXE's already,
# checked by it: without duplicate address detection (accept_dad, as busybox ip has no `nodad`) it is usable at once,
# where a tentative one cannot send for a second or more.
configure_ipv6() {
    local address=${ip6%/*} len=${ip6##*/} waited=0 found
    if [ -n "$address" ]; then
        [ -n "$len" ] || len=128
        echo 0 > "/proc/sys/net/ipv6/conf/$netif/accept_dad"
        if ip -6 addr add "$address/$len" dev "$netif"; then
            [ -z "$gateway6" ] || ip -6 route add default via "$gateway6" dev "$netif"
            [ -z "$dns6" ] || echo "nameserver $dns6" > /etc/resolv.conf
            say "network: $netif $address/$len${gateway6:+ via $gateway6} (from the loader)"
            return 0
        fi
    fi
    while [ -z "$(global_ipv6 "$netif")" ] && [ $waited -lt 50 ]; do
        sleep 0.2
        waited=$((waited + 1))
    done
    found=$(global_ipv6 "$netif")
    [ -n "$found" ] || return 1
    say "network: $netif $found (router advertisement)"
}

# Configure the interface: for an image on an IPv6 address (http://[ADDR]/...), by IPv6 alone, even where the
# loader had IPv4 too; else from what the loader knew (ip=, the kernel's nfsroot syntax: client:server:gateway:
# netmask:hostname:device:autoconf:dns0:dns1; or netboot.ip6= when it had no IPv4), else by DHCP on each
# candidate interface in turn.
configure_network() {
    local old_ifs client gateway netmask autoconf dns0 prefix
    load_network_drivers
    find_interfaces || return 1
    old_ifs=$IFS
    IFS=:
    set -f
    set -- $ipconf
    set +f
    IFS=$old_ifs
    client=$1 gateway=$3 netmask=$4 autoconf=$7 dns0=$8
    for netif in $interfaces; do
        ip link set "$netif" up
        wait_for_carrier "$netif"
        case "$url" in
        *://\[*)
            configure_ipv6 && return 0
            say "no IPv6 address on $netif (none from the loader, no router advertisement with a prefix)"
            continue
            ;;
        esac
        case "$autoconf" in dhcp | on | any) client= ;; esac
        if [ -n "$client" ] && [ -n "$netmask" ]; then
            prefix=$(ipcalc -p "$client" "$netmask")
            prefix=${prefix#PREFIX=}
            ip -4 addr flush dev "$netif"
            if ip addr add "$client/$prefix" dev "$netif"; then
                [ -z "$gateway" ] || ip route add default via "$gateway" dev "$netif"
                [ -z "$dns0" ] || echo "nameserver $dns0" > /etc/resolv.conf
                say "network: $netif $client/$prefix${gateway:+ via $gateway} (from the loader)"
                return 0
            fi
        fi
        # A loader on a network without IPv4 (an image named by a host name, say a mirror's): its IPv6 address.
        if [ -z "$client" ] && [ -n "${ip6%/*}" ] && configure_ipv6; then
            return 0
        fi
        write_dhcp_script
        if udhcpc -f -q -n -t 4 -T 2 -i "$netif" -s /run/netboot/udhcpc >/dev/null 2>&1; then
            say "network: $netif $(ip -4 -o addr show dev "$netif" | awk '{ print $4 }') (DHCP)"
            return 0
        fi
        say "no DHCP answer on $netif"
    done
    netif=
    return 1
}

network_ready() {
    if [ -n "$netif" ] && { ip -4 -o addr show dev "$netif" 2>/dev/null | grep -q inet ||
        [ -n "$(global_ipv6 "$netif")" ]; }; then
        return 0
    fi
    configure_network
}

# How many ranged requests at once: one per CPU (each stream is a process copying from its socket), at most four,
# each of at least 4 MiB; netboot.fetch_streams=N to choose. Under emulation one vCPU runs them all, and more
# streams only cost more (BENCHMARKS.md).
stream_count() {
    local n=$streams
    [ -n "$n" ] || n=$(nproc)
    [ "$n" -le 4 ] || [ -n "$streams" ] || n=4
    [ "$n" -le $((size >> 22)) ] || n=$((size >> 22))
    [ "$n" -ge 1 ] || n=1
    echo "$n"
}

# The image into $1 by ranged requests at once. busybox wget takes a part of a file (206) only when it continues
# a file (-c, which then sends our Range header instead of its own "bytes=N-"), writes where that file ends, and
# cuts the file there when it is done. So each part goes to a file of its own, made sparse up to where the part
# begins (the first part to the image itself, after its first byte, from etc/netboot-image: -c needs a file of
# at least one byte), and the parts are copied into place once all are in.
fetch_parts() {
    local dest=$1 n chunk start=1 end k=0 part pids= pid failed=0
    n=$(stream_count)
    if [ "$n" -le 1 ]; then
        wget -q -O "$dest" "$url"
        return
    fi
    chunk=$(((size + n - 1) / n))
    printf "\\$(printf %o "$first")" > "$dest"
    while [ "$start" -lt "$size" ]; do
        end=$(((k + 1) * chunk - 1))
        [ "$end" -lt "$size" ] || end=$((size - 1))
        part=$dest
        if [ "$k" -gt 0 ]; then
            part=$dest.$k
            truncate -s "$start" "$part"
        fi
        wget -q -c --header "Range: bytes=$start-$end" -O "$part" "$url" &
        pids="$pids $!"
        start=$((end + 1))
        k=$((k + 1))
    done
    for pid in $pids; do
        wait "$pid" || failed=1
    done
    k=1
    while [ "$failed" = 0 ] && [ -e "$dest.$k" ]; do
        dd if="$dest.$k" of="$dest" bs=1M skip=$((k * chunk)) seek=$((k * chunk)) iflag=skip_bytes \
            oflag=seek_bytes conv=notrunc 2>/dev/null || failed=1
        rm -f "$dest.$k"
        k=$((k + 1))
    done
    rm -f "$dest".*
    return $failed
}

# One attempt: the whole image into $1, then its sha256 checked.
download() {
    local started fetched checked got sum took rate
    started=$(centis)
    rm -f "$1"
    if ! fetch_parts "$1"; then
        say "cannot download $url"
        return 1
    fi
    got=$(stat -c %s "$1")
    if [ "$got" != "$size" ]; then
        say "the image from $url has $got bytes, not $size"
        return 1
    fi
    fetched=$(centis)
    sum=$(sha256sum "$1")
    sum=${sum%% *}
    checked=$(centis)
    if [ "$sum" != "$sha256" ]; then
        say "the image from $url does not match its sha256: it is $sum, the kernel command line says $sha256"
        return 1
    fi
    took=$((fetched - started))
    rate=$((size / (took > 0 ? took : 1) / 1000))
    say "fetched $size bytes in $(seconds $took) s ($((rate / 10)).$((rate % 10)) MB/s), sha256 checked in" \
        "$(seconds $((checked - fetched))) s"
}

# --fetch: the image is not in the initrd but named in etc/netboot-image (its name, size, first byte); download it into a
# tmpfs of its size, trying again with backoff; after the last attempt, a rescue shell, then the attempts again.
fetch_image() {
    read -r name size first < /etc/netboot-image
    missing=
    [ -n "$sha256" ] || missing="netboot.image_sha256="
    [ -n "$url" ] || missing="${missing:+$missing and }netboot.image_url="
    if [ -n "$missing" ]; then
        fail "the image is to be downloaded, but there is no $missing on the kernel command line" \
            "(netboot serve's iPXE script adds the URL)"
        return 1
    fi
    # The image, and while it is put together from parts, one more part (fetch_parts).
    parts=$(stream_count)
    need=$(((size + (parts > 1 ? size / parts : 0)) / 1048576 + 2))
    memory=$(awk '/^MemTotal:/ { print int($2 / 1024) }' /proc/meminfo)
    if [ "$need" -ge "$memory" ]; then
        fail "the image needs $need MiB of memory, and this machine has $memory MiB in all"
        return 1
    fi
    mkdir -p /run/netboot/fetch
    if ! mount -t tmpfs -o "size=${need}m,mode=0700" fetch /run/netboot/fetch; then
        fail "cannot mount a tmpfs for the image"
        return 1
    fi
    netif=
    while :; do
        attempt=1 delay=1
        while [ "$attempt" -le "$tries" ]; do
            say "fetching $url ($size bytes, $parts stream$([ "$parts" = 1 ] || echo s)) into memory," \
                "attempt $attempt of $tries"
            if network_ready && download "/run/netboot/fetch/$name"; then
                image=/run/netboot/fetch/$name
                return 0
            fi
            rm -f "/run/netboot/fetch/$name"
            if [ "$attempt" -lt "$tries" ]; then
                say "trying again in $delay s"
                sleep "$delay"
                delay=$((delay * 2 > 30 ? 30 : delay * 2))
            fi
            attempt=$((attempt + 1))
        done
        fail "cannot fetch the image: $tries attempts failed (see above); leaving the shell tries again"
    done
}

# The image: the store (a Nix system's) or the whole root (any other system), squashfs or erofs.
image= netif=
for candidate in /nix-store.squashfs /nix-store.erofs /root.squashfs /root.erofs; do
    [ -e "$candidate" ] && image=$candidate && break
done
[ -n "$image" ] || [ ! -e /etc/netboot-image ] || fetch_image
[ -n "$image" ] || fail "no image in the initrd"
fstype=${image##*.}

case "${image##*/}" in
nix-store.*)
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

# The booted system finds the network unconfigured, as NixOS' own stage 1 leaves it by default
# (boot.initrd.network.flushBeforeStage2): the addresses stage 1 gave it go; the kernel's IPv6 link-local one,
# which only a link going down and up would bring back, stays.
[ -z "$netif" ] || ip addr flush dev "$netif" scope global
for fs in dev proc sys; do
    mkdir -p "/mnt-root/$fs"
    mount --move "/$fs" "/mnt-root/$fs" || fail "cannot move /$fs"
done
say "starting $init"
exec switch_root /mnt-root "$init"
