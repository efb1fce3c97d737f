#!/usr/bin/env bash
# Creates the test Grid pool accounts on the host, as a site's YAIM users.conf would:
#   group atlas (5000): atlas001..atlas003 (5001..), atlassgm (5050)
#   group cms   (5100): cms001..cms003 (5101..)
#   group dteam (5200): dteam001 (5201), mapped to no VO in the test configuration
# Fixed uids/gids so that the guest images carry the same ones. Idempotent.
set -euo pipefail

add_group() { getent group "$1" >/dev/null || groupadd -g "$2" "$1"; }
add_user() {  # name uid group
  getent passwd "$1" >/dev/null && return 0
  useradd -m -u "$2" -g "$3" -s /bin/bash -c "Grid pool account $1" "$1"
}

add_group atlas 5000
add_group cms 5100
add_group dteam 5200
for i in 1 2 3; do
  add_user "atlas00$i" $((5000 + i)) atlas
  add_user "cms00$i" $((5100 + i)) cms
done
add_user atlassgm 5050 atlas
add_user dteam001 5201 dteam
