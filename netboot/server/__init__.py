"""`netboot serve`: one asyncio process answering HTTP and TFTP (and DHCP, with --dhcp) from one namespace.

`server` is the process and its reloads; `machines` reads the machines file (`mac` spells MACs); `namespace`
resolves every name a machine can ask for, with `templates` rendering its scripts; `http` is the aiohttp side
(`http_limits` its caps); `addresses` finds the interfaces' addresses. The protocols live beside this package:
`netboot.tftp`, `netboot.dhcp`, and `netboot.status` shows what is booting.
"""
