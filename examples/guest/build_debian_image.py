#!/usr/bin/env python3
"""Build a real Debian 12 worker-node image: systemd, real cloud-init (NoCloud), OpenSSH.

What a site's SL/EL worker-node image is, made from Debian's packages with mmdebstrap: the pool
accounts with the host's uids/gids, keys outside the homes (`AuthorizedKeysFile
/etc/ssh/authorized_keys/%u`; cloud-init writes the seed's keys there), `datasource_list:
[NoCloud, None]`, no pre-made host keys (cloud-init makes one and prints it on the console), the
VO marker /etc/grid-middleware-release. The boot recipe that cuts its start (docs/images.md):
the kernel as an uncompressed PVH vmlinux, one host key type, only the cloud-init modules a
batch VM needs, and the services it does not need masked.

The output is cached under a hash of everything that goes into it. Needs mmdebstrap and a Debian
mirror (the host's apt sources). Usage: build_debian_image.py [--cache DIR] [--vo atlas] [--json]
"""

from __future__ import annotations

import argparse
import glob
import grp
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from build_images import (
    DEFAULT_CACHE,
    MIDDLEWARE_VERSION,
    make_disk,
    pool_accounts,
    print_result,
    publish,
    write_kernel,
)

SUITE = "bookworm"
PACKAGES = ["systemd-sysv", "udev", "openssh-server", "cloud-init", "ifupdown",
            "isc-dhcp-client", "netbase", "iproute2", "linux-image-amd64",
            "initramfs-tools", "kmod", "procps", "bash",
            "time"]  # GNU time: ARC's job wrapper measures the payload with it
CMDLINE = "root=/dev/vda rw console=ttyS0 quiet"
DISK_MIB = 2048
SSHD_CONFIG = """\
# vmimagemanager: keys outside the (shared) home directories; cloud-init writes them here
AuthorizedKeysFile /etc/ssh/authorized_keys/%u
PasswordAuthentication no
KbdInteractiveAuthentication no
"""
CLOUD_CFG = """\
# vmimagemanager: the seed is NoCloud (a cidata disk); nothing else is asked for
datasource_list: [NoCloud, None]
# one host key type, printed on the console (the host pins it from there)
ssh_genkeytypes: [ed25519]
ssh_deletekeys: true
ssh_fp_console_blacklist: []
ssh_key_console_blacklist: []
disable_root: false  # root logs in with the node's admin key (never a job)
# Only what a batch VM needs. The host key goes to the console right after the shares are
# mounted (config stage): it is the host's sign that the VM is ready; the final stage (4.5 s
# under TCG) is not waited for. (Mounting in the first stage, to print the key even earlier,
# failed: "Activate mounts: FAIL:mount -a".)
cloud_init_modules: [seed_random, bootcmd, write-files, set_hostname, update_hostname,
                     update_etc_hosts, users-groups, ssh]
cloud_config_modules: [mounts, keys-to-console, runcmd]
cloud_final_modules: [scripts-user, final-message]
"""
# Units a throwaway batch VM never needs (timers for a long-lived system, consoles, logs on disk).
MASKED = ["apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer",
          "e2scrub_reap.service", "fstrim.timer", "man-db.timer", "dpkg-db-backup.timer",
          "logrotate.timer", "systemd-tmpfiles-clean.timer", "getty@tty1.service",
          "serial-getty@ttyS0.service", "systemd-timesyncd.service", "cron.service"]
INTERFACES = """\
auto lo
iface lo inet loopback
# cloud-init writes the NIC's DHCP configuration here
source /etc/network/interfaces.d/*
"""


def log(msg: str) -> None:
    print(f"build-debian-image: {msg}", file=sys.stderr, flush=True)


def input_digest(vo: str, accounts) -> str:
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update((Path(__file__).parent / "build_images.py").read_bytes())
    h.update(repr((SUITE, PACKAGES, CMDLINE, DISK_MIB, vo,
                   [tuple(a) for a in accounts])).encode())
    return "debian-" + h.hexdigest()[:16]


def customize(root: Path, vo: str, accounts) -> None:
    """The image's configuration, written into the unpacked tree."""
    etc = root / "etc"
    # In sshd_config itself: cloud-init 22.4 looks for AuthorizedKeysFile there only (not in
    # sshd_config.d), and would otherwise write the keys to ~/.ssh (seen: "Permission denied").
    with open(etc / "ssh/sshd_config", "a") as f:
        f.write(SSHD_CONFIG)
    (etc / "ssh/authorized_keys").mkdir(exist_ok=True)
    for key in glob.glob(str(etc / "ssh/ssh_host_*")):
        os.unlink(key)
    (etc / "cloud/cloud.cfg.d/90-vmimagemanager.cfg").write_text(CLOUD_CFG)
    (etc / "network/interfaces").write_text(INTERFACES)
    (etc / "grid-middleware-release").write_text(f"VO={vo} {MIDDLEWARE_VERSION}\n")
    (etc / "hostname").write_text("localhost\n")
    for unit in MASKED:
        link = etc / "systemd/system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    groups = {}
    for acct in accounts:
        groups.setdefault(acct.pw_gid, grp.getgrgid(acct.pw_gid).gr_name)
    with open(etc / "group", "a") as f:
        f.writelines(f"{name}:x:{gid}:\n" for gid, name in sorted(groups.items()))
    with open(etc / "passwd", "a") as f:
        f.writelines(f"{a.pw_name}:x:{a.pw_uid}:{a.pw_gid}:{a.pw_gecos}:{a.pw_dir}:/bin/bash\n"
                     for a in accounts)
    with open(etc / "shadow", "a") as f:
        f.writelines(f"{a.pw_name}:*:19000:0:99999:7:::\n" for a in accounts)
    for acct in accounts:
        home = root / acct.pw_dir.lstrip("/")
        home.mkdir(parents=True, exist_ok=True)
        os.chown(home, acct.pw_uid, acct.pw_gid)


def build(cache: Path, vo: str) -> Path:
    accounts = pool_accounts([vo])
    out = cache / input_digest(vo, accounts)
    if (out / "manifest.json").exists():
        return out
    if shutil.which("mmdebstrap") is None:
        sys.exit("build-debian-image: mmdebstrap is not installed (apt-get install mmdebstrap)")
    cache.mkdir(parents=True, exist_ok=True)
    log(f"building a Debian {SUITE} image for {vo} into {out} (a few minutes)")
    with tempfile.TemporaryDirectory(prefix="vmim-debian-", dir=cache) as tmp:
        work = Path(tmp)
        root = work / "root"
        sources = [str(p) for p in Path("/etc/apt/sources.list.d").glob("*.sources")] or ["-"]
        subprocess.run(["mmdebstrap", "--quiet", "--mode=root", "--variant=minbase",
                        f"--include={','.join(PACKAGES)}", SUITE, str(root), sources[0]],
                       check=True, stdin=subprocess.DEVNULL)
        customize(root, vo, accounts)
        staging = work / "out"
        staging.mkdir()
        (vmlinuz,) = glob.glob(str(root / "boot/vmlinuz-*"))
        (initrd,) = glob.glob(str(root / "boot/initrd.img-*"))
        kernel = write_kernel(vmlinuz, staging)
        shutil.copy2(initrd, staging / "initrd.img")
        make_disk(root, staging / "disk.qcow2", DISK_MIB, features=())
        publish(staging, {"kernel": kernel, "initrd": "initrd.img", "cmdline": CMDLINE,
                          "disk": "disk.qcow2", "vo": vo, "suite": SUITE,
                          "accounts": [a.pw_name for a in accounts]}, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=os.environ.get("VMIM_TEST_IMAGE_CACHE", DEFAULT_CACHE))
    parser.add_argument("--vo", default="atlas")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    print_result(build(Path(args.cache), args.vo), args.json)


if __name__ == "__main__":
    main()
