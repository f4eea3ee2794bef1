"""The one way vmreplica runs an operator's hook command, with one set of rules.

Hooks are shell commands from the configuration: the scan capture's pre-cut and post-cut hooks
(``fsfreeze --freeze``, ``virsh suspend`` …; ``producers/capture_front.py``) and the hypervisor
hooks of a planned failover, ``vm_stop_command`` and ``vm_start_command``
(``vmreplica/failover/planned.py``). Every one of them:

- runs through ``/bin/sh -c`` with ``{vm}`` replaced by the VM's name, shell-quoted;
- sees ``VMREPLICA_VM``, ``VMREPLICA_SITE``, ``VMREPLICA_HOOK`` (``pre-cut``, ``post-cut``,
  ``stop`` or ``start``) and ``VMREPLICA_DISKS`` (``name=path`` pairs separated by spaces) on
  top of the agent's environment, and reads nothing (stdin is ``/dev/null``);
- runs in a session of its own, and is killed with everything it started when it takes longer
  than ``timeout_seconds`` (default :data:`HOOK_TIMEOUT_SECONDS`): a hung ``virsh`` must not
  hold a VM's replication or a failover forever;
- is done when its shell exits; a program it left running in the background (a VM it started)
  keeps running (give it its own output: ``... >/var/log/x 2>&1 &``);
- fails with :class:`~vmreplica.errors.HookError` (or ``error``, a subclass), whose message
  ends with the tail of what the hook printed, when it exits non-zero or times out;
- returns the end of what it printed (a caller that asks, ``virsh domstate``, reads it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import tempfile
from collections.abc import Mapping
from typing import BinaryIO, Final, Literal

from vmreplica.errors import HookError

HookPhase = Literal[
    "pre-cut", "post-cut", "stop", "start", "resume", "power-off", "freeze", "thaw", "query"
]
"""What the hook is for: the cut hooks, the failover hooks, and the calls the libvirt adapter
(``vmreplica/hypervisor/libvirt.py``) makes through this runner."""

HOOK_TIMEOUT_SECONDS: Final = 120.0
"""Longest a hook may run: enough for a guest to shut down or freeze its file systems."""
OUTPUT_TAIL_BYTES: Final = 500
"""How much of the end of a failed hook's output its error carries."""


def hook_command(command: str, vm: str) -> str:
    """``command`` with every ``{vm}`` replaced by the shell-quoted VM name."""
    return command.replace("{vm}", shlex.quote(vm))


def hook_environment(
    vm: str, site: str, phase: HookPhase, disks: Mapping[str, str]
) -> dict[str, str]:
    """The agent's environment plus what a hook is told about its VM."""
    return {
        **os.environ,
        "VMREPLICA_VM": vm,
        "VMREPLICA_SITE": site,
        "VMREPLICA_HOOK": phase,
        "VMREPLICA_DISKS": " ".join(f"{name}={path}" for name, path in disks.items()),
    }


async def run_hook(
    command: str,
    phase: HookPhase,
    *,
    vm: str,
    site: str,
    disks: Mapping[str, str] | None = None,
    timeout_seconds: float = HOOK_TIMEOUT_SECONDS,
    error: type[HookError] = HookError,
) -> str:
    """Run one hook to its end (see the module docstring for the rules); return the end of
    its output (stdout and stderr together, at most :data:`OUTPUT_TAIL_BYTES`).

    :raises HookError: it exited non-zero, was killed by a signal, or did not finish within
        ``timeout_seconds`` (then it was killed, with every process of its session).
    """
    # Output goes to a file, not a pipe: a pipe stays open as long as anything the hook left
    # running holds it, and asyncio's wait() waits for the pipe as well as for the process.
    with tempfile.TemporaryFile(prefix="vmreplica-hook-") as output:
        process = await asyncio.create_subprocess_shell(
            hook_command(command, vm),
            env=hook_environment(vm, site, phase, disks or {}),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=output,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            await asyncio.wait_for(process.wait(), timeout_seconds)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
            raise error(
                f"VM {vm!r}: {phase} hook {command!r} did not finish within "
                f"{timeout_seconds:g} s and was killed{_tail(output)}"
            ) from None
        code = process.returncode
        if code:
            how = f"was killed by signal {-code}" if code < 0 else f"exited with {code}"
            raise error(f"VM {vm!r}: {phase} hook {command!r} {how}{_tail(output)}")
        return _text(output)


def _text(output: BinaryIO) -> str:
    """The end of what the hook printed."""
    size = output.seek(0, os.SEEK_END)
    output.seek(max(0, size - OUTPUT_TAIL_BYTES))
    return output.read(OUTPUT_TAIL_BYTES).decode(errors="replace").strip()


def _tail(output: BinaryIO) -> str:
    """The end of what the hook printed, for its error message."""
    text = _text(output)
    return f": {text}" if text else " (no output)"
