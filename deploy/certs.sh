#!/usr/bin/env bash
# Makes the fleet CA (once) and a certificate per host, for the agents' mutual TLS.
#   deploy/certs.sh DIR HOST [SAN...]
# DIR/ca.pem + DIR/ca.key: the fleet CA (created if missing; keep ca.key off the hosts in production).
# DIR/HOST.pem + DIR/HOST.key: HOST's certificate, for both roles (serverAuth + clientAuth), naming HOST
# and every extra SAN (IP addresses or DNS names) that peers will dial. Idempotent: existing files are kept.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 DIR HOST [SAN...]" >&2; exit 2; }
dir=$1; host=$2; shift 2
mkdir -p "$dir"
umask 077
if [ ! -f "$dir/ca.pem" ]; then
  openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
    -keyout "$dir/ca.key" -out "$dir/ca.pem" -days 3650 -subj "/CN=migrate fleet CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  chmod 644 "$dir/ca.pem"
fi
if [ ! -f "$dir/$host.pem" ]; then
  san="DNS:$host"
  for s in "$@"; do
    if [[ $s =~ ^[0-9.]+$ || $s == *:* ]]; then san+=",IP:$s"; else san+=",DNS:$s"; fi
  done
  openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
    -keyout "$dir/$host.key" -out "$dir/$host.csr" -subj "/CN=$host" 2>/dev/null
  ext=$(mktemp)
  printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=%s\n' "$san" > "$ext"
  openssl x509 -req -in "$dir/$host.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial \
    -out "$dir/$host.pem" -days 825 -extfile "$ext" 2>/dev/null
  rm -f "$ext" "$dir/$host.csr"
  chmod 644 "$dir/$host.pem"
fi
