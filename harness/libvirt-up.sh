#!/usr/bin/env bash
# Starts virtlogd and libvirtd if they are not running (no systemd here) and checks that
# qemu:///system answers. Never starts libvirt's "default" network (192.168.122.0/24): tests may
# only talk to 127.0.0.0/8. Idempotent; used by the tests, CI and the demo.
set -euo pipefail
export PATH=/usr/sbin:/usr/bin:/sbin:/bin

if [ -e /etc/libvirt/qemu/networks/autostart/default.xml ]; then
  rm -f /etc/libvirt/qemu/networks/autostart/default.xml  # never autostart 192.168.122.0/24
fi
# QEMU runs as the distribution's unprivileged user (libvirt-qemu): never root. A user/group
# line in qemu.conf (an earlier harness set QEMU to root for 9p-shared homes) is taken out;
# owners' homes are served by a virtiofsd running as the owner (vmimagemanager/homeserver.py).
conf=/etc/libvirt/qemu.conf
restart=0
if grep -q -E '^(user|group) = ' "$conf"; then
  sed -i -e '/^# vmimagemanager harness: QEMU as root/d' -e '/^user = /d' -e '/^group = /d' "$conf"
  echo "libvirt-up: $conf: QEMU runs as the distribution's default user again" >&2
  restart=1
fi
mkdir -p /run/libvirt
pgrep --ns $$ --nslist pid,mnt -x virtlogd >/dev/null || virtlogd -d
if [ "$restart" = 1 ] && pgrep --ns $$ --nslist pid,mnt -x libvirtd >/dev/null; then
  pkill --ns $$ --nslist pid,mnt -x libvirtd
  for _ in $(seq 1 50); do pgrep --ns $$ --nslist pid,mnt -x libvirtd >/dev/null || break; sleep 0.2; done
fi
if ! pgrep --ns $$ --nslist pid,mnt -x libvirtd >/dev/null; then
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
