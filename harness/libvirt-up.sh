#!/usr/bin/env bash
# Starts virtlogd and libvirtd if they are not running (no systemd here) and checks that
# qemu:///system answers. Never starts libvirt's "default" network (192.168.122.0/24): tests may
# only talk to 127.0.0.0/8. Idempotent; used by the tests, CI and the demo.
set -euo pipefail
export PATH=/usr/sbin:/usr/bin:/sbin:/bin

if [ -e /etc/libvirt/qemu/networks/autostart/default.xml ]; then
  rm -f /etc/libvirt/qemu/networks/autostart/default.xml  # never autostart 192.168.122.0/24
fi
# Shared home directories (shared_paths, mode hypervisor): with 9p passthrough a pool account
# writes files in its home owned by itself only if QEMU runs as root (Debian's default user
# libvirt-qemu cannot write into users' homes). A host-wide libvirt choice, made here for the
# tests and the demo; docs/shared-storage.md explains what it means for a site.
conf=/etc/libvirt/qemu.conf
restart=0
if ! grep -q '^user = "root"' "$conf" || ! grep -q '^group = "root"' "$conf"; then
  sed -i -e '/^user = /d' -e '/^group = /d' "$conf"
  printf '\n# vmimagemanager harness: QEMU as root for 9p shared homes\nuser = "root"\ngroup = "root"\n' >> "$conf"
  echo "libvirt-up: $conf: QEMU now runs as root (9p shared homes)" >&2
  restart=1
fi
mkdir -p /run/libvirt
pgrep -x virtlogd >/dev/null || virtlogd -d
if [ "$restart" = 1 ] && pgrep -x libvirtd >/dev/null; then
  pkill -x libvirtd
  for _ in $(seq 1 50); do pgrep -x libvirtd >/dev/null || break; sleep 0.2; done
fi
if ! pgrep -x libvirtd >/dev/null; then
  libvirtd -d
fi
for _ in $(seq 1 50); do
  if virsh -c qemu:///system version >/dev/null 2>&1; then
    echo "libvirt-up: qemu:///system is answering" >&2
    exit 0
  fi
  sleep 0.2
done
echo "libvirt-up: libvirtd started but qemu:///system does not answer; see /var/log/libvirt/libvirtd.log" >&2
exit 1
