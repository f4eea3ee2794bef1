"""The hypervisor adapters without a hypervisor: spec parsing, the guest agent's protocol against
a small guest-agent server, libvirt against a fake ``virsh`` on PATH that records its arguments
(libvirt is not installed here), the hooks adapter, the application-consistent schedule on a
simulated clock, and a planned failover refused because the VM could not be stopped.

QEMU itself (QMP stop, cont, quit, a hung QEMU, a guest agent that does not answer) is driven in
``tests/e2e/test_hypervisor_adapters.py``, and a real guest in ``tests/e2e/test_guest.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from vmreplica.config import SiteConfig
from vmreplica.domain.hypervisor import HypervisorSpec, parse_hypervisor
from vmreplica.domain.model import DiskRecord, VmRecord, VmSettings
from vmreplica.domain.states import ReplicationState
from vmreplica.errors import ConfigurationError, FailoverRefused, HypervisorError
from vmreplica.failover import PlannedFailover, carry_out
from vmreplica.failover.planned import start_vm
from vmreplica.hypervisor import (
    HookHypervisor,
    LibvirtHypervisor,
    QemuHypervisor,
    hypervisor_for,
)
from vmreplica.producers.app_consistent import AppConsistentSchedule, due
from vmreplica.runtime.site import Site

HOUR_MS = 3_600_000


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("qemu:/run/x.qmp", HypervisorSpec("qemu", "/run/x.qmp")),
        (
            "qemu:/run/{vm}.qmp,ga=/run/{vm}.qga,timeout=5",
            HypervisorSpec("qemu", "/run/web01.qmp", guest_agent="/run/web01.qga",
                           timeout_seconds=5.0),
        ),
        ("libvirt:{vm}", HypervisorSpec("libvirt", "web01")),
        (
            "libvirt:dom,connect=qemu:///system,timeout=0.5",
            HypervisorSpec("libvirt", "dom", connect="qemu:///system", timeout_seconds=0.5),
        ),
    ],
)  # fmt: skip
def test_specs_parse(text: str, spec: HypervisorSpec) -> None:
    assert parse_hypervisor(text, "web01") == spec


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("vmware:x", "--hypervisor 'vmware:x': expected qemu:/run/vmreplica/web01.qmp"),
        ("qemu:", "--hypervisor 'qemu:': expected qemu:"),
        ("qemu:x.qmp", "the QMP socket must be an absolute path, not 'x.qmp'"),
        ("qemu:/x,ga=y", "the guest agent socket must be an absolute path, not 'y'"),
        ("qemu:/x,connect=y", "'connect=y' is not one of the qemu options (ga=..., timeout=...)"),
        ("libvirt:d,timeout=0", "timeout must be a number of seconds above 0 and at most 3600"),
        ("libvirt:d,timeout=soon", "not 'soon'"),
        ("libvirt:,connect=x", "name the libvirt domain"),
    ],
)
def test_bad_specs_are_named(text: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        parse_hypervisor(text)
    assert message in str(raised.value)


def test_enable_settings_check_the_spec() -> None:
    with pytest.raises(ConfigurationError, match="absolute path"):
        VmSettings(hypervisor="qemu:relative.sock").validate()
    settings = VmSettings(hypervisor="libvirt:{vm}").validate()
    assert VmSettings.from_json(settings.to_json()) == settings


def _record(settings: VmSettings | None = None) -> VmRecord:
    return VmRecord(
        "web01", "primary", "tg", "site-b", settings or VmSettings(), 1,
        ReplicationState.REPLICATING, "", 0, (DiskRecord("disk0", "/d.img", 4096),),
    )  # fmt: skip


def test_the_vm_spec_wins_over_the_site_spec_which_wins_over_the_hooks(tmp_path: Path) -> None:
    config = SiteConfig(site="site-a", root=tmp_path, hypervisor="libvirt:{vm}-dom")
    own = hypervisor_for(config, _record(VmSettings(hypervisor="qemu:/q/{vm}.qmp")))
    assert isinstance(own, QemuHypervisor)
    assert own.description == "QEMU at /q/web01.qmp"
    assert not own.can_freeze
    site_wide = hypervisor_for(config, _record())
    assert isinstance(site_wide, LibvirtHypervisor)
    assert site_wide.description == "libvirt domain web01-dom"
    hooks = hypervisor_for(SiteConfig(site="site-a", root=tmp_path), _record())
    assert isinstance(hooks, HookHypervisor)


class FakeGuestAgent:
    """A guest agent on a Unix socket: a stale reply first (an earlier client's), then answers
    ``guest-sync`` with its id and the freeze commands with a count (or the set error)."""

    def __init__(self, path: Path, *, silent: bool = False, error: str = "") -> None:
        self.path = path
        self.silent = silent
        self.error = error
        self.commands: list[str] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b'{"return": 424242}\n\xff')
        while line := await reader.readline():
            message = json.loads(line)
            self.commands.append(message["execute"])
            if self.silent:
                continue
            if message["execute"] == "guest-sync":
                reply: object = {"return": message["arguments"]["id"]}
            elif self.error:
                reply = {"error": {"class": "GenericError", "desc": self.error}}
            else:
                reply = {"return": 2}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        writer.close()


async def _serving(agent: FakeGuestAgent) -> asyncio.Server:
    return await asyncio.start_unix_server(agent.serve, str(agent.path))


def _qemu(tmp_path: Path, timeout: float = 2.0) -> QemuHypervisor:
    spec = f"qemu:{tmp_path}/qmp.sock,ga={tmp_path}/ga.sock,timeout={timeout}"
    return QemuHypervisor(parse_hypervisor(spec, "web01"), "web01")


async def test_freeze_and_thaw_go_through_the_guest_agent_after_a_sync(
    short_dir: Path,
) -> None:
    agent = FakeGuestAgent(short_dir / "ga.sock")
    async with await _serving(agent):
        qemu = _qemu(short_dir)
        assert qemu.can_freeze
        await qemu.freeze()
        await qemu.thaw()
    assert agent.commands == [
        "guest-sync",
        "guest-fsfreeze-freeze",
        "guest-sync",
        "guest-fsfreeze-thaw",
    ]


async def test_a_guest_agent_that_refuses_or_does_not_answer_is_named(short_dir: Path) -> None:
    refusing = FakeGuestAgent(short_dir / "ga.sock", error="fsfreeze is already frozen")
    async with await _serving(refusing):
        with pytest.raises(HypervisorError) as raised:
            await _qemu(short_dir).freeze()
    assert str(raised.value) == (
        f"VM 'web01': guest agent 'guest-fsfreeze-freeze' on {short_dir}/ga.sock failed: "
        "fsfreeze is already frozen"
    )
    (short_dir / "ga.sock").unlink()
    silent = FakeGuestAgent(short_dir / "ga.sock", silent=True)
    async with await _serving(silent):
        with pytest.raises(HypervisorError) as raised:
            await _qemu(short_dir, timeout=0.3).freeze()
    assert str(raised.value) == (
        f"VM 'web01': guest agent 'guest-fsfreeze-freeze' on {short_dir}/ga.sock: no answer "
        "from the guest agent (is qemu-guest-agent running?) within 0.3 s"
    )


async def test_a_missing_qmp_socket_is_named(tmp_path: Path) -> None:
    with pytest.raises(HypervisorError) as raised:
        await _qemu(tmp_path).stop()
    # the guest agent is tried first (a freeze before the stop), then QMP
    assert str(raised.value) == (
        f"VM 'web01': no QMP socket at {tmp_path}/qmp.sock. Operator action: start QEMU with "
        f"-qmp unix:{tmp_path}/qmp.sock,server=on, or correct --hypervisor"
    )


FAKE_VIRSH = """#!/bin/sh
# A stand-in for virsh: records its arguments; the domain's state lives in a file.
echo "$*" >> "$VIRSH_LOG"
state_file="$VIRSH_STATE"
for last; do :; done
case "$*" in
  *domstate*) cat "$state_file" ;;
  *shutdown*) [ -n "$VIRSH_STAYS_UP" ] || echo "shut off" > "$state_file"; echo "Domain '$last' is being shutdown" ;;
  *start*) echo running > "$state_file" ;;
  *domfsfreeze*) [ -n "$VIRSH_HANG" ] && sleep 30; echo "Froze 1 filesystem(s)" ;;
  *domfsthaw*) echo "Thawed 1 filesystem(s)" ;;
  *) echo "error: unknown command" >&2; exit 1 ;;
esac
"""  # noqa: E501


@pytest.fixture
def virsh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake ``virsh`` first on PATH; returns the file its calls are recorded in."""
    folder = tmp_path / "bin"
    folder.mkdir()
    program = folder / "virsh"
    program.write_text(FAKE_VIRSH)
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "virsh.log"
    state = tmp_path / "state"
    state.write_text("running\n")
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("VIRSH_LOG", str(log))
    monkeypatch.setenv("VIRSH_STATE", str(state))
    return log


def _libvirt(timeout: float = 5.0) -> LibvirtHypervisor:
    spec = parse_hypervisor(f"libvirt:{{vm}}-dom,connect=qemu:///system,timeout={timeout}", "w1")
    return LibvirtHypervisor(spec, "w1", "site-a")


async def test_libvirt_shuts_down_starts_freezes_and_thaws_through_virsh(virsh: Path) -> None:
    libvirt = _libvirt()
    await libvirt.stop()
    await libvirt.stop()  # already shut off: nothing more to ask
    await libvirt.resume()
    await libvirt.freeze()
    await libvirt.thaw()
    await libvirt.power_off()
    assert (await asyncio.to_thread(virsh.read_text)).splitlines() == [
        "-c qemu:///system domstate w1-dom",
        "-c qemu:///system shutdown w1-dom",
        "-c qemu:///system domstate w1-dom",
        "-c qemu:///system domstate w1-dom",
        "-c qemu:///system domstate w1-dom",
        "-c qemu:///system start w1-dom",
        "-c qemu:///system domfsfreeze w1-dom",
        "-c qemu:///system domfsthaw w1-dom",
    ]


async def test_a_domain_that_does_not_stop_or_a_hung_virsh_is_named(
    virsh: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VIRSH_STAYS_UP", "1")
    with pytest.raises(HypervisorError) as raised:
        await _libvirt(timeout=1.0).stop()
    assert str(raised.value) == (
        "VM 'w1': libvirt domain w1-dom did not shut down within 1 s (state 'running'); it is "
        "left as it is. Operator action: shut the guest down (or `virsh destroy` it), then retry"
    )
    monkeypatch.setenv("VIRSH_HANG", "1")
    with pytest.raises(HypervisorError) as raised:
        await _libvirt(timeout=0.5).freeze()
    assert str(raised.value) == (
        "VM 'w1': freeze hook 'virsh -c qemu:///system domfsfreeze w1-dom' did not finish "
        "within 0.5 s and was killed (no output)"
    )


async def test_without_an_adapter_the_hooks_stop_freeze_and_thaw(tmp_path: Path) -> None:
    seen = tmp_path / "seen"
    config = SiteConfig(site="site-a", root=tmp_path, vm_stop_command=f"echo stop >> {seen}")
    hooks = HookHypervisor(config, _record())
    await hooks.stop()
    await hooks.resume()  # no resume hook: nothing runs
    with pytest.raises(HypervisorError, match="nothing can quiesce the guest at site site-a"):
        await hooks.freeze()
    settings = VmSettings(pre_cut_hook=f"echo $VMREPLICA_HOOK >> {seen}",
                          post_cut_hook=f"echo $VMREPLICA_HOOK >> {seen}")  # fmt: skip
    frozen = HookHypervisor(config, _record(settings))
    await frozen.freeze()
    await frozen.thaw()
    assert seen.read_text().splitlines() == ["stop", "pre-cut", "post-cut"]
    # --capture scan runs the cut hooks around its scan: nothing more to run
    from dataclasses import replace  # noqa: PLC0415

    scanning = HookHypervisor(config, _record(replace(settings, capture="scan")))
    assert scanning.can_freeze
    await scanning.freeze()
    await scanning.thaw()
    assert seen.read_text().splitlines() == ["stop", "pre-cut", "post-cut"]


def test_the_app_consistent_schedule_follows_a_simulated_clock(tmp_path: Path) -> None:
    schedule = AppConsistentSchedule(tmp_path, 4)
    start = 1_000 * HOUR_MS
    assert not schedule.due(start)  # the first call starts the schedule
    assert not schedule.due(start + 4 * HOUR_MS - 1)
    assert schedule.due(start + 4 * HOUR_MS)
    schedule.attempted(start + 4 * HOUR_MS + 5)
    assert not schedule.due(start + 5 * HOUR_MS)
    # kept across an agent restart
    again = AppConsistentSchedule(tmp_path, 4)
    assert not again.due(start + 8 * HOUR_MS)
    assert again.due(start + 8 * HOUR_MS + 5)
    assert not AppConsistentSchedule(tmp_path / "none", None).due(start)
    assert due(last_ms=start, now_ms=start - 1, every_hours=1, hour_ms=HOUR_MS)  # clock set back


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    config = SiteConfig(site="site-a", root=tmp_path, bootstrap_servers="127.0.0.1:1")
    async with Site(config) as opened:
        yield opened


async def test_a_vm_that_cannot_be_stopped_refuses_the_planned_failover(
    site: Site, tmp_path: Path
) -> None:
    """A missing QMP socket: named, nothing fenced, the VM stays a replicating primary."""
    await site.catalog.add_vm(
        "vm1",
        "primary",
        "tg",
        "site-b",
        VmSettings(hypervisor=f"qemu:{tmp_path}/gone.qmp"),
        [DiskRecord("disk0", str(tmp_path / "d.img"), 4096)],
        ReplicationState.REPLICATING,
    )
    with pytest.raises(FailoverRefused) as caught:
        await carry_out(site, PlannedFailover("vm1", reverse=True))
    assert str(caught.value) == (
        f"VM 'vm1': no QMP socket at {tmp_path}/gone.qmp. Operator action: start QEMU with "
        f"-qmp unix:{tmp_path}/gone.qmp,server=on, or correct --hypervisor. The planned "
        "failover did not start; VM 'vm1' stays primary here. Operator action: stop the VM by "
        "other means (or fix vm_stop_command or --hypervisor), then retry"
    )
    assert (await site.catalog.vm("vm1")).state is ReplicationState.REPLICATING


async def test_a_vm_that_does_not_start_after_a_takeover_is_reported_not_undone(
    tmp_path: Path,
) -> None:
    config = SiteConfig(
        site="site-b",
        root=tmp_path,
        bootstrap_servers="127.0.0.1:1",
        vm_start_command="echo 'domain not found' >&2; exit 3",
    )
    async with Site(config) as site:
        await site.catalog.add_vm(
            "vm1", "primary", "tg", "site-a", VmSettings(),
            [DiskRecord("disk0", str(tmp_path / "d.img"), 4096)],
            ReplicationState.REPLICATING,
        )  # fmt: skip
        await start_vm(site, await site.catalog.vm("vm1"))
        record = await site.catalog.vm("vm1")
    assert record.role == "primary"
    assert record.state is ReplicationState.REPLICATING
    assert record.state_message == (
        "VM 'vm1': start hook \"echo 'domain not found' >&2; exit 3\" exited with 3: domain not "
        "found. This site took VM 'vm1' over as its primary but did not start it. Operator "
        "action: start the VM by hand"
    )
