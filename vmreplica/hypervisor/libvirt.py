"""The libvirt adapter: ``virsh`` against one domain, through the one hook runner.

- stop: ``virsh shutdown <domain>`` (the guest shuts down, flushing its disks), then
  ``virsh domstate`` until it says ``shut off``, within the timeout; a domain already shut off
  is stopped;
- resume and start: ``virsh start <domain>``;
- power off: nothing (it is shut off already);
- freeze and thaw: ``virsh domfsfreeze`` and ``virsh domfsthaw`` (libvirt's guest agent).

Each ``virsh`` runs through :func:`~vmreplica.storage.hooks.run_hook`, so it is killed when it
takes longer than the spec's timeout and its failure carries the tail of what it printed.
"""

from __future__ import annotations

import asyncio
import shlex
from typing import Final

from vmreplica.domain.hypervisor import HypervisorSpec
from vmreplica.errors import HypervisorError
from vmreplica.storage.hooks import HookPhase, run_hook

POLL_SECONDS: Final = 0.5
"""How often ``virsh domstate`` is asked while a guest shuts down."""


class LibvirtHypervisor:
    """One libvirt domain."""

    def __init__(self, spec: HypervisorSpec, vm: str, site: str) -> None:
        self.spec = spec
        self.vm = vm
        self.site = site
        self.description = f"libvirt domain {spec.target}"
        self.can_freeze = True

    async def virsh(self, phase: HookPhase, *args: str, timeout_seconds: float = 0.0) -> str:
        """Run ``virsh [-c URI] ARGS <domain>``; return what it printed."""
        connect = ("-c", self.spec.connect) if self.spec.connect else ()
        command = shlex.join(["virsh", *connect, *args, self.spec.target])
        return await run_hook(
            command,
            phase,
            vm=self.vm,
            site=self.site,
            timeout_seconds=timeout_seconds or self.spec.timeout_seconds,
            error=HypervisorError,
        )

    async def state(self) -> str:
        return (await self.virsh("query", "domstate")).strip().lower()

    async def stop(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.spec.timeout_seconds
        state = await self.state()
        if state != "shut off":
            await self.virsh("stop", "shutdown")
        while state != "shut off":
            left = deadline - loop.time()
            if left <= 0:
                raise HypervisorError(
                    f"VM {self.vm!r}: {self.description} did not shut down within "
                    f"{self.spec.timeout_seconds:g} s (state {state!r}); it is left as it is. "
                    "Operator action: shut the guest down (or `virsh destroy` it), then retry"
                )
            await asyncio.sleep(min(POLL_SECONDS, left))
            state = await self.state()

    async def resume(self) -> None:
        if await self.state() != "running":
            await self.virsh("resume", "start")

    async def start(self) -> None:
        await self.virsh("start", "start")

    async def power_off(self) -> None:
        """Nothing to do: ``stop`` shut it down."""

    async def freeze(self) -> None:
        await self.virsh("freeze", "domfsfreeze")

    async def thaw(self) -> None:
        await self.virsh("thaw", "domfsthaw")
