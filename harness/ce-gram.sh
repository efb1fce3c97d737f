#!/usr/bin/env bash
# A Globus GRAM5 compute element on this node (the lcg-CE's lineage), unchanged, in front of the
# gridengine cell: a test CA (globus-simple-ca), the host certificate, a user certificate for each
# pool account given (its Grid identity, mapped in the grid-mapfile), the gatekeeper on port 2119
# with jobmanager-sge submitting to QUEUE. Only CE-side configuration is written
# (/etc/globus/globus-sge.conf's default_queue, the grid-mapfile, /etc/grid-services); no file of
# the CE's software is changed. Clients contact it on this host's name, which is 127.0.0.1.
#   harness/ce-gram.sh up [QUEUE [USER...]]   (default: vm.q atlas001 cms001)
#   harness/ce-gram.sh proxy USER             a fresh proxy for USER (prints its path)
#   harness/ce-gram.sh down                   stop the gatekeeper (CA and certificates stay)
# Facts behind each step: ../shared/FACTS.md ("The real Globus GRAM CE").
set -euo pipefail
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
ca_dir=/var/lib/vmim-ce/simpleCA
ca_pass=globus  # a throw-away test CA on a test machine
security=/etc/grid-security
host=$(hostname)
gatekeeper_env=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin)

mkdir -p /var/lib/vmim-ce && cd /var/lib/vmim-ce  # grid-cert-request leaves openssl_req.log in the cwd
ca_hash() { openssl x509 -noout -hash -in "$ca_dir/cacert.pem"; }
sign() { grid-ca-sign -in "$1" -out "$2" -force -passin "pass:$ca_pass" -dir "$ca_dir" >/dev/null; }
dn() { grid-cert-info -subject -file "$1"; }
running() { /etc/init.d/globus-gatekeeper status >/dev/null 2>&1; }
user_home() { getent passwd "$1" | cut -d: -f6; }

make_ca() {
  [ -f "$ca_dir/cacert.pem" ] && [ -f "$security/certificates/$(ca_hash).0" ] && return
  rm -rf "$ca_dir"; mkdir -p "$(dirname "$ca_dir")"
  grid-ca-create -noint -nobuild -bits 2048 -pass "$ca_pass" -dir "$ca_dir" \
    -subject "cn=vmimagemanager test CA, ou=GlobusTest, o=Grid" >/dev/null
  echo "ce-gram: test CA $(ca_hash) made in $ca_dir" >&2
}

make_host_cert() {
  if [ -f "$security/hostcert.pem" ] && openssl verify -CApath "$security/certificates" \
       "$security/hostcert.pem" >/dev/null 2>&1 \
     && [ "$(dn "$security/hostcert.pem" | sed 's|.*/CN=||')" = "host/$host" ]; then
    return
  fi
  echo y | grid-cert-request -host "$host" -ca "$(ca_hash)" -force >/dev/null 2>&1
  sign "$security/hostcert_request.pem" "$security/hostcert.pem"
  chmod 644 "$security/hostcert.pem"; chmod 400 "$security/hostkey.pem"
}

make_user_cert() {
  local user=$1 home; home=$(user_home "$user")
  [ -n "$home" ] || { echo "ce-gram: no user $user" >&2; exit 1; }
  local cert=$home/.globus/usercert.pem
  if ! { [ -f "$cert" ] && openssl verify -CApath "$security/certificates" "$cert" >/dev/null 2>&1; }; then
    runuser -u "$user" -- grid-cert-request -nopw -cn "$user" -ca "$(ca_hash)" -force >/dev/null 2>&1
    sign "$home/.globus/usercert_request.pem" "$cert"
    chown "$user:" "$cert"; chmod 644 "$cert"
  fi
  local subject; subject=$(dn "$cert")
  grep -qF "\"$subject\"" "$security/grid-mapfile" 2>/dev/null \
    || echo "\"$subject\" $user" >> "$security/grid-mapfile"
}

proxy() {
  local user=$1 out
  out=$(runuser -u "$user" -- grid-proxy-init -rfc -valid 12:00 -q 2>&1) \
    || { echo "ce-gram: grid-proxy-init as $user failed: $out" >&2; exit 1; }
  echo "/tmp/x509up_u$(id -u "$user")"
}

ce_up() {
  local queue=${1:-vm.q}; shift || true
  local users=("$@"); [ ${#users[@]} -gt 0 ] || users=(atlas001 cms001)
  [[ "$queue" =~ ^[A-Za-z0-9_.-]+$ ]] || { echo "ce-gram: bad queue name $queue" >&2; exit 2; }
  command -v globus-gatekeeper >/dev/null || [ -x /usr/sbin/globus-gatekeeper ] \
    || { echo "ce-gram: globus-gatekeeper missing; run harness/install-deps.sh" >&2; exit 1; }
  make_ca
  make_host_cert
  touch "$security/grid-mapfile"; chmod 644 "$security/grid-mapfile"
  for user in "${users[@]}"; do make_user_cert "$user"; done
  # jobmanager-sge for the batch jobs; the default service ("jobmanager") is the fork job
  # manager, as on every lcg-CE: globus-job-get-output reads a job's files through it.
  globus-gatekeeper-admin -e jobmanager-sge-poll -n jobmanager-sge >/dev/null 2>&1 || true
  globus-gatekeeper-admin -e jobmanager-fork-poll -n jobmanager >/dev/null 2>&1 || true
  for service in jobmanager-sge jobmanager; do
    [ -e "/etc/grid-services/$service" ] \
      || { echo "ce-gram: $service could not be enabled" >&2; exit 1; }
  done
  local conf=/etc/globus/globus-sge.conf
  # A user's job manager lives on between jobs and read this file when it started: one still
  # running from an earlier set-up would submit to the old queue
  grep -qx "default_queue=\"$queue\"" "$conf" || pkill -x globus-job-manager || true
  if grep -q '^default_queue=' "$conf"; then
    sed -i "s|^default_queue=.*|default_queue=\"$queue\"|" "$conf"
  else
    echo "default_queue=\"$queue\"" >> "$conf"
  fi
  running || "${gatekeeper_env[@]}" /etc/init.d/globus-gatekeeper start >/dev/null
  for _ in $(seq 1 50); do
    (exec 3<>"/dev/tcp/127.0.0.1/2119") 2>/dev/null && break; sleep 0.2
  done
  (exec 3<>"/dev/tcp/127.0.0.1/2119") 2>/dev/null \
    || { echo "ce-gram: the gatekeeper does not listen on 2119; see /var/log/globus-gatekeeper.log" >&2; exit 1; }
  echo "ce-gram: gatekeeper up on $host:2119, jobmanager-sge -> $queue, users ${users[*]}" >&2
}

case "${1:-}" in
  up) shift; ce_up "$@" ;;
  proxy) proxy "${2:?usage: ce-gram.sh proxy USER}" ;;
  down) "${gatekeeper_env[@]}" /etc/init.d/globus-gatekeeper stop >/dev/null 2>&1 || true
        pkill -x globus-job-manager || true
        echo "ce-gram: gatekeeper stopped" >&2 ;;
  *) echo "usage: ce-gram.sh up [QUEUE [USER...]] | proxy USER | down" >&2; exit 2 ;;
esac
