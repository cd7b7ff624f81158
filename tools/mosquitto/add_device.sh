#!/usr/bin/env bash
# Create the account of one client of the broker: an edge device or the cloud service.
#
#   add_device.sh [-d DAYS] DIR NAME
#
# DIR is the folder make_ca.sh filled (it must hold ca.crt and ca.key). NAME is the device id
# (the edge runs with `--device-id NAME`) or `pice-cloud` for the cloud service: the ACL gives
# each username exactly the topics named after it.
#
# Writes DIR/clients/NAME.crt, NAME.key (client certificate, CN=NAME) and NAME.password (mode
# 600), and adds NAME to DIR/passwd (mosquitto_passwd format; re-running replaces the entry).
# The password is PICE_DEVICE_PASSWORD when set, else 24 random bytes. Copy ca.crt and the
# three NAME.* files to the device; it reads the password from the file (--password-file) or
# from PICE_BROKER_PASSWORD, never from the command line.
set -euo pipefail

days=825
while getopts "d:" opt; do
    case "$opt" in
        d) days="$OPTARG" ;;
        *) echo "usage: $0 [-d DAYS] DIR NAME" >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
if [ "$#" -ne 2 ]; then
    echo "usage: $0 [-d DAYS] DIR NAME" >&2
    exit 2
fi
dir="$1"
name="$2"
# Device ids are also topic levels; ':' is allowed in PICE ids but not in a Mosquitto username.
if ! [[ "$name" =~ ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$ ]]; then
    echo "$0: '$name' is not a usable device id (1-64 characters of A-Z a-z 0-9 . _ -)" >&2
    exit 2
fi
[ -f "$dir/ca.crt" ] && [ -f "$dir/ca.key" ] || { echo "$0: no CA in $dir; run make_ca.sh first" >&2; exit 1; }
command -v openssl >/dev/null || { echo "$0: openssl is not installed (apt-get install openssl)" >&2; exit 1; }
passwd_tool="$(command -v mosquitto_passwd || true)"
[ -n "$passwd_tool" ] || { echo "$0: mosquitto_passwd is missing (apt-get install mosquitto)" >&2; exit 1; }

umask 077
mkdir -p "$dir/clients"
out="$dir/clients/$name"
ext="$(mktemp)"
trap 'rm -f "$ext" "$out.csr"' EXIT
printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' >"$ext"
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$out.key" -out "$out.csr" \
    -subj "/CN=$name" 2>/dev/null
openssl x509 -req -in "$out.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial -out "$out.crt" \
    -days "$days" -extfile "$ext" 2>/dev/null

password="${PICE_DEVICE_PASSWORD:-$(openssl rand -base64 24)}"
printf '%s' "$password" >"$out.password"
# -b takes the password as an argument: run this on the CA machine, not on a shared host.
if [ -f "$dir/passwd" ]; then
    "$passwd_tool" -b "$dir/passwd" "$name" "$password"
else
    "$passwd_tool" -c -b "$dir/passwd" "$name" "$password"
fi
chmod 644 "$out.crt"
echo "account $name: $out.crt, $out.key, $out.password; entry added to $dir/passwd" >&2
