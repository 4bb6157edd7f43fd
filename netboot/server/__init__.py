"""`netboot serve`: one asyncio process answering HTTP and TFTP (and DHCP, with --dhcp) from one namespace.

`server` is the process and its reloads; `namespace` resolves every name a machine can ask for (its scripts
rendered from `netboot.core.ipxe_scripts`; `overlay` and `overlay_cache` a profile's per-machine files;
`autobuild` builds the profiles that name a system); `http` is the aiohttp side (`http_limits` its caps). It
composes the parts below it: `netboot.core` (the machines file), `netboot.image`, the protocols `netboot.tftp`
and `netboot.dhcp`, and `netboot.status`; none of them imports it.
"""
