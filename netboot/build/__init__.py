"""`netboot build`: a system's closure packed into bzImage, initrd, cmdline, netboot.ipxe and manifest.json.

Data flows one way: `system` (the toplevel) -> `closure` (store paths, registration) -> `files` (sorted walk)
-> `cpio`, `tree`, `initrd`, `squashfs`, `stage1`, `modules`, `compress` -> `outdir` (atomic replacement);
`pack` orchestrates, `cache` keeps packed store paths between builds.
"""
