"""What every part of netboot shares, at the bottom of the dependency order: it imports nothing else of netboot.

`errors` (the one error type), `run` (external commands and processes), `beneath` (the one way to open a path
beneath a root), `artifacts` (the output directory: what the image builder writes and the server reads), `mac`
and `machines` (the machines file), `addresses` (the interfaces' addresses), `compress` (the compressors the
kernel accepts), `ipxe_scripts` (the iPXE script templates).
"""
