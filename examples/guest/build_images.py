#!/usr/bin/env python3
"""Build the test worker-node images: one golden qcow2 per VO, a kernel and an initramfs.

Stand-ins for a site's Scientific Linux + gLite worker-node images, made only from Debian packages
(busybox-static, bash, the Debian kernel, OpenSSH): busybox userland, bash, OpenSSH's sshd, the
pool accounts with the host's uids/gids, /etc/grid-middleware-release naming the VO, and an init
that reads the NoCloud seed (examples/guest/guest-init.sh). The output is cached under a hash of
everything that goes into it, so a second run returns at once.

sshd is OpenSSH, configured as a site image with shared home directories must be: the keys that
may log in live in /etc/ssh/authorized_keys/<user> (AuthorizedKeysFile), never in ~/.ssh, which
is the user's real, shared home. openssh-server is fetched with `apt-get download` and unpacked
into the cache (never installed on the host, so no sshd is started or enabled there).

Usage: build_images.py [--cache DIR] [--vo atlas --vo cms ...] [--json]
Prints the output directory (or a JSON manifest with --json).
"""

from __future__ import annotations

import argparse
import glob
import grp
import hashlib
import json
import lzma
import os
import pwd
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = "/var/cache/vmimagemanager/test-images"
DEFAULT_VOS = ("atlas", "cms")
MIDDLEWARE_VERSION = "glite-WN 3.2.11-0 (vmimagemanager test image)"
CMDLINE = "console=ttyS0 quiet panic=-1"
DISK_MIB = 256
# GNU time: ARC's job wrapper runs `/usr/bin/time --version` (busybox's has no --version)
BINARIES = ["/bin/busybox", "/bin/bash", "/usr/bin/ssh-keygen", "/usr/bin/time"]
# Unpacked from .debs (apt-get download) into the cache, copied into the image with their libraries.
SSHD_DEBS = ["openssh-server", "libwrap0"]
SSHD_CONFIG = """\
# vmimagemanager test image: keys outside the (shared) home directories
Port 22
HostKey /etc/ssh/ssh_host_ed25519_key
AuthorizedKeysFile /etc/ssh/authorized_keys/%u
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin prohibit-password
PermitUserEnvironment no
PrintMotd no
PidFile /run/sshd.pid
"""
# Module load order for the initramfs (Debian builds all of these as modules). Each after its
# dependencies (modinfo -F depends); missing ones are skipped (some are built in elsewhere).
MODULES = [
    "virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
    "virtio_rng", "failover", "net_failover", "virtio_net", "virtio_blk",
    "crc32c_generic", "libcrc32c", "crc16", "mbcache", "jbd2", "ext4",
    "cdrom", "isofs", "netfs", "fscache", "9pnet", "9pnet_virtio", "9p",
    "fuse", "virtiofs",  # an owner's home, served by a virtiofsd of the owner's
]


def log(msg: str) -> None:
    print(f"build-images: {msg}", file=sys.stderr)


def kernel_release() -> str:
    kernels = sorted(glob.glob("/boot/vmlinuz-*"))
    if not kernels:
        sys.exit("build-images: no /boot/vmlinuz-*; install linux-image-amd64")
    return kernels[-1].removeprefix("/boot/vmlinuz-")


def pool_accounts(vos: list[str]) -> list[pwd.struct_passwd]:
    """The host's pool accounts of the VOs (primary group = VO name): same uids in the guest."""
    accounts = []
    for vo in vos:
        try:
            gid = grp.getgrnam(vo).gr_gid
        except KeyError:
            sys.exit(f"build-images: host group {vo!r} does not exist; run "
                     "harness/pool-accounts.sh first")
        accounts += [p for p in pwd.getpwall() if p.pw_gid == gid]
    return accounts


def shared_libraries(binary: str, extra_libdir: Path | None = None) -> list[str]:
    env = dict(os.environ)
    if extra_libdir is not None:
        env["LD_LIBRARY_PATH"] = str(extra_libdir)
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, env=env).stdout
    missing = [line.split()[0] for line in out.splitlines() if "not found" in line]
    if missing:
        sys.exit(f"build-images: {binary} needs {', '.join(missing)}, not on this machine")
    libs = []
    for line in out.splitlines():
        parts = line.split()
        for part in parts:
            if part.startswith("/"):
                libs.append(part)
    return libs


def unpacked_sshd(cache: Path) -> Path:
    """OpenSSH's server unpacked from Debian's .deb under the cache (downloaded once)."""
    debs = cache / "debs"
    root = debs / "root"
    if (root / "usr/sbin/sshd").exists():
        return root
    debs.mkdir(parents=True, exist_ok=True)
    log(f"fetching {' '.join(SSHD_DEBS)} with apt-get download (not installed on the host)")
    got = subprocess.run(["apt-get", "download", *SSHD_DEBS], cwd=debs, capture_output=True,
                         text=True)
    if got.returncode != 0:  # package lists may be missing (fresh container): update once
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
        got = subprocess.run(["apt-get", "download", *SSHD_DEBS], cwd=debs, capture_output=True,
                             text=True)
    if got.returncode != 0:
        sys.exit("build-images: apt-get download openssh-server failed: "
                 f"{got.stderr.strip().splitlines()[-1:]}; run harness/install-deps.sh (apt-get "
                 "update) and check the Debian mirror is reachable")
    part = debs / "root.part"
    shutil.rmtree(part, ignore_errors=True)
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(part)], check=True)
    part.rename(root)
    return root


def input_digest(vos: list[str], release: str, accounts: list[pwd.struct_passwd],
                 sshd_root: Path) -> str:
    h = hashlib.sha256()
    h.update((sshd_root / "usr/sbin/sshd").read_bytes())
    for path in [Path(__file__), HERE / "guest-init.sh", HERE / "initramfs-init.sh"]:
        h.update(path.read_bytes())
    for path in BINARIES + [f"/boot/vmlinuz-{release}", SYSLINUX_MBR]:
        st = os.stat(path)
        h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(repr((vos, [tuple(a) for a in accounts], MODULES, CMDLINE, DISK_MIB)).encode())
    return h.hexdigest()[:16]


def place(source: Path | str, target: Path) -> None:
    """Copy a file into the staging tree, never through a symlink already there.

    Applet links in the staging tree point at absolute host paths (/bin/busybox); writing through
    one would overwrite the host's file, so an existing link is removed first.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        target.unlink()
    shutil.copy2(os.path.realpath(source), target)


def copy_file(src: str, root: Path, mode: int | None = None, strip: Path | None = None) -> None:
    """Copy host file `src` to the same path under `root` (below `strip` if it lies there)."""
    rel = Path(src).relative_to(strip) if strip and Path(src).is_relative_to(strip) else src
    target = root / str(rel).lstrip("/")
    place(src, target)
    if mode is not None:
        os.chmod(target, mode)


def make_rootfs(root: Path, vo: str, accounts: list[pwd.struct_passwd], sshd: bool,
                sshd_root: Path) -> None:
    for d in ["bin", "sbin", "usr/bin", "usr/sbin", "etc/ssh/authorized_keys", "proc", "sys",
              "dev", "run", "tmp", "root", "home", "var/tmp", "var/log", "mnt"]:
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    os.chmod(root / "var/tmp", 0o1777)
    os.chmod(root / "root", 0o700)
    for binary in BINARIES:
        copy_file(binary, root)
        for lib in shared_libraries(binary):
            copy_file(lib, root)
    sshd_libdir = sshd_root / "usr/lib/x86_64-linux-gnu"
    copy_file(str(sshd_root / "usr/sbin/sshd"), root, strip=sshd_root)
    for lib in shared_libraries(str(sshd_root / "usr/sbin/sshd"), sshd_libdir):
        copy_file(lib, root, strip=sshd_root)
    (root / "etc/ssh/sshd_config").write_text(SSHD_CONFIG)
    place(HERE / "guest-init.sh", root / "sbin/init")
    os.chmod(root / "sbin/init", 0o755)
    applets = subprocess.run(["/bin/busybox", "--list-full"], capture_output=True, text=True,
                             check=True).stdout.split()
    for applet in applets:
        link = root / applet
        if applet.endswith("/busybox") or link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")

    passwd = ["root:x:0:0:root:/root:/bin/bash",
              "sshd:x:100:65534::/run/sshd:/bin/false",  # OpenSSH's privilege separation user
              "nobody:x:65534:65534:nobody:/nonexistent:/bin/false"]
    shadow = ["root:*:19000:0:99999:7:::", "sshd:*:19000:0:99999:7:::",
              "nobody:*:19000:0:99999:7:::"]
    groups: dict[int, tuple[str, list[str]]] = {0: ("root", []), 65534: ("nogroup", [])}
    for acct in accounts:
        passwd.append(f"{acct.pw_name}:x:{acct.pw_uid}:{acct.pw_gid}:{acct.pw_gecos}:"
                      f"{acct.pw_dir}:/bin/bash")
        shadow.append(f"{acct.pw_name}:*:19000:0:99999:7:::")
        gname = grp.getgrgid(acct.pw_gid).gr_name
        groups.setdefault(acct.pw_gid, (gname, []))
        home = root / acct.pw_dir.lstrip("/")
        home.mkdir(parents=True, exist_ok=True)
        os.chown(home, acct.pw_uid, acct.pw_gid)
        os.chmod(home, 0o755)
    etc = root / "etc"
    (etc / "passwd").write_text("\n".join(passwd) + "\n")
    (etc / "shadow").write_text("\n".join(shadow) + "\n")
    os.chmod(etc / "shadow", 0o600)
    (etc / "group").write_text("".join(f"{name}:x:{gid}:{','.join(members)}\n"
                                       for gid, (name, members) in sorted(groups.items())))
    (etc / "shells").write_text("/bin/sh\n/bin/bash\n")
    (etc / "hosts").write_text("127.0.0.1 localhost\n")
    (etc / "nsswitch.conf").write_text("passwd: files\ngroup: files\nshadow: files\n"
                                       "hosts: files\n")
    (etc / "profile").write_text("export PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin\n")
    (etc / "grid-middleware-release").write_text(f"VO={vo} {MIDDLEWARE_VERSION}\n")
    if not sshd:
        (etc / "vmim-no-sshd").write_text("test image: sshd deliberately not started\n")


def make_disk(root: Path, qcow2: Path, mib: int = DISK_MIB,
              features: tuple[str, ...] = ("-O", "^metadata_csum,^has_journal")) -> None:
    """An ext4 file system (label vmimroot) made from the tree `root`, as a qcow2 image."""
    raw = qcow2.with_suffix(".raw")
    with open(raw, "wb") as handle:  # mkfs.ext4 -d wants the file to exist (else it says so)
        handle.truncate(mib * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-F", *features, "-L", "vmimroot", "-d", str(root),
                    str(raw)], check=True)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow2)], check=True)
    raw.unlink()


SYSLINUX_MBR = "/usr/lib/syslinux/mbr/mbr.bin"
BOOT_START = 2048  # sectors: where the first partition starts, as partitioning tools align it
BOOT_MIB = 40  # the FAT boot partition: bzImage (~8 MiB) and the uncompressed initramfs


def make_bootable_disk(root: Path, qcow2: Path, bzimage: Path, initrd: Path,
                       cmdline: str) -> None:
    """A disk that boots by itself, as a site's SL/EL cloud image does (no --kernel): an MBR
    partition table, boot code in the MBR, partition 1 FAT with SYSLINUX, the kernel, the
    initramfs and the boot loader's configuration (the kernel command line lives in the image),
    partition 2 the ext4 root file system. Made without mounting anything or loop devices:
    sfdisk, mkfs.vfat/mtools and `syslinux --offset` work on the file (EL images carry GRUB on
    an XFS or ext4 /boot instead; vmimagemanager only asks the firmware to boot the disk).
    """
    sector = 512
    boot_bytes = BOOT_MIB << 20
    root_offset = BOOT_START * sector + boot_bytes
    raw = qcow2.with_suffix(".raw")
    part = qcow2.with_suffix(".root")
    with open(part, "wb") as handle:
        handle.truncate(DISK_MIB << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "^metadata_csum,^has_journal", "-L",
                    "vmimroot", "-d", str(root), str(part)], check=True)
    with open(raw, "wb") as handle:
        handle.truncate(root_offset + (DISK_MIB << 20))
    layout = (f"label: dos\nunit: sectors\n"
              f"start={BOOT_START}, size={boot_bytes // sector}, type=c, bootable\n"
              f"start={root_offset // sector}, type=83\n")
    subprocess.run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(raw)],
                   input=layout, text=True, check=True)
    with open(raw, "r+b") as disk, open(part, "rb") as ext4:  # the root partition into place
        disk.seek(root_offset)
        shutil.copyfileobj(ext4, disk, 4 << 20)
        disk.seek(0)
        disk.write(Path(SYSLINUX_MBR).read_bytes()[:440])  # boot code only: keeps the table
    part.unlink()
    fat = f"{raw}@@{BOOT_START * sector}"
    subprocess.run(["mkfs.vfat", "-F", "16", "-n", "VMIMBOOT", "--offset", str(BOOT_START),
                    "-h", str(BOOT_START), str(raw), str(boot_bytes // 1024)],
                   check=True, capture_output=True)
    config = (f"SERIAL 0 115200\nDEFAULT linux\nPROMPT 0\nTIMEOUT 0\nLABEL linux\n"
              f"  KERNEL vmlinuz\n  INITRD initrd.img\n  APPEND {cmdline} root=/dev/vda2\n")
    cfg = qcow2.with_suffix(".cfg")
    cfg.write_text(config)
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    for source, name in [(bzimage, "vmlinuz"), (initrd, "initrd.img"), (cfg, "syslinux.cfg")]:
        subprocess.run(["mcopy", "-i", fat, str(source), f"::{name}"], check=True, env=env)
    cfg.unlink()
    subprocess.run(["syslinux", "--install", "--offset", str(BOOT_START * sector), str(raw)],
                   check=True, env=env)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow2)], check=True)
    raw.unlink()


# Where the compressed kernel starts in a bzImage, by compressor: the magic, and how to unpack
# it (Debian's linux-image-amd64 is XZ, linux-image-cloud-amd64 LZ4 in its legacy frame).
KERNEL_STREAMS = [(b"\xfd7zXZ\x00", None), (b"\x02\x21\x4c\x18", ["lz4", "-dc"]),
                  (b"\x28\xb5\x2f\xfd", ["zstd", "-dc"])]


def pvh_vmlinux(bzimage: bytes) -> bytes | None:
    """The uncompressed kernel inside a bzImage, if it is an ELF with a PVH entry.

    QEMU starts such a `vmlinux` directly at its PVH entry point: no firmware real-mode set-up
    and no decompression, which under TCG takes ~2.5 s of a ~5.5 s boot (FACTS). None if the
    compressor is not known here or the kernel has no PVH note (then the bzImage is used).
    The first of the known magics in the file marks the stream (a later one may be data).
    """
    found = [(bzimage.find(magic), magic, tool) for magic, tool in KERNEL_STREAMS]
    found = sorted((pos, magic, tool) for pos, magic, tool in found if pos >= 0)
    if not found:
        return None
    start, _magic, tool = found[0]
    try:
        if tool is None:
            elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(bzimage[start:])
        else:  # trailing data after the stream makes the tools complain: the ELF came out whole
            elf = subprocess.run(tool, input=bzimage[start:], capture_output=True).stdout
    except (lzma.LZMAError, OSError):
        return None
    return elf if elf.startswith(b"\x7fELF\x02\x01") and _has_pvh_note(elf) else None


def _has_pvh_note(elf: bytes) -> bool:
    """An ELF64 note "Xen" of type 18 (XEN_ELFNOTE_PHYS32_ENTRY): QEMU's PVH boot needs it."""
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", elf,
                                                                  phoff + i * phentsize)
        pos, end = p_offset, p_offset + p_filesz
        while p_type == 4 and pos + 12 <= end:  # PT_NOTE: namesz, descsz, type, name, desc
            namesz, descsz, n_type = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and n_type == 18:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def make_initramfs(release: str, target: Path, work: Path) -> None:
    root = work / "initramfs"
    (root / "bin").mkdir(parents=True)
    (root / "modules").mkdir()
    shutil.copy2("/bin/busybox", root / "bin/busybox")
    shutil.copy(HERE / "initramfs-init.sh", root / "init")
    os.chmod(root / "init", 0o755)
    moddir = Path(f"/lib/modules/{release}/kernel")
    found = {p.name.removesuffix(".ko").replace("-", "_"): p for p in moddir.rglob("*.ko")}
    order = []
    for mod in MODULES:
        if mod in found:
            shutil.copy2(found[mod], root / "modules" / f"{mod}.ko")
            order.append(mod)
    (root / "modules.order").write_text("\n".join(order) + "\n")
    files = subprocess.run(["find", ".", "-print0"], cwd=root, capture_output=True,
                           check=True).stdout
    cpio = subprocess.run(["cpio", "--null", "-o", "-H", "newc", "--quiet"], cwd=root,
                          input=files, capture_output=True, check=True).stdout
    target.write_bytes(cpio)  # uncompressed: gunzip under TCG took 0.1 s of every boot


def build(cache: Path, vos: list[str]) -> Path:
    release = kernel_release()
    accounts = pool_accounts(vos)
    sshd_root = unpacked_sshd(cache)
    out = cache / input_digest(vos, release, accounts, sshd_root)
    if (out / "manifest.json").exists():
        return out
    log(f"building {', '.join(vos)} images for kernel {release} into {out}")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vmim-build-", dir=cache) as tmp:
        work = Path(tmp)
        staging = work / "out"
        staging.mkdir()
        kernel = write_kernel(Path(f"/boot/vmlinuz-{release}"), staging)
        make_initramfs(release, staging / "initrd.img", work)
        images = {}
        variants = [(vo, vo, True) for vo in vos] + [(f"{vos[0]}-nossh", vos[0], False)]
        for name, vo, sshd in variants:
            root = work / f"root-{name}"
            make_rootfs(root, vo, accounts, sshd, sshd_root)
            make_disk(root, staging / f"{name}.qcow2")
            images[name] = {"disk": f"{name}.qcow2", "vo": vo, "sshd": sshd, "boot": "kernel"}
        # The first VO's image once more, as a disk that boots by itself (import it without
        # --kernel): its root file system is the same tree.
        disk_boot = f"{vos[0]}-diskboot"
        make_bootable_disk(work / f"root-{vos[0]}", staging / f"{disk_boot}.qcow2",
                           Path(f"/boot/vmlinuz-{release}"), staging / "initrd.img", CMDLINE)
        images[disk_boot] = {"disk": f"{disk_boot}.qcow2", "vo": vos[0], "sshd": True,
                             "boot": "disk"}
        manifest = {"kernel": kernel, "initrd": "initrd.img", "cmdline": CMDLINE,
                    "kernel_release": release, "images": images,
                    "accounts": [a.pw_name for a in accounts]}
        publish(staging, manifest, out)
    return out


def write_kernel(bzimage_path: Path | str, staging: Path) -> str:
    """The kernel into `staging`: its PVH vmlinux if it has one, else the bzImage; the name."""
    bzimage = Path(bzimage_path).read_bytes()
    vmlinux = pvh_vmlinux(bzimage)
    kernel = "vmlinux" if vmlinux else "vmlinuz"
    (staging / kernel).write_bytes(vmlinux or bzimage)
    return kernel


def publish(staging: Path, manifest: dict, out: Path) -> None:
    """Write the manifest, make everything world-readable, and move the build into the cache
    under its final name in one rename (a half-built directory is never found there)."""
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for path in staging.iterdir():
        os.chmod(path, 0o644)
    os.chmod(staging, 0o755)
    staging.rename(out)


def print_result(out: Path, as_json: bool) -> None:
    """The output directory, or its manifest with "dir" added (--json)."""
    if as_json:
        manifest = json.loads((out / "manifest.json").read_text())
        manifest["dir"] = str(out)
        print(json.dumps(manifest))
    else:
        print(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=os.environ.get("VMIM_TEST_IMAGE_CACHE", DEFAULT_CACHE))
    parser.add_argument("--vo", action="append", dest="vos")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    print_result(build(Path(args.cache), args.vos or list(DEFAULT_VOS)), args.json)


if __name__ == "__main__":
    main()
