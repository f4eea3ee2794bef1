"""The one hook runner: ``{vm}`` shell-quoted, the environment a hook sees, its timeout, and
errors that carry the end of its output."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from vmreplica.errors import HookError
from vmreplica.storage.hooks import OUTPUT_TAIL_BYTES, hook_command, run_hook


async def test_vm_is_replaced_shell_quoted(tmp_path: Path) -> None:
    out = tmp_path / "out"
    vm = "web 01; touch pwned $(id) 'x'"
    await run_hook(f"printf '%s\\n' {{vm}} > {out}", "stop", vm=vm, site="site-a", disks={})
    assert out.read_text() == vm + "\n"  # one argument, nothing run
    assert not (tmp_path / "pwned").exists()
    assert hook_command("virsh shutdown {vm}", "a'b") == "virsh shutdown 'a'\"'\"'b'"


async def test_environment_names_vm_site_phase_and_disks(tmp_path: Path) -> None:
    out = tmp_path / "env"
    await run_hook(
        f'echo "$VMREPLICA_VM|$VMREPLICA_SITE|$VMREPLICA_HOOK|$VMREPLICA_DISKS|$HOME" > {out}',
        "pre-cut",
        vm="vm1",
        site="site-b",
        disks={"disk0": "/images/a.img", "disk1": "/images/b.img"},
    )
    assert out.read_text() == (
        f"vm1|site-b|pre-cut|disk0=/images/a.img disk1=/images/b.img|{os.environ.get('HOME', '')}\n"
    )


async def test_stdin_is_empty(tmp_path: Path) -> None:
    out = tmp_path / "stdin"
    await asyncio.wait_for(run_hook(f"cat > {out}", "start", vm="vm", site="s"), 10)
    assert out.read_bytes() == b""


async def test_failure_carries_exit_code_and_the_tail_of_the_output() -> None:
    with pytest.raises(HookError) as caught:
        await run_hook(
            "echo starting; head -c 2000 /dev/zero | tr '\\0' x; echo; "
            "echo 'domain not found' >&2; exit 3",
            "stop",
            vm="vm1",
            site="s",
        )
    message = str(caught.value)
    assert message.startswith("VM 'vm1': stop hook ")
    tail = message.split(" exited with 3: ", 1)[1]
    assert tail.endswith("x\ndomain not found")  # stdout and stderr, in order
    assert "starting" not in tail  # only the end of the output
    assert len(tail) <= OUTPUT_TAIL_BYTES


async def test_failure_without_output_says_so() -> None:
    with pytest.raises(HookError, match=r"post-cut hook 'false' exited with 1 \(no output\)$"):
        await run_hook("false", "post-cut", vm="vm", site="s")


async def test_timeout_kills_the_hook_and_everything_it_started(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    started = time.monotonic()
    with pytest.raises(HookError) as caught:
        await run_hook(
            f"echo frozen; sleep 60 & echo $! > {pid_file}; wait",
            "pre-cut",
            vm="vm",
            site="s",
            timeout_seconds=0.5,
        )
    assert time.monotonic() - started < 10
    assert str(caught.value) == (
        "VM 'vm': pre-cut hook "
        f"'echo frozen; sleep 60 & echo $! > {pid_file}; wait' did not "
        "finish within 0.5 s and was killed: frozen"
    )
    child = int(pid_file.read_text())
    for _ in range(100):  # the grandchild is gone too (reaped by init)
        if _state(child) in ("gone", "Z"):
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail(f"the hook's child {child} still runs")


async def test_a_program_left_running_does_not_hold_the_hook(tmp_path: Path) -> None:
    """A start hook may leave the VM running: the hook is done when its shell exits."""
    pid_file = tmp_path / "vm.pid"
    started = time.monotonic()
    await run_hook(
        f"sleep 30 & echo $! > {pid_file}", "start", vm="vm", site="s", timeout_seconds=20
    )
    assert time.monotonic() - started < 10
    child = int(pid_file.read_text())
    assert _state(child) not in ("gone", "Z")
    os.kill(child, 9)


def _state(pid: int) -> str:
    """The process's state letter (``Z``: a zombie), or ``gone``."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"
