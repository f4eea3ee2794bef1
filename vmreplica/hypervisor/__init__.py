"""Hypervisor adapters: how a site stops, resumes, starts and quiesces the VM it is primary of.

One interface, :class:`Hypervisor`, three implementations, chosen per VM by
:func:`hypervisor_for`:

- :class:`~vmreplica.hypervisor.qemu.QemuHypervisor` (``--hypervisor qemu:<qmp>[,ga=<ga>]``):
  QMP ``stop``/``cont``/``quit`` and ``query-status``; the guest agent's
  ``guest-fsfreeze-freeze``/``-thaw`` after a ``guest-sync``;
- :class:`~vmreplica.hypervisor.libvirt.LibvirtHypervisor` (``--hypervisor libvirt:<domain>``):
  ``virsh shutdown``/``start``/``domfsfreeze``/``domfsthaw``, ``domstate`` to see it stopped;
- :class:`HookHypervisor` (no adapter): the site's ``vm_stop_command`` and ``vm_start_command``
  and the VM's cut hooks, through the one hook runner (:mod:`vmreplica.storage.hooks`).

Who calls what: a planned failover calls :meth:`Hypervisor.stop` before it cuts the final cycle
(and :meth:`~Hypervisor.resume` when it is refused after that, or cancelled), the new primary
:meth:`~Hypervisor.start` with ``--start``, the old primary :meth:`~Hypervisor.power_off` once
the new one took over; the agent wraps an application-consistent cut in
:meth:`~Hypervisor.freeze` and :meth:`~Hypervisor.thaw`. Every call is bounded by the spec's
timeout and fails with :class:`~vmreplica.errors.HypervisorError` (a
:class:`~vmreplica.errors.HookError`), whose message names the call and the socket or domain.
"""

from __future__ import annotations

from typing import Protocol

from vmreplica.config import SiteConfig
from vmreplica.domain.hypervisor import parse_hypervisor
from vmreplica.domain.model import VmRecord
from vmreplica.errors import HypervisorError
from vmreplica.hypervisor.libvirt import LibvirtHypervisor
from vmreplica.hypervisor.qemu import QemuHypervisor
from vmreplica.storage.hooks import HookPhase, run_hook

__all__ = ["HookHypervisor", "Hypervisor", "LibvirtHypervisor", "QemuHypervisor", "hypervisor_for"]


class Hypervisor(Protocol):
    """What vmreplica asks of the hypervisor running one VM at this site."""

    @property
    def description(self) -> str:
        """What it drives, for messages: ``QEMU at /run/x.qmp``, ``libvirt domain web01``."""

    @property
    def can_freeze(self) -> bool:
        """Whether :meth:`freeze` can quiesce the guest (an application-consistent cut)."""

    async def stop(self) -> None:
        """Stop the VM's writes: when this returns, every write it made reached its disks."""

    async def resume(self) -> None:
        """Undo :meth:`stop`: the failover was refused after it, or cancelled."""

    async def start(self) -> None:
        """Start the VM here (``failover planned --start`` at the new primary)."""

    async def power_off(self) -> None:
        """The VM runs at another site now: end it here for good (it was stopped)."""

    async def freeze(self) -> None:
        """Quiesce the guest's file systems (flushed, no writes) until :meth:`thaw`."""

    async def thaw(self) -> None:
        """End :meth:`freeze`."""


class HookHypervisor:
    """No adapter: the site's ``vm_stop_command``/``vm_start_command``, and the VM's
    ``pre_cut_hook``/``post_cut_hook`` as freeze and thaw. A hook that is not set does nothing
    (stop: the operator stopped the VM), except a freeze, which fails: nothing can quiesce.
    With ``--capture scan`` the scan runs the cut hooks around itself (the cut holds only what
    it read), so freeze and thaw have nothing more to run."""

    def __init__(self, config: SiteConfig, record: VmRecord) -> None:
        self.config = config
        self.record = record
        self.description = "the site's hooks"
        self.can_freeze = bool(record.settings.pre_cut_hook)
        self._scan = record.settings.capture == "scan"

    async def _run(self, command: str | None, phase: HookPhase) -> None:
        if command:
            await run_hook(
                command,
                phase,
                vm=self.record.name,
                site=self.config.site,
                disks={d.name: d.path for d in self.record.disks},
            )

    async def stop(self) -> None:
        await self._run(self.config.vm_stop_command, "stop")

    async def resume(self) -> None:
        """Nothing to run: there is no resume hook (start the VM again by hand)."""

    async def start(self) -> None:
        await self._run(self.config.vm_start_command, "start")

    async def power_off(self) -> None:
        """Nothing to run: ``vm_stop_command`` stopped it for good."""

    async def freeze(self) -> None:
        if not self.can_freeze:
            raise HypervisorError(
                f"VM {self.record.name!r}: nothing can quiesce the guest at site "
                f"{self.config.site} (no --hypervisor, no --pre-cut-hook), so this "
                "application-consistent point is crash-consistent. Operator action: "
                "`--hypervisor qemu:<qmp>,ga=<socket>` or libvirt:<domain> (or `hypervisor` "
                "in the site configuration), or --pre-cut-hook and --post-cut-hook"
            )
        if not self._scan:
            await self._run(self.record.settings.pre_cut_hook, "pre-cut")

    async def thaw(self) -> None:
        if self.can_freeze and not self._scan:
            await self._run(self.record.settings.post_cut_hook, "post-cut")


def hypervisor_for(config: SiteConfig, record: VmRecord) -> Hypervisor:
    """The adapter of ``record`` at this site: its own ``--hypervisor``, else the site's
    ``hypervisor`` (``{vm}`` replaced), else the hooks.

    :raises ConfigurationError: the spec does not parse (it was checked when it was set, so
        only a hand-edited catalog or configuration gets here).
    """
    text = record.settings.hypervisor or config.hypervisor
    if not text:
        return HookHypervisor(config, record)
    spec = parse_hypervisor(text, record.name)
    if spec.kind == "qemu":
        return QemuHypervisor(spec, record.name)
    return LibvirtHypervisor(spec, record.name, config.site)
