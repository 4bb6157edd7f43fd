"""A small in-memory file tree (stage 1, leading directories), written with each directory before its contents."""

from __future__ import annotations

from dataclasses import dataclass

from netboot.image.cpio import NewcWriter


@dataclass(frozen=True)
class _Node:
    kind: str  # "dir", "file", "chr", "link"
    perm: int = 0o755
    content: bytes = b""
    rdev: tuple[int, int] = (0, 0)


class Tree:
    def __init__(self) -> None:
        self._nodes: dict[bytes, _Node] = {}

    def directory(self, name: bytes, perm: int = 0o755) -> None:
        self._nodes[name] = _Node("dir", perm)

    def file(self, name: bytes, content: bytes, perm: int = 0o444) -> None:
        self._nodes[name] = _Node("file", perm, content)

    def char_device(self, name: bytes, perm: int, major: int, minor: int) -> None:
        self._nodes[name] = _Node("chr", perm, rdev=(major, minor))

    def symlink(self, name: bytes, target: bytes) -> None:
        self._nodes[name] = _Node("link", content=target)

    def write(self, w: NewcWriter) -> None:
        """Write every node, and every parent directory not given explicitly (mode 0755)."""
        nodes = dict(self._nodes)
        for name in self._nodes:
            parts = name.split(b"/")
            for i in range(1, len(parts)):
                nodes.setdefault(b"/".join(parts[:i]), _Node("dir"))
        # Sorting by components puts a directory right before its contents (a prefix sorts first).
        for name in sorted(nodes, key=lambda n: n.split(b"/")):
            node = nodes[name]
            match node.kind:
                case "dir":
                    w.directory(name, node.perm)
                case "file":
                    w.data(name, node.content, node.perm)
                case "chr":
                    w.char_device(name, node.perm, *node.rdev)
                case "link":
                    w.symlink(name, node.content)
