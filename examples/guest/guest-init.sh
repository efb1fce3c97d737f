#!/bin/sh
# /sbin/init of the vmimagemanager test worker-node image (busybox).
# Does what a site's SL worker node does at boot, in miniature: network, contextualisation from the
# NoCloud seed (host name, authorised keys, mounts), ssh host key printed on the console, sshd.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /run /tmp
mount -t devpts -o gid=5,mode=620 devpts /dev/pts
mount -t tmpfs -o mode=0755 tmpfs /run
chmod 1777 /tmp
hostname localhost

ip link set lo up
ip link set eth0 up 2>/dev/null
ip addr add 10.0.2.15/24 dev eth0 2>/dev/null
ip route add default via 10.0.2.2 2>/dev/null

# --- contextualisation: the NoCloud seed disk (label cidata) ---------------------------------
mkdir -p /run/seed
for dev in /dev/vdb /dev/vdc /dev/sr0; do
  [ -b "$dev" ] || continue
  mount -t iso9660 -o ro "$dev" /run/seed 2>/dev/null && [ -f /run/seed/user-data ] && break
  umount /run/seed 2>/dev/null
done
if [ -f /run/seed/meta-data ]; then
  name=$(awk -F': *' '$1=="local-hostname" {print $2}' /run/seed/meta-data | tr -d "'\"")
  [ -n "$name" ] && hostname "$name" && echo "$name" > /etc/hostname
fi
if [ -f /run/seed/user-data ]; then
  # users: - name: U / ssh_authorized_keys: - KEY  ->  U<TAB>KEY lines
  awk '
    /^[^ -]/ { section = $1 }
    section == "users:" && /^- name:/ { user = $3; next }
    section == "users:" && /^  - / { sub(/^  - /, ""); gsub(/^'"'"'|'"'"'$/, ""); print user "\t" $0 }
  ' /run/seed/user-data > /run/keys.tsv
  # Keys go to /etc/ssh/authorized_keys/USER (sshd_config AuthorizedKeysFile), never to ~/.ssh:
  # home directories may be the user's real, shared home (virtiofs, 9p or the site's file system).
  while IFS="	" read -r user key; do
    grep -q "^$user:" /etc/passwd || { echo "vmim-init: no account $user in this image"; continue; }
    echo "$key" >> "/etc/ssh/authorized_keys/$user"
    chmod 644 "/etc/ssh/authorized_keys/$user"
  done < /run/keys.tsv
  # mounts: - - TAG / - /path / - virtiofs or 9p / - options  ->  one mount each
  awk '
    /^[^ -]/ { section = $1 }
    section == "mounts:" && /^- - / { if (n) print f[1], f[2], f[3], f[4]; n = 1; f[1] = $3; next }
    section == "mounts:" && /^  - / { n++; v = $2; gsub(/'"'"'/, "", v); f[n] = v }
    END { if (n) print f[1], f[2], f[3], f[4] }
  ' /run/seed/user-data > /run/mounts.txt
  while read -r what where type opts; do
    mkdir -p "$where"
    mount -t "$type" -o "$opts" "$what" "$where" && echo "vmim-init: mounted $what on $where" \
      || echo "vmim-init: mounting $what on $where failed"
  done < /run/mounts.txt
fi

# --- sshd ---------------------------------------------------------------------------------------
if [ -x /usr/sbin/sshd ] && [ ! -e /etc/vmim-no-sshd ]; then
  rm -f /etc/ssh/ssh_host_ed25519_key /etc/ssh/ssh_host_ed25519_key.pub
  ssh-keygen -q -t ed25519 -N '' -C '' -f /etc/ssh/ssh_host_ed25519_key
  # The cloud-init convention: the host can pin the key from the console log.
  echo "-----BEGIN SSH HOST KEY KEYS-----"
  cut -d' ' -f1,2 /etc/ssh/ssh_host_ed25519_key.pub
  echo "-----END SSH HOST KEY KEYS-----"
  mkdir -p /run/sshd && chmod 755 /run/sshd
  # -r: no re-exec of sshd per connection (0.5 s per login under TCG); a test-image choice
  /usr/sbin/sshd -r -E /var/log/sshd.log
  echo "vmim-init: sshd started"
else
  echo "vmim-init: this image starts no sshd"
fi
echo "vmim-init: $(cat /etc/grid-middleware-release) ready on $(hostname)"
while true; do sleep 3600; done
