"""A tiny Linux guest for the end-to-end tests: Debian's kernel, an initramfs built here from
busybox-static, the kernel's own virtio and ext4 modules and e2fsprogs, booted by
``qemu-system-x86_64`` under TCG with the VM's NBD export as its virtio disk.

The guest's ``/init`` does one job per boot, chosen on the kernel command line
(``vmr.mode=...``), and reports on the serial console in lines starting ``VMR-``:

- ``format``: ``mke2fs -t ext4`` on ``/dev/vda``, then as ``write``;
- ``write``: mount, write ``vmr.files`` files of random data named ``vmr.tag``-N, append their
  SHA-256 to ``/SUMS``, ``sync``, print ``VMR-SYNCED <tag>``, then idle (the test stops it);
- ``check``: ``e2fsck -f -y`` (its output as ``fsck:`` lines, then ``VMR-FSCK <exit code>``),
  mount, ``VMR-HAS <name> <sha256>`` for every file (then ``VMR-LISTED``), ``sha256sum -c
  /SUMS`` if there is one (``VMR-SUMS <exit code> <files>``); then as ``stream`` if
  ``vmr.stream=1``, as ``write`` if ``vmr.tag`` is set, else power off;
- ``stream``: ``mke2fs``, mount, then write file after file (``<tag>-N``), each followed by
  ``sync`` and ``VMR-FILE <name> <sha256>``, until stopped or killed.

A guest agent written in shell runs beside: it answers ``guest-sync`` and freezes and thaws
``/mnt`` (busybox ``fsfreeze``) for ``guest-fsfreeze-freeze`` and ``-thaw`` on the virtio-serial
port, printing ``VMR-FROZEN`` and ``VMR-THAWED``, so the QEMU adapter talks to a real guest.

The mode is read from ``/proc/cmdline``; everything else runs from the initramfs, so the disk
holds only what the guest wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import re
import shutil
import stat
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

MODULES: Final = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "crc32c_generic",
    "crc16",
    "mbcache",
    "jbd2",
    "ext4",
)
"""Kernel modules the guest loads, in this order (Debian builds them as modules)."""
PROGRAMS: Final = ("/sbin/mke2fs", "/sbin/e2fsck")
"""Dynamically linked programs copied in with the libraries ``ldd`` names."""
BOOT_TIMEOUT_SECONDS: Final = 90.0
"""A TCG boot of this guest takes a few seconds; a slow shared machine gets ample margin."""

INIT: Final = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod /modules/$m.ko || echo "VMR-ERROR insmod $m"; done
arg() { sed -n "s/.*vmr\.$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
MODE=$(arg mode); TAG=$(arg tag); FILES=$(arg files); SIZE=$(arg kib)
# A guest agent in a few lines: guest-sync, guest-fsfreeze-freeze and -thaw of /mnt, on the
# virtio-serial port QEMU names org.qemu.guest_agent.0 (the guest's only port).
guest_agent() {
  while ! ls /dev/vport*p1 >/dev/null 2>&1; do sleep 0.2; done
  exec 3<>"$(ls /dev/vport*p1 | head -1)"
  while true; do
    while read -r line <&3; do
      case "$line" in
        *guest-sync*)
          echo "{\"return\": $(echo "$line" | sed 's/.*"id": *\([0-9]*\).*/\1/')}" >&3 ;;
        *guest-fsfreeze-freeze*)
          if fsfreeze --freeze /mnt; then
            echo '{"return": 1}' >&3; echo VMR-FROZEN
          else
            echo '{"error": {"class": "GenericError", "desc": "fsfreeze /mnt failed"}}' >&3
          fi ;;
        *guest-fsfreeze-thaw*)
          fsfreeze --unfreeze /mnt && echo VMR-THAWED; echo '{"return": 1}' >&3 ;;
        *) echo '{"error": {"class": "CommandNotFound", "desc": "not here"}}' >&3 ;;
      esac
    done
    sleep 0.2
  done
}
guest_agent &
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
write_files() {
  n=0
  while [ $n -lt "$FILES" ]; do
    f=/mnt/$TAG-$n
    dd if=/dev/urandom of=$f bs=1024 count="$SIZE" 2>/dev/null
    (cd /mnt && sha256sum $TAG-$n >> SUMS)
    n=$((n+1))
  done
  sync
  echo "VMR-SYNCED $TAG $(wc -l < /mnt/SUMS)"
  while true; do sleep 60; done
}
stream_files() {
  n=0
  while true; do
    dd if=/dev/urandom of=/mnt/$TAG-$n bs=1024 count="$SIZE" 2>/dev/null
    sync
    echo "VMR-FILE $TAG-$n $(sha256sum < /mnt/$TAG-$n | cut -d' ' -f1)"
    n=$((n+1))
  done
}
case "$MODE" in
  format)
    /sbin/mke2fs -q -F -t ext4 /dev/vda && echo VMR-FORMATTED
    mount -t ext4 /dev/vda /mnt || echo VMR-ERROR mount
    write_files ;;
  write)
    mount -t ext4 /dev/vda /mnt || echo VMR-ERROR mount
    write_files ;;
  check)
    /sbin/e2fsck -f -y /dev/vda > /tmp/fsck.log 2>&1; rc=$?
    sed 's/^/fsck: /' /tmp/fsck.log
    echo "VMR-FSCK $rc"
    mount -t ext4 /dev/vda /mnt || echo VMR-ERROR mount
    for f in /mnt/*; do
      [ -f "$f" ] && echo "VMR-HAS ${f#/mnt/} $(sha256sum < "$f" | cut -d' ' -f1)"
    done
    echo VMR-LISTED
    if [ -f /mnt/SUMS ]; then
      (cd /mnt && sha256sum -c SUMS > /tmp/sums.log 2>&1); rc=$?
      grep -v ': OK$' /tmp/sums.log | sed 's/^/sums: /'
      echo "VMR-SUMS $rc $(wc -l < /mnt/SUMS)"
    fi
    if [ "$(arg stream)" = 1 ]; then stream_files; fi
    if [ -n "$TAG" ]; then write_files; fi
    umount /mnt; sync
    echo VMR-DONE
    poweroff -f ;;
  stream)
    /sbin/mke2fs -q -F -t ext4 /dev/vda && echo VMR-FORMATTED
    mount -t ext4 /dev/vda /mnt || echo VMR-ERROR mount
    stream_files ;;
esac
echo "VMR-ERROR unknown mode $MODE"
poweroff -f
"""


def kernel() -> Path:
    """The newest Debian kernel in /boot, or a skip naming its package."""
    found = sorted(glob.glob("/boot/vmlinuz-*"))
    if not found or not os.access(found[-1], os.R_OK):
        pytest.skip("no readable /boot/vmlinuz-* (apt-get install -y linux-image-amd64)")
    return Path(found[-1])


def _require(program: str, package: str) -> str:
    path = shutil.which(program) or (program if os.access(program, os.X_OK) else None)
    if path is None:
        pytest.skip(f"{program} is not installed (apt-get install -y {package})")
    return path


def _libraries(program: str) -> set[str]:
    listing = subprocess.run(["ldd", program], capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"(/\S+\.so[.\d]*)", listing))


def _cpio_entry(name: str, mode: int, data: bytes = b"") -> bytes:
    """One entry of a ``newc`` cpio archive, the format the kernel unpacks."""
    encoded = name.encode() + b"\0"
    header = "070701" + "".join(
        f"{value:08X}" for value in (0, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
    )
    entry = header.encode() + encoded
    entry += b"\0" * (-len(entry) % 4) + data
    return entry + b"\0" * (-len(entry) % 4)


def build_initramfs(to: Path, kernel_path: Path) -> Path:
    """Write the guest's initramfs (an uncompressed newc cpio archive) to ``to``."""
    busybox = _require("busybox", "busybox-static")
    release = kernel_path.name.removeprefix("vmlinuz-")
    modules = Path("/lib/modules") / release
    if not modules.is_dir():
        pytest.skip(f"no {modules} (apt-get install -y linux-image-amd64)")
    files: dict[str, tuple[int, bytes]] = {}
    for folder in ("bin", "sbin", "dev", "proc", "sys", "mnt", "tmp", "modules", "lib", "lib64"):
        files[folder] = (stat.S_IFDIR | 0o755, b"")
    files["init"] = (stat.S_IFREG | 0o755, INIT.encode())
    files["bin/busybox"] = (stat.S_IFREG | 0o755, Path(busybox).read_bytes())
    order = []
    for module in MODULES:
        found = list(modules.rglob(f"{module}.ko")) or list(
            modules.rglob(f"{module.replace('_', '-')}.ko")
        )
        if not found:
            pytest.skip(f"kernel module {module} not found under {modules}")
        files[f"modules/{module}.ko"] = (stat.S_IFREG | 0o644, found[0].read_bytes())
        order.append(module)
    files["modules.order"] = (stat.S_IFREG | 0o644, "\n".join(order).encode() + b"\n")
    libraries: set[str] = set()
    for program in PROGRAMS:
        path = _require(program, "e2fsprogs")
        files[f"sbin/{Path(program).name}"] = (stat.S_IFREG | 0o755, Path(path).read_bytes())
        libraries |= _libraries(path)
    for library in sorted(libraries):
        target = library.lstrip("/")
        parts = Path(target).parts
        for depth in range(1, len(parts)):
            files.setdefault("/".join(parts[:depth]), (stat.S_IFDIR | 0o755, b""))
        files[target] = (stat.S_IFREG | 0o755, Path(library).read_bytes())
    archive = b"".join(_cpio_entry(name, mode, data) for name, (mode, data) in files.items())
    to.write_bytes(archive + _cpio_entry("TRAILER!!!", 0))
    return to


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initramfs: Path


def guest_image(folder: Path) -> GuestImage:
    """The kernel and a freshly built initramfs (skips when a package is missing)."""
    _require("qemu-system-x86_64", "qemu-system-x86")
    path = kernel()
    return GuestImage(path, build_initramfs(folder / "initramfs.cpio", path))


class Guest:
    """One QEMU process running the guest; its serial console goes to ``console``."""

    def __init__(
        self,
        image: GuestImage,
        disk_uri: str,
        folder: Path,
        name: str,
        mode: str,
        *,
        tag: str = "",
        files: int = 4,
        kib: int = 256,
        stream: bool = False,
    ) -> None:
        self.console = folder / f"{name}.console"
        self.qmp = folder / f"{name}.qmp"
        self.ga = folder / f"{name}.ga"
        args = f"vmr.mode={mode} vmr.files={files} vmr.kib={kib} vmr.stream={int(stream)}"
        args += f" vmr.tag={tag}" if tag else ""
        self.argv = [
            "qemu-system-x86_64",
            "-machine", "q35,accel=tcg",
            "-m", "256",
            "-nodefaults",
            "-display", "none",
            "-no-reboot",
            "-kernel", str(image.kernel),
            "-initrd", str(image.initramfs),
            "-append", f"console=ttyS0 panic=-1 loglevel=4 {args}",
            "-serial", f"file:{self.console}",
            "-drive", f"file={disk_uri},format=raw,if=virtio,cache=none",
            "-qmp", f"unix:{self.qmp},server=on,wait=off",
            "-chardev", f"socket,id=ga,path={self.ga},server=on,wait=off",
            "-device", "virtio-serial",
            "-device", "virtserialport,chardev=ga,name=org.qemu.guest_agent.0",
        ]  # fmt: skip
        self.process: asyncio.subprocess.Process | None = None
        self.started = 0.0

    async def start(self) -> None:
        self.console.unlink(missing_ok=True)
        self.started = time.monotonic()
        self.process = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )

    def lines(self) -> list[str]:
        try:
            text = self.console.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return [line.strip() for line in text.splitlines()]

    def markers(self, prefix: str) -> list[list[str]]:
        """The fields of every ``VMR-<prefix>`` line the guest printed so far."""
        return [line.split()[1:] for line in self.lines() if line.startswith(f"VMR-{prefix}")]

    def files(self, prefix: str = "FILE") -> dict[str, str]:
        """Name -> SHA-256 of the ``VMR-FILE`` (or ``VMR-HAS``) lines printed so far."""
        return {fields[0]: fields[1] for fields in self.markers(prefix) if len(fields) == 2}

    async def wait_for(self, prefix: str, seconds: float = BOOT_TIMEOUT_SECONDS) -> list[str]:
        """The fields of the first ``VMR-<prefix>`` line; fails with the console's tail."""
        deadline = time.monotonic() + seconds
        while True:
            found = self.markers(prefix)
            if found:
                return found[0]
            errors = self.markers("ERROR")
            exited = self.process is not None and self.process.returncode is not None
            if errors or exited or time.monotonic() > deadline:
                stderr = b""
                if exited and self.process is not None and self.process.stderr is not None:
                    stderr = await self.process.stderr.read()
                raise AssertionError(
                    f"guest: no VMR-{prefix} line (errors {errors}, exited {exited}); QEMU said "
                    f"{stderr.decode(errors='replace')[-2000:]!r}; console tail:\n"
                    + "\n".join(self.lines()[-40:])
                )
            await asyncio.sleep(0.1)

    async def wait_exit(self, seconds: float = BOOT_TIMEOUT_SECONDS) -> int:
        assert self.process is not None
        return await asyncio.wait_for(self.process.wait(), seconds)

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


@contextlib.asynccontextmanager
async def running(guest: Guest) -> AsyncIterator[Guest]:
    """Start ``guest`` and kill its QEMU on the way out, whatever happened."""
    await guest.start()
    try:
        yield guest
    finally:
        await guest.kill()
