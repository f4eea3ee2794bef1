#!/usr/bin/env bash
# Installs the system packages vmreplica's demo and tests use, when they are missing:
# Java and Maven (to run Kafka from Maven Central jars), qemu-utils (qemu-img, qemu-io),
# nbdkit and libnbd-bin (nbdinfo, nbdcopy), fio, kcat, prometheus (promtool), and for the guest
# test (tests/e2e/test_guest.py) qemu-system-x86, a Debian kernel and busybox-static, and rsync
# (benchmarks/resync.py measures beside it).
# Debian/Ubuntu only; elsewhere it names what to install and exits non-zero. When every program
# is on PATH it returns at once, so `make` can call it every time.
set -euo pipefail

declare -A provides=(
  [java]=openjdk-17-jre-headless [mvn]=maven [qemu-img]=qemu-utils [qemu-io]=qemu-utils
  [nbdkit]=nbdkit [nbdinfo]=libnbd-bin [nbdcopy]=libnbd-bin [fio]=fio [kcat]=kcat
  [promtool]=prometheus [qemu-nbd]=qemu-utils [qemu-system-x86_64]=qemu-system-x86
  [busybox]=busybox-static [e2fsck]=e2fsprogs [rsync]=rsync
)
missing=()
for program in "${!provides[@]}"; do
  command -v "$program" >/dev/null 2>&1 || [ -x "/sbin/$program" ] || missing+=("${provides[$program]}")
done
# Files rather than programs: the guest test boots the distribution's kernel.
compgen -G '/boot/vmlinuz-*' >/dev/null || missing+=(linux-image-amd64)
[ ${#missing[@]} -eq 0 ] && exit 0

# A package can be installed while its program is not on this PATH (a program in /usr/sbin, for
# one): apt would change nothing, so it is named once here instead of re-run on every `make`.
packages=()
while read -r package; do
  if command -v dpkg-query >/dev/null 2>&1 &&
     dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed'; then
    echo "note: $package is installed, but a program from it is not on PATH ($PATH)" >&2
  else
    packages+=("$package")
  fi
done < <(printf '%s\n' "${missing[@]}" | sort -u)
[ ${#packages[@]} -eq 0 ] && exit 0

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
