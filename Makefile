# netboot: `make demo` and `make test` install what they need on a Debian machine, then run.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Debian packages, one group per purpose (README explains each).
DEBIAN_PACKAGES := python3-venv gcc python3-dev
DEBIAN_PACKAGES += squashfs-tools erofs-utils zstd xz-utils lz4 gzip busybox-static kmod
DEBIAN_PACKAGES += nix-bin linux-image-amd64 cpio libarchive13
DEBIAN_PACKAGES += qemu-system-x86 ovmf ipxe-qemu ipxe
# arm64: QEMU's arm64 boards, and AAVMF (EDK2 for arm64) for UEFI network boots.
DEBIAN_PACKAGES += qemu-system-arm qemu-efi-aarch64
DEBIAN_PACKAGES += curl tftp-hpa atftp util-linux procps
DEBIAN_PACKAGES += dnsmasq-base iproute2 nftables
DEBIAN_PACKAGES += chromium systemd nginx
# Several servers on one database: the tests start throwaway PostgreSQL clusters (tests/postgres.py).
DEBIAN_PACKAGES += postgresql
# Secure Boot: the signed loaders served, signing and unified kernel images at build, keys in the tests.
DEBIAN_PACKAGES += shim-signed shim-helpers-amd64-signed grub-efi-amd64-signed grub-efi-amd64-bin
DEBIAN_PACKAGES += sbsigntool osslsigncode systemd-boot-efi binutils openssl mokutil efitools
DEBIAN_PACKAGES += radvd
DEBIAN_PACKAGES += kea-admin

.PHONY: all deps venv test test-quick demo demo-proxy screenshot bench bench-dhcp bench-load bench-status bench-overlay bench-autobuild bench-formats bench-secureboot bench-arch bench-fetch bench-db lint clean
all: test

deps:
	@# The arm64 test system's kernel, modules and busybox are Debian's arm64 packages, downloaded and unpacked
	@# (tests/system/arm64-packages), never installed: apt needs dpkg's arm64 architecture to know them.
	@if ! dpkg --print-foreign-architectures | grep -qx arm64; then \
	    echo "adding dpkg's arm64 architecture"; \
	    $(SUDO) dpkg --add-architecture arm64 && $(SUDO) apt-get update -q; \
	fi
	@missing=$$(for p in $(DEBIAN_PACKAGES); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:" $$missing; \
	    $(SUDO) apt-get update -q && \
	    DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $$missing; \
	fi

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
demo: deps venv
	qemu/demo

# The same, booted by UEFI firmware's own PXE client through netboot's proxy DHCP on a namespace LAN (root).
demo-proxy: deps venv
	qemu/demo-proxy

# The README's picture of the status page, taken by the test that loads it in headless Chromium.
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
	@$(MAKE) --no-print-directory deps DEBIAN_PACKAGES="$(BENCH_PACKAGES) $(DHCP_BENCH_PACKAGES)"
	$(VENV)/bin/pip install -q $(BENCH_PIP)
	$(PY) bench/run.py

# Only the DHCP comparisons (part of make bench): UEFI PXE boots through proxy DHCP against dnsmasq, through iPXE
# over the authoritative mode with and without no-pxedhcp, and perfdhcp against Kea's kea-dhcp4; each rewrites its
# section of BENCHMARKS.md.
bench-dhcp: deps venv
	@$(MAKE) --no-print-directory deps DEBIAN_PACKAGES="$(DHCP_BENCH_PACKAGES)"
	$(PY) bench/dhcp_bench.py --update
	$(PY) bench/dhcp_perf.py --update
	$(PY) bench/dhcp6_perf.py --update

# Only the boot storms, HTTP against nginx and TFTP under packet loss against tftpd-hpa (part of make bench).
bench-load: deps venv
	@$(MAKE) --no-print-directory deps DEBIAN_PACKAGES="$(BENCH_PACKAGES)"
	$(PY) bench/load_bench.py --update

# Only the cost of the status listener (part of make bench): requests/s with it on and off, memory with 200,000 MACs.
bench-status: deps venv
	@$(MAKE) --no-print-directory deps DEBIAN_PACKAGES="$(BENCH_PACKAGES)"
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

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache out
