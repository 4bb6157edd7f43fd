"""The network drivers a fetching stage 1 carries (`netboot build --fetch`), loaded at boot by modalias.

Stage 1 cannot know which network card a machine has, so it carries the kernel's drivers for wired network
hardware and loads those whose aliases match the machine's devices (busybox modprobe reads the modules.alias and
modules.dep written here, as udev's coldplug would with the full ones):

- every module under kernel/drivers/net/ethernet/ (the PCI and platform Ethernet cards);
- the virtual machines' cards at the top of kernel/drivers/net/: virtio_net, vmxnet3, Hyper-V's hv_netvsc,
  Xen's xen-netfront;
- the buses such a card sits behind when they are modules: virtio_pci (a virtio card is a PCI device that
  virtio_pci turns into a virtio device; virtio_net is not its dependency);
- af_packet, when it is a module: udhcpc's raw socket.

Not wireless (firmware and a supplicant, which stage 1 has neither), not USB adapters (the USB host controllers'
drivers would come too), not CAN, WAN, WWAN, ham radio or the virtual devices (bonds, tunnels, bridges): none of
those boots a machine from a wired network. Each selected module's dependencies come with it (modules.dep), and
its soft dependencies (modules.softdep "pre:", e.g. r8169's realtek PHY driver) are made hard ones, since
busybox modprobe does not read modules.softdep.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from netboot.image.modules import ModuleTree, module_name, uncompressed_name

_SELECTED = re.compile(
    r"kernel/drivers/net/ethernet/.*"
    r"|kernel/drivers/net/(virtio_net|xen-netfront)\.ko.*"
    r"|kernel/drivers/net/(vmxnet3|hyperv)/.*"
    r"|kernel/drivers/virtio/virtio_pci\.ko.*"
    r"|kernel/net/packet/af_packet\.ko.*"
)


@dataclass(frozen=True)
class NetworkDrivers:
    tree: ModuleTree
    drivers: tuple[str, ...]  # the modules selected (paths relative to the module tree), sorted
    modules: tuple[str, ...]  # paths relative to the module tree, sorted: the drivers and their dependencies
    deps: dict[str, tuple[str, ...]]  # path -> the paths modprobe loads before it, last first (modules.dep's order)

    @classmethod
    def of(cls, tree: ModuleTree) -> NetworkDrivers:
        deps: dict[str, tuple[str, ...]] = {}

        def add(relpath: str, dependencies: tuple[str, ...]) -> None:
            if relpath in deps:
                return
            soft: list[str] = []
            for name in tree.softdeps.get(module_name(relpath), ()):
                for candidate in tree.aliases.get(name, (name.replace("-", "_"),)):
                    if candidate in tree.deps and candidate not in tree.builtin:
                        target, its_deps = tree.deps[candidate]
                        soft += [target, *its_deps]
            deps[relpath] = (*dependencies, *(p for p in soft if p not in dependencies and p != relpath))
            for dep in deps[relpath]:
                name = module_name(dep)
                add(dep, tree.deps[name][1] if name in tree.deps else ())

        drivers = sorted(t for t, _ in tree.deps.values() if _SELECTED.fullmatch(t))
        for target in drivers:
            add(target, tree.deps[module_name(target)][1])
        return cls(tree, tuple(drivers), tuple(sorted(deps)), deps)

    @property
    def names(self) -> set[str]:
        return {module_name(p) for p in self.modules}

    def modules_dep(self) -> bytes:
        """modules.dep for these modules alone, as they are stored in the initrd (uncompressed)."""
        return "".join(f"{uncompressed_name(p)}:{''.join(' ' + uncompressed_name(d) for d in self.deps[p])}\n"
                       for p in self.modules).encode()

    def modules_alias(self) -> bytes:
        """modules.alias lines (`alias PATTERN MODULE`) of these modules: what modprobe matches a device's
        modalias against."""
        names = self.names
        lines = sorted(f"alias {alias} {name}\n" for alias, found in self.tree.aliases.items() for name in found
                       if name in names and name not in self.tree.builtin)
        return "".join(lines).encode()

    def files(self) -> list[tuple[bytes, str]]:
        """(name inside the initrd, path relative to the module tree) of each module."""
        return [(os.fsencode(f"lib/modules/{self.tree.version}/{uncompressed_name(p)}"), p) for p in self.modules]
