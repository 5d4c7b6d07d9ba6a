#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine for Capsule: Debian packages (installed when root, listed
# otherwise), npm dependencies (npm ci; better-sqlite3 compiles), and the build (dist/).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

# command-or-file -> Debian package that provides it
declare -A NEED=(
  [nft]=nftables [wg]=wireguard-tools [wireguard-go]=wireguard-go [ip]=iproute2
  [conntrack]=conntrack [caddy]=caddy [runc]=runc [containerd]=containerd
  [busybox]=busybox-static [openssl]=openssl [unshare]=util-linux [nsenter]=util-linux
  [g++]=g++ [make]=make [python3]=python3 [curl]=curl [socat]=socat [iperf3]=iperf3
  [docker-registry]=docker-registry [dnsmasq]=dnsmasq-base [haproxy]=haproxy [wrk]=wrk
  [qemu-system-x86_64]=qemu-system-x86 [cpio]=cpio [qemu-ga]=qemu-guest-agent
  [iscsiadm]=open-iscsi [dmsetup]=dmsetup [thin_check]=thin-provisioning-tools [depmod]=kmod
  [gcc-12]=gcc-12 [xz]=xz-utils
)
missing=()
for cmd in "${!NEED[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$cmd" >/dev/null 2>&1 || missing+=("${NEED[$cmd]}")
done
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u | sed '/^$/d')
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup: missing Debian packages: ${missing[*]}" >&2
    echo "setup: run as root, or install them: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi

node_major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$node_major" -lt 20 ]; then
  echo "setup: Node.js >= 20 is required (found $(node --version))" >&2
  exit 1
fi

if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "setup: npm ci"
  npm ci --no-audit --no-fund --loglevel=error
fi
echo "setup: build"
npm run --silent build
echo "setup: ok"
