#!/usr/bin/env bash
# Starts virtlogd and libvirtd if they are not running (no systemd here) and checks that
# qemu:///system answers. Never starts libvirt's "default" network (192.168.122.0/24): tests may
# only talk to 127.0.0.0/8. Idempotent; used by the tests, CI and the demo.
set -euo pipefail
export PATH=/usr/sbin:/usr/bin:/sbin:/bin

if [ -e /etc/libvirt/qemu/networks/autostart/default.xml ]; then
  rm -f /etc/libvirt/qemu/networks/autostart/default.xml  # never autostart 192.168.122.0/24
fi
mkdir -p /run/libvirt
pgrep -x virtlogd >/dev/null || virtlogd -d
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
