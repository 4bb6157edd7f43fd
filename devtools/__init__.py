"""Tooling of the tests, the demo and the benchmarks, not installed with netboot: `qemu` boots artifacts in QEMU,
`lan` builds LANs in network namespaces, `lanboot` boots real firmware on one."""
