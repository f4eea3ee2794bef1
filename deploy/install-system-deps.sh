#!/usr/bin/env bash
# Installs the system packages vmreplica's demo and tests use, when they are missing:
# Java and Maven (to run Kafka from Maven Central jars), qemu-utils (qemu-img, qemu-io),
# nbdkit and libnbd-bin (nbdinfo, nbdcopy), fio, kcat, and prometheus (promtool).
# Debian/Ubuntu only; elsewhere it names what to install and exits non-zero.
set -euo pipefail

declare -A provides=(
  [java]=openjdk-17-jre-headless [mvn]=maven [qemu-img]=qemu-utils [qemu-io]=qemu-utils
  [nbdkit]=nbdkit [nbdinfo]=libnbd-bin [nbdcopy]=libnbd-bin [fio]=fio [kcat]=kcat
  [promtool]=prometheus [qemu-nbd]=qemu-utils
)
missing=()
for program in "${!provides[@]}"; do
  command -v "$program" >/dev/null 2>&1 || missing+=("${provides[$program]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
mapfile -t packages < <(printf '%s\n' "${missing[@]}" | sort -u)

if ! command -v apt-get >/dev/null 2>&1; then
  echo "vmreplica needs these packages (Debian names): ${packages[*]}; install them and retry." >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "need root to install: ${packages[*]}" >&2; exit 1; }
  sudo="sudo"
fi
echo "installing system packages: ${packages[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
