#!/bin/busybox sh
# initramfs /init: load the virtio, ext4, iso9660, 9p and virtiofs modules (Debian builds them as modules),
# mount the disk image as root and hand over to its /sbin/init.
/bin/busybox mkdir -p /proc /sys /dev /newroot /sbin /usr/bin /usr/sbin
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read -r mod; do
  insmod "/modules/$mod.ko" 2>/dev/null
done < /modules.order
# root=DEVICE on the kernel command line (a disk-boot image's partition), else the whole disk
root=/dev/vda
for arg in $(cat /proc/cmdline); do
  case "$arg" in root=/dev/*) root="${arg#root=}" ;; esac
done
for i in $(seq 1 50); do [ -b "$root" ] && break; sleep 0.1; done
if ! mount -t ext4 "$root" /newroot; then
  echo "vmim-initramfs: cannot mount $root; powering off"
  poweroff -f
fi
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/init
