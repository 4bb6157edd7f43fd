"""What every part of netboot shares, at the bottom of the dependency order: it imports nothing else of netboot.

`errors` (the one error type), `run` (external commands and processes), `mac` and `machines` (the machines
file), `addresses` (the interfaces' addresses), `compress` (the compressors the kernel accepts), `ipxe_scripts`
(the iPXE script templates).
"""
