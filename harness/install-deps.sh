#!/usr/bin/env bash
# Installs every Debian and PyPI package vmimagemanager, its tests and its demo need on a fresh
# Debian 12 machine (root). Idempotent: a second run installs nothing new.
#
# gridengine's postinst tries to start its daemons through invoke-rc.d and fails without an init
# system; a temporary policy-rc.d (exit 101 = "action forbidden") keeps apt from starting anything.
# We start the daemons ourselves (harness/sge-cell.sh, harness/libvirt-up.sh).
set -euo pipefail

APT_PACKAGES=(
  qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-dev pkg-config gcc
  gridengine-master gridengine-exec gridengine-client
  busybox-static openssh-client linux-image-amd64 e2fsprogs cpio genisoimage mmdebstrap lz4
  syslinux syslinux-common mtools dosfstools fdisk socat
  globus-gatekeeper globus-gram-job-manager globus-gram-job-manager-sge
  globus-gram-job-manager-sge-setup-poll globus-gram-client-tools globus-proxy-utils
  globus-simple-ca globus-gass-copy-progs globus-gram-job-manager-fork
  globus-gram-job-manager-fork-setup-poll
  nordugrid-arc-arex nordugrid-arc-arcctl nordugrid-arc-client nordugrid-arc-plugins-needed
  prometheus-node-exporter
  debhelper dh-python python3-all python3-setuptools python3-libvirt python3-lxml python3-yaml
  rpm cpio
  slurm-wlm munge libslurm-dev
  time iproute2 procps psmisc python3-venv python3-dev
  systemd-container  # systemd-nspawn: the shipped units under a real systemd (tests/cell/test_systemd.py)
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
  host=$(hostname)
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq debconf-utils >/dev/null
  debconf-set-selections <<SEL
gridengine-common shared/gridengineconfig boolean true
gridengine-common shared/gridenginecell string default
gridengine-common shared/gridenginemaster string $host
gridengine-master shared/gridengineconfig boolean true
gridengine-master shared/gridenginecell string default
gridengine-master shared/gridenginemaster string $host
gridengine-client shared/gridengineconfig boolean true
gridengine-client shared/gridenginecell string default
gridengine-client shared/gridenginemaster string $host
SEL
  policy=/usr/sbin/policy-rc.d
  had_policy=0; [ -e "$policy" ] && had_policy=1 && cp -a "$policy" "$policy.vmim-saved"
  printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod 755 "$policy"
  trap 'if [ $had_policy = 1 ]; then mv -f "$policy.vmim-saved" "$policy"; else rm -f "$policy"; fi' EXIT
  echo "install-deps: apt-get install ${missing[*]}" >&2
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The Python package goes into a venv built from Debian's /usr/bin/python3 under /opt: the SGE
# starter_method runs as the job's pool account, which must be able to execute the interpreter
# (a pyenv under /root, mode 0700, is out of its reach). libvirt-python compiles against libvirt-dev.
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${VMIM_VENV:-/opt/vmimagemanager}
[ -x "$venv/bin/python" ] || /usr/bin/python3 -m venv "$venv"
pipq() { "$venv/bin/python" -m pip -q --disable-pip-version-check "$@"; }
"$venv/bin/python" -c 'import libvirt, lxml, yaml, pytest, hypothesis, wheel' 2>/dev/null \
  || pipq install "libvirt-python>=9.0" "lxml>=4.9" "PyYAML>=6.0" pytest hypothesis ruff wheel "setuptools>=61"
# A plain (non-editable) install: the code the hooks run is a copy every user can read, whatever the
# permissions of the checkout.
pipq install --no-deps --no-build-isolation --force-reinstall "$here"
# The admin commands on root's PATH (README): links to the venv's entry points.
for cmd in vmimagemanager vmim-sge-prolog vmim-sge-starter vmim-sge-epilog; do
  ln -sfn "$venv/bin/$cmd" "/usr/local/bin/$cmd"
done
