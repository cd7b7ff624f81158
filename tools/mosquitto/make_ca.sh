#!/usr/bin/env bash
# Create (or reuse) a certificate authority and issue the broker's TLS certificate.
#
#   make_ca.sh [-d DAYS] DIR BROKER_NAME [MORE_NAMES...]
#
# DIR receives ca.key (keep it offline in production), ca.crt (give it to every client),
# server.key and server.crt (for the broker). BROKER_NAME and MORE_NAMES are the host names
# or IP addresses clients use to reach the broker; they go into the certificate's
# subjectAltName, which clients verify.
#
# A throw-away CA (tests, a lab): just run it on an empty DIR. A real CA: put its ca.crt and
# ca.key into DIR first; they are reused, never overwritten.
set -euo pipefail

days=825
while getopts "d:" opt; do
    case "$opt" in
        d) days="$OPTARG" ;;
        *) echo "usage: $0 [-d DAYS] DIR BROKER_NAME [MORE_NAMES...]" >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
if [ "$#" -lt 2 ]; then
    echo "usage: $0 [-d DAYS] DIR BROKER_NAME [MORE_NAMES...]" >&2
    exit 2
fi
dir="$1"; shift
command -v openssl >/dev/null || { echo "$0: openssl is not installed (apt-get install openssl)" >&2; exit 1; }
mkdir -p "$dir"
umask 077

if [ -f "$dir/ca.crt" ] && [ -f "$dir/ca.key" ]; then
    echo "reusing the CA in $dir/ca.crt" >&2
else
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$dir/ca.key" -out "$dir/ca.crt" -days "$days" -subj "/CN=PICE fleet CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    echo "created CA $dir/ca.crt" >&2
fi

san=""
for name in "$@"; do
    if [[ "$name" =~ ^[0-9.]+$ || "$name" == *:* ]]; then
        san="${san:+$san,}IP:$name"
    else
        san="${san:+$san,}DNS:$name"
    fi
done
ext="$(mktemp)"
trap 'rm -f "$ext" "$dir/server.csr"' EXIT
printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=%s\n' \
    "$san" >"$ext"
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$dir/server.key" \
    -out "$dir/server.csr" -subj "/CN=$1" 2>/dev/null
openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -out "$dir/server.crt" -days "$days" -extfile "$ext" 2>/dev/null
chmod 644 "$dir/ca.crt" "$dir/server.crt"
echo "issued broker certificate $dir/server.crt for $san" >&2
