#!/bin/busybox sh
# initramfs /init: load the virtio, ext4, iso9660 and 9p modules (Debian builds them as modules),
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
for i in $(seq 1 50); do [ -b /dev/vda ] && break; sleep 0.1; done
if ! mount -t ext4 /dev/vda /newroot; then
  echo "vmim-initramfs: cannot mount /dev/vda; powering off"
  poweroff -f
fi
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/init
