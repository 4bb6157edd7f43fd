"""`netboot build`: a system's closure packed into its kernel (bzImage, or Image on arm64), initrd, cmdline,
netboot.ipxe and manifest.json.

Data flows one way: `system` (the toplevel; `kernel` recognises its architecture, `elf` that of stage 1's
busybox) -> `closure` (store paths, registration) -> `files` (sorted walk)
-> `cpio`, `tree`, `initrd`, `squashfs`, `erofs`, `stage1`, `modules` -> `outdir` (atomic replacement);
`rootfs` (with `oci` for image archives) packs a system that is not Nix's; `pack` orchestrates, `cache` keeps
packed store paths between builds, `publish` copies builds into content-addressed mirrors. It imports only
`netboot.core` (the compressors, the output directory's contract), never the server.
"""
