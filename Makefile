# netboot: `make demo` and `make test` install what they need on a Debian machine, then run; `make install`
# installs netboot itself. Each says which Debian packages it is about to install before it does.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Debian packages, one list per purpose (docs/dependencies.md says why each is there).
# make install: what netboot runs at build and serve time, and what installing it compiles with.
RUN_PACKAGES := python3-venv gcc python3-dev
RUN_PACKAGES += squashfs-tools erofs-utils zstd xz-utils lz4 gzip busybox-static ipxe
# make demo: the demo system (tests/system/build: Nix, Debian's kernel from /boot and its modules, busybox-static,
# depmod), packing it in the default format (squashfs, zstd), and QEMU with its iPXE ROM. linux-image-amd64 only
# when /boot holds no kernel at all: the demo boots whatever kernel the host has.
DEMO_PACKAGES := python3-venv gcc python3-dev nix-bin busybox-static kmod squashfs-tools zstd
DEMO_PACKAGES += qemu-system-x86 ipxe-qemu
DEMO_PACKAGES += $(if $(wildcard /boot/vmlinuz-*),,linux-image-amd64)
# make demo-proxy: the same, booted by OVMF's own PXE client on a LAN of network namespaces beside dnsmasq,
# chaining Debian's ipxe.efi.
DEMO_PROXY_PACKAGES := $(DEMO_PACKAGES) ovmf ipxe dnsmasq-base iproute2
# make demo-ha: the same LAN with two servers on one throwaway PostgreSQL cluster.
DEMO_HA_PACKAGES := $(DEMO_PROXY_PACKAGES) postgresql util-linux

# make test (and the benchmarks, which boot the same systems): everything the whole suite runs.
DEBIAN_PACKAGES := python3-venv gcc python3-dev
DEBIAN_PACKAGES += squashfs-tools erofs-utils zstd xz-utils lz4 gzip busybox-static kmod
DEBIAN_PACKAGES += nix-bin linux-image-amd64 cpio libarchive13
DEBIAN_PACKAGES += qemu-system-x86 ovmf ipxe-qemu ipxe
# arm64: QEMU's arm64 boards, and AAVMF (EDK2 for arm64) for UEFI network boots.
DEBIAN_PACKAGES += qemu-system-arm qemu-efi-aarch64
DEBIAN_PACKAGES += curl tftp-hpa atftp util-linux procps
DEBIAN_PACKAGES += dnsmasq-base iproute2 nftables
DEBIAN_PACKAGES += chromium systemd nginx
# Several servers on one database: the tests start throwaway PostgreSQL clusters (devtools/postgres.py).
DEBIAN_PACKAGES += postgresql
# Secure Boot: the signed loaders served, signing and unified kernel images at build, keys in the tests.
DEBIAN_PACKAGES += shim-signed shim-helpers-amd64-signed grub-efi-amd64-signed grub-efi-amd64-bin
DEBIAN_PACKAGES += sbsigntool osslsigncode systemd-boot-efi binutils openssl mokutil efitools
# IPv6-only LANs: radvd as the site's router; ISC's perfdhcp (in kea-admin) as many DHCPv4/v6 clients at once.
DEBIAN_PACKAGES += radvd kea-admin

# Where make install puts netboot: a virtual environment of its own (Debian's python3 refuses pip installs into
# the system's, PEP 668) and a link to its command, the path contrib/netboot.service runs.
PREFIX ?= /usr/local
INSTALL_LIB := $(PREFIX)/lib/netboot
INSTALL_BIN := $(PREFIX)/bin

.PHONY: all deps packages demo-deps demo-proxy-deps install-deps install uninstall venv test test-quick demo demo-proxy screenshot bench bench-dhcp bench-load bench-status bench-overlay bench-autobuild bench-formats bench-secureboot bench-arch bench-fetch bench-db bench-ha demo-ha demo-ha-deps lint clean
all: test

# The Debian packages of PACKAGES that are missing, installed for FOR (a target's name), saying so first.
# --no-upgrade: a package already installed stays at its version.
packages:
	@missing=$$(for p in $(PACKAGES); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "$(FOR): installing Debian packages:" $$missing; \
	    $(SUDO) apt-get update -q && \
	    DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends --no-upgrade $$missing; \
	fi

# make test's: the whole suite's packages, and dpkg's arm64 architecture.
deps:
	@# The arm64 test system's kernel, modules and busybox are Debian's arm64 packages, downloaded and unpacked
	@# (tests/system/arm64-packages), never installed: apt needs dpkg's arm64 architecture to know them.
	@if ! dpkg --print-foreign-architectures | grep -qx arm64; then \
	    echo "make test: adding dpkg's arm64 architecture (arm64 packages are downloaded for the tests, never installed)"; \
	    $(SUDO) dpkg --add-architecture arm64 && $(SUDO) apt-get update -q; \
	fi
	@$(MAKE) --no-print-directory packages FOR="make test" PACKAGES="$(DEBIAN_PACKAGES)"

demo-deps:
	@$(MAKE) --no-print-directory packages FOR="make demo" PACKAGES="$(DEMO_PACKAGES)"

demo-proxy-deps:
	@$(MAKE) --no-print-directory packages FOR="make demo-proxy" PACKAGES="$(DEMO_PROXY_PACKAGES)"

demo-ha-deps:
	@$(MAKE) --no-print-directory packages FOR="make demo-ha" PACKAGES="$(DEMO_HA_PACKAGES)"

install-deps:
	@$(MAKE) --no-print-directory packages FOR="make install" PACKAGES="$(RUN_PACKAGES)"

# netboot from this checkout (not editable) in $(INSTALL_LIB), its command linked as $(INSTALL_BIN)/netboot.
# Again to upgrade; PREFIX=DIR to install elsewhere.
install: install-deps
	@echo "make install: netboot into $(INSTALL_LIB), its command as $(INSTALL_BIN)/netboot"
	$(PYTHON) -m venv $(INSTALL_LIB)
	$(INSTALL_LIB)/bin/pip install -q --disable-pip-version-check --no-cache-dir .
	install -d $(INSTALL_BIN)
	ln -sfn $(INSTALL_LIB)/bin/netboot $(INSTALL_BIN)/netboot
	$(INSTALL_BIN)/netboot --version

uninstall:
	rm -f $(INSTALL_BIN)/netboot
	rm -rf $(INSTALL_LIB)

$(VENV)/.installed: pyproject.toml hatch_build.py netboot/tftp/_lockstep.c
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	@# The lowest tomlkit that pyproject.toml allows, beside the environment (which has the newest): the machines
	@# file's writer is tested with both.
	$(VENV)/bin/pip install -q --no-deps --target $(VENV)/tomlkit-oldest \
	    "tomlkit==$$(sed -n 's/.*"tomlkit>=\([0-9.]*\)".*/\1/p' pyproject.toml)"
	touch $@

venv: $(VENV)/.installed

# Two at a time on two cores (pytest-xdist; a VM under software emulation keeps one core busy); tests are handed
# out one at a time as workers free up (a class's tests together), longest first (tests/conftest.py); what the
# tests share (the test system, its builds) is made once (tests/support.py).
TEST_WORKERS ?= auto
XDIST := -n $(TEST_WORKERS) --dist load
test: deps venv
	$(VENV)/bin/pytest $(XDIST) $(PYTEST_ARGS)

# No QEMU boots, nothing that needs root, no large packing: for quick iterations.
test-quick: deps venv
	$(VENV)/bin/pytest $(XDIST) -m 'not vm and not root and not slow' $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check netboot devtools tests bench

# Build the demo system with Nix, pack it, serve it, and network-boot a QEMU VM from it.
demo: demo-deps venv
	qemu/demo

# The same, booted by UEFI firmware's own PXE client through netboot's proxy DHCP on a namespace LAN (root).
demo-proxy: demo-proxy-deps venv
	qemu/demo-proxy

# Two servers on one PostgreSQL, authoritative on one range; one killed (kill -9), the VM still boots (root).
demo-ha: demo-ha-deps venv
	qemu/demo-ha

# docs/api.md's picture of the status page, taken by the test that loads it in headless Chromium.
screenshot: deps venv
	NETBOOT_SCREENSHOT=$(CURDIR)/docs/status-page.png $(VENV)/bin/pytest -q tests/vm/test_fleet_boot.py -k page

# Reference tools for the side-by-side benchmarks (kea-admin ships perfdhcp).
BENCH_PACKAGES := nginx wrk curl tftpd-hpa atftp
DHCP_BENCH_PACKAGES := kea-dhcp4-server kea-admin
DHCP_BENCH_PACKAGES += kea-dhcp6-server
# The reference PostgreSQL driver of bench-db (netboot itself uses asyncpg): the benchmark's alone, never a
# dependency of the package.
BENCH_PIP := 'psycopg[binary]>=3.2'

bench: deps venv
	@$(MAKE) --no-print-directory packages FOR="make bench" PACKAGES="$(BENCH_PACKAGES) $(DHCP_BENCH_PACKAGES)"
	$(VENV)/bin/pip install -q $(BENCH_PIP)
	$(PY) bench/run.py

# Only the DHCP comparisons (part of make bench): UEFI PXE boots through proxy DHCP against dnsmasq, through iPXE
# over the authoritative mode with and without no-pxedhcp, and perfdhcp against Kea's kea-dhcp4; each rewrites its
# section of BENCHMARKS.md.
bench-dhcp: deps venv
	@$(MAKE) --no-print-directory packages FOR="make bench-dhcp" PACKAGES="$(DHCP_BENCH_PACKAGES)"
	$(PY) bench/dhcp_bench.py --update
	$(PY) bench/dhcp_perf.py --update
	$(PY) bench/dhcp6_perf.py --update

# Only the boot storms, HTTP against nginx and TFTP under packet loss against tftpd-hpa (part of make bench).
bench-load: deps venv
	@$(MAKE) --no-print-directory packages FOR="make bench-load" PACKAGES="$(BENCH_PACKAGES)"
	$(PY) bench/load_bench.py --update

# Only the cost of the status listener (part of make bench): requests/s with it on and off, memory with 200,000 MACs.
bench-status: deps venv
	@$(MAKE) --no-print-directory packages FOR="make bench-status" PACKAGES="$(BENCH_PACKAGES)"
	$(PY) bench/status_bench.py --update

# Only a Nix profile's new system: from nix-env --set to served, on the 1 GB closure (part of make bench).
bench-autobuild: deps venv
	$(PY) bench/autobuild_bench.py --update

# Only the overlays (part of make bench): render and pack per machine, cold and cached, against cpio | zstd.
bench-overlay: deps venv
	$(PY) bench/overlay_bench.py --update

# Only the image formats on the 1 GB closure (part of make bench): erofs, squashfs and direct, cold builds against
# bare mkfs.erofs, and QEMU boots (software emulation) to init and to the store read.
bench-formats: deps venv
	$(PY) bench/format_bench.py --update

# Only the Secure Boot chains (part of make bench): VM start to init for the grub and uki chains against iPXE, and
# kernel + initrd over GRUB's HTTP against its TFTP.
bench-secureboot: deps venv
	$(PY) bench/secureboot_bench.py --update

# Only arm64 beside x86_64 (part of make bench): the small test system built for each on this host, booted
# directly in QEMU under software emulation.
bench-arch: deps venv
	$(PY) bench/arch_bench.py --update

# Only --fetch (part of make bench): squashfs on the 1 GB closure with and without --fetch, QEMU boots through
# iPXE over HTTP to init, and stage 1's download of the image against curl's.
bench-fetch: deps venv
	$(PY) bench/fetch_bench.py --update

# Only the PostgreSQL drivers (part of make bench): asyncpg against psycopg 3 on the DHCP path's claim statement,
# single claims, batches and two servers at once, on a throwaway cluster.
bench-db: deps venv
	$(VENV)/bin/pip install -q $(BENCH_PIP)
	$(PY) bench/db_driver.py --update

# Only two servers on one database (part of make bench): perfdhcp, broadcasting, against a pair of netboot serve
# --database and a pair of kea-dhcp4 with its PostgreSQL lease backend, on one throwaway cluster and one range.
bench-ha: deps venv
	@$(MAKE) --no-print-directory packages FOR="make bench-ha" PACKAGES="$(DHCP_BENCH_PACKAGES)"
	$(PY) bench/ha_perf.py --update

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache out
