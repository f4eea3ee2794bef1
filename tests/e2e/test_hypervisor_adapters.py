"""The ``qemu`` adapter against a real ``qemu-system-x86_64`` (TCG, no guest: QMP and the guest
agent's channel are all it needs): stop, cont, quit and ``query-status``; a guest agent that
does not answer; a QEMU that hangs. Each failure is named and leaves the VM as it was."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.e2e.clients import require
from vmreplica.domain.hypervisor import parse_hypervisor
from vmreplica.errors import HypervisorError
from vmreplica.hypervisor import QemuHypervisor

pytestmark = pytest.mark.e2e


@pytest.fixture
async def qemu(short_dir: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """QEMU paused before its firmware runs (``-S``), with QMP and a guest agent channel."""
    process = await asyncio.create_subprocess_exec(
        require("qemu-system-x86_64"),
        "-machine", "q35,accel=tcg", "-m", "64", "-nodefaults", "-display", "none", "-S",
        "-qmp", f"unix:{short_dir}/q.qmp,server=on,wait=off",
        "-chardev", f"socket,id=ga,path={short_dir}/q.ga,server=on,wait=off",
        "-device", "virtio-serial",
        "-device", "virtserialport,chardev=ga,name=org.qemu.guest_agent.0",
        stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    for _ in range(200):
        if (short_dir / "q.qmp").exists() and (short_dir / "q.ga").exists():
            break
        await asyncio.sleep(0.05)
    try:
        yield process
    finally:
        if process.returncode is None:
            os.kill(process.pid, signal.SIGCONT)
            process.kill()
            await process.wait()


def adapter(folder: Path, options: str = "", vm: str = "web01") -> QemuHypervisor:
    return QemuHypervisor(parse_hypervisor(f"qemu:{folder}/q.qmp{options}", vm), vm)


async def test_stop_resume_and_power_off_over_qmp(
    qemu: asyncio.subprocess.Process, short_dir: Path
) -> None:
    vm = adapter(short_dir)
    assert (await vm.qmp("query-status"))["status"] == "prelaunch"
    await vm.start()  # cont: a QEMU started paused on this site's exports runs
    assert (await vm.qmp("query-status"))["running"] is True
    await vm.stop()
    assert (await vm.qmp("query-status"))["status"] == "paused"
    await vm.resume()
    assert (await vm.qmp("query-status"))["running"] is True
    await vm.power_off()
    assert await asyncio.wait_for(qemu.wait(), 30) == 0


async def test_a_guest_agent_that_does_not_answer_is_named_and_the_vm_still_stops(
    qemu: asyncio.subprocess.Process, short_dir: Path
) -> None:
    """No agent runs in this guest: the freeze times out, and a planned failover's stop still
    stops the VM (unfrozen)."""
    vm = adapter(short_dir, f",ga={short_dir}/q.ga,timeout=1")
    await vm.start()
    with pytest.raises(HypervisorError) as raised:
        await vm.freeze()
    assert str(raised.value) == (
        f"VM 'web01': guest agent 'guest-fsfreeze-freeze' on {short_dir}/q.ga: no answer from "
        "the guest agent (is qemu-guest-agent running?) within 1 s"
    )
    await vm.stop()
    assert (await vm.qmp("query-status"))["status"] == "paused"


async def test_a_hung_qemu_is_named_and_left_running(
    qemu: asyncio.subprocess.Process, short_dir: Path
) -> None:
    vm = adapter(short_dir, ",timeout=1")
    await vm.start()
    os.kill(qemu.pid, signal.SIGSTOP)
    try:
        with pytest.raises(HypervisorError) as raised:
            await vm.stop()
    finally:
        os.kill(qemu.pid, signal.SIGCONT)
    assert str(raised.value) == (
        f"VM 'web01': QMP 'stop' on {short_dir}/q.qmp: no answer from QEMU within 1 s"
    )
    assert (await vm.qmp("query-status"))["running"] is True  # left serving where it was


async def test_an_unknown_command_is_refused_by_qemu(
    qemu: asyncio.subprocess.Process, short_dir: Path
) -> None:
    with pytest.raises(HypervisorError) as raised:
        await adapter(short_dir).qmp("no-such-command")
    assert str(raised.value) == (
        f"VM 'web01': QMP 'no-such-command' on {short_dir}/q.qmp failed: The command "
        "no-such-command has not been found"
    )
