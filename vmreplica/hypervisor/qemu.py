"""The QEMU adapter: QMP for the VM, the QEMU guest agent for its file systems.

QEMU is started with a QMP socket and, for application-consistent points, a virtio-serial
channel for the guest agent (``qemu-guest-agent`` in the guest)::

    -qmp unix:/run/vmreplica/web01.qmp,server=on,wait=off
    -chardev socket,id=ga0,path=/run/vmreplica/web01.qga,server=on,wait=off
    -device virtio-serial -device virtserialport,chardev=ga0,name=org.qemu.guest_agent.0

Both speak JSON objects, one per line. QMP greets, takes ``qmp_capabilities``, then commands;
lines with ``event`` are asynchronous events and skipped. The guest agent has no greeting and
may hold stale replies of an earlier client, so every conversation starts with ``guest-sync``
and a fresh id, and lines are skipped until that id comes back.

``stop`` is QMP ``stop``: QEMU drains and flushes every disk before it answers, so when it
returns every write the guest made is in the change log; ``query-status`` then confirms that
the VM is not running. The VM stays paused (``cont`` resumes it if the failover is refused or
cancelled) until the new primary took over, when ``quit`` ends it. With a guest agent,
``stop`` freezes the guest's file systems first, so the replica's final state needs no
journal replay.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from typing import Any, Final

from vmreplica.domain.hypervisor import HypervisorSpec
from vmreplica.errors import HypervisorError

log = logging.getLogger(__name__)

MAX_LINE_BYTES: Final = 1024 * 1024
"""Longest QMP or guest agent reply read (``query-status`` is a few dozen bytes)."""


class QemuHypervisor:
    """One QEMU process, through its QMP socket and its guest agent's socket."""

    def __init__(self, spec: HypervisorSpec, vm: str) -> None:
        self.spec = spec
        self.vm = vm
        self.description = f"QEMU at {spec.target}"
        self.can_freeze = spec.guest_agent is not None

    async def stop(self) -> None:
        """Freeze the guest's file systems first when it has a guest agent (the final cycle
        is then as clean as a shutdown's; a guest agent that fails only costs that), then
        QMP ``stop``."""
        if self.can_freeze:
            try:
                await self.freeze()
            except HypervisorError as error:
                log.warning("%s; stopping the VM unfrozen", error)
        await self.qmp("stop")
        status = await self.qmp("query-status")
        if isinstance(status, dict) and status.get("running"):
            raise HypervisorError(
                f"VM {self.vm!r}: {self.description} still runs after QMP stop (status "
                f"{status.get('status')!r}). Operator action: stop it by hand, then retry"
            )

    async def resume(self) -> None:
        """QMP ``cont``, then a thaw of what :meth:`stop` froze."""
        await self.qmp("cont")
        if self.can_freeze:
            try:
                await self.thaw()
            except HypervisorError as error:
                log.warning("%s; the guest may still be frozen", error)

    async def start(self) -> None:
        """QMP ``cont``: a QEMU started paused (``-S``) on this site's exports runs."""
        await self.qmp("cont")

    async def power_off(self) -> None:
        await self.qmp("quit")

    async def freeze(self) -> None:
        await self.guest_agent("guest-fsfreeze-freeze")

    async def thaw(self) -> None:
        await self.guest_agent("guest-fsfreeze-thaw")

    async def qmp(self, command: str) -> Any:
        """Run one QMP command on a fresh connection; return its ``return`` value.

        :raises HypervisorError: no socket, nobody listening, an error reply, or no answer
            within the timeout.
        """
        path = self.spec.target
        what = f"QMP {command!r} on {path}"

        async def talk() -> Any:
            reader, writer = await self._connect(path, "QMP socket", "-qmp unix:{path},server=on")
            try:
                await _reply(reader, what, self.vm)  # the greeting
                await _send(writer, {"execute": "qmp_capabilities"})
                await _reply(reader, what, self.vm)
                await _send(writer, {"execute": command})
                return await _reply(reader, what, self.vm)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

        return await self._bounded(talk(), what, "QEMU")

    async def guest_agent(self, command: str) -> Any:
        """Run one guest agent command after a ``guest-sync``; return its ``return`` value.

        :raises HypervisorError: no guest agent socket set or found, an error reply, or no
            answer within the timeout (no agent in the guest, or a hung one).
        """
        path = self.spec.guest_agent
        if path is None:
            raise HypervisorError(
                f"VM {self.vm!r}: {self.description} has no guest agent socket, so its file "
                "systems cannot be frozen. Operator action: add ga=<socket> to --hypervisor"
            )
        what = f"guest agent {command!r} on {path}"

        async def talk() -> Any:
            reader, writer = await self._connect(
                path, "guest agent socket", "-chardev socket,path={path},server=on"
            )
            try:
                sync_id = secrets.randbelow(2**31)
                await _send(writer, {"execute": "guest-sync", "arguments": {"id": sync_id}})
                while await _reply(reader, what, self.vm, skip_garbage=True) != sync_id:
                    pass
                await _send(writer, {"execute": command})
                return await _reply(reader, what, self.vm, skip_garbage=True)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

        return await self._bounded(talk(), what, "the guest agent (is qemu-guest-agent running?)")

    async def _connect(
        self, path: str, what: str, option: str
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            return await asyncio.open_unix_connection(path, limit=MAX_LINE_BYTES)
        except FileNotFoundError:
            raise HypervisorError(
                f"VM {self.vm!r}: no {what} at {path}. Operator action: start QEMU with "
                f"{option.format(path=path)}, or correct --hypervisor"
            ) from None
        except OSError as error:
            raise HypervisorError(
                f"VM {self.vm!r}: cannot connect to the {what} at {path}: {error.strerror}. "
                "Operator action: check that QEMU runs and owns that socket"
            ) from None

    async def _bounded(self, work: Any, what: str, party: str) -> Any:
        try:
            return await asyncio.wait_for(work, self.spec.timeout_seconds)
        except TimeoutError:
            raise HypervisorError(
                f"VM {self.vm!r}: {what}: no answer from {party} within "
                f"{self.spec.timeout_seconds:g} s"
            ) from None


async def _send(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    writer.write(json.dumps(message).encode() + b"\n")
    await writer.drain()


async def _reply(
    reader: asyncio.StreamReader, what: str, vm: str, *, skip_garbage: bool = False
) -> Any:
    """The next reply (greeting, ``return`` or ``error``), skipping QMP events (and, from the
    guest agent, lines that are not JSON: the 0xFF a ``guest-sync-delimited`` leaves)."""
    while True:
        line = await reader.readline()
        if not line:
            raise HypervisorError(f"VM {vm!r}: {what}: the connection closed before a reply")
        try:
            message = json.loads(line.decode(errors="replace").strip("\xff\ufffd \r\n"))
        except ValueError:
            if skip_garbage:
                continue
            raise HypervisorError(f"VM {vm!r}: {what}: not a JSON reply: {line[:200]!r}") from None
        if not isinstance(message, dict) or "event" in message:
            continue
        if "error" in message:
            error = message["error"]
            desc = error.get("desc", error) if isinstance(error, dict) else error
            raise HypervisorError(f"VM {vm!r}: {what} failed: {desc}")
        if "QMP" in message:
            return message["QMP"]
        if "return" in message:
            return message["return"]
