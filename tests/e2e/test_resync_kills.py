"""A resync survives SIGKILL of either agent at any instant: it continues, and ends equal.

Both sites run `vmreplica agent` processes; the primary serves its disks over NBD with
continuous cycles. Trial after trial, blocks of the replica's image are overwritten behind its
agent's back, `vmreplica resync` is asked for, and after a random 0-1.5 s one of the two agents
(at random) is SIGKILLed and started again — while it asks for digests, hashes, compares,
sends, or applies the resynchronizing cycle. Each trial ends when the job says done, and
``qemu-img compare`` then finds the replica equal to the primary.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Final

import pytest

from tests.e2e.clients import AgentProcess, cli, run, wait_until
from tests.e2e.test_resync import (
    DISKS,
    compare,
    two_agents,
)
from tests.fixtures import SiteFactory
from vmreplica.failover.resync_job import load_job

pytestmark = pytest.mark.e2e

TRIALS: Final = int(os.environ.get("VMREPLICA_RESYNC_KILL_TRIALS", "20"))
KILL_WINDOW_SECONDS: Final = 1.5
KiB: Final = 1024
MiB: Final = 1024 * KiB


async def kill_and_restart(agent: AgentProcess) -> None:
    assert agent.process is not None
    agent.process.send_signal(signal.SIGKILL)
    await asyncio.to_thread(agent.process.wait, 30)
    agent.start()


async def serving(uri: str) -> bool:
    """Whether an NBD client can open ``uri`` now."""
    probe = await asyncio.create_subprocess_exec(
        "nbdinfo",
        "--size",
        uri,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await probe.wait() == 0


async def test_sigkill_of_either_agent_during_a_resync_resumes_and_ends_equal(
    tmp_path: Path, sites: SiteFactory, unique: Callable[[str], str]
) -> None:
    seed = int(os.environ.get("VMREPLICA_RESYNC_KILL_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    print(f"\nseed {seed}, {TRIALS} trials")
    async with two_agents(tmp_path, sites, unique) as pair:
        folder = sites.config("site-a").vm_folder(pair.vm)
        finished_before = 0
        for trial in range(TRIALS):
            disk = rng.choice(sorted(DISKS))
            offsets = sorted(
                rng.randrange(0, DISKS[disk] - 4 * KiB, 4 * KiB) for _ in range(rng.randint(1, 4))
            )
            with pair.replica[disk].open("r+b") as image:  # behind the agent's back
                for offset in offsets:
                    image.seek(offset)
                    image.write(os.urandom(4 * KiB))
            await cli(pair.config_a, "resync", pair.vm)
            victim = rng.choice(("primary", "replica"))
            delay = rng.uniform(0, KILL_WINDOW_SECONDS)
            await asyncio.sleep(delay)
            phase = getattr(load_job(folder), "phase", None)
            await kill_and_restart(pair.agent_a if victim == "primary" else pair.agent_b)

            async def done(after: int = finished_before) -> bool:
                job = load_job(folder)
                return job is not None and job.phase == "done" and (job.finished_ms or 0) > after

            await wait_until(done, f"trial {trial}: the resync to end", 180)
            job = load_job(folder)
            assert job is not None
            finished_before = job.finished_ms or 0
            if rng.random() < 0.5:  # the VM writes on between trials
                # The resync may have ended just before a killed primary restarted: its
                # export answers again only once the new agent listens.
                await wait_until(
                    lambda: serving(pair.uri["disk0"]),
                    f"trial {trial}: the primary's export to serve again",
                    60,
                )
                await run(
                    "qemu-io",
                    "-f",
                    "raw",
                    pair.uri["disk0"],
                    "-c",
                    f"write -P {trial + 1} {rng.randrange(0, 60) * MiB} 64k",
                )
            await pair.caught_up()
            for name, path in pair.disks.items():
                same, said = await compare(path, pair.replica[name])
                assert same, (
                    f"trial {trial} ({victim} killed after {delay:.2f} s, in phase "
                    f"{phase}): {name}: {said}"
                )
            print(
                f"trial {trial}: {len(offsets)} blocks of {disk} corrupted, {victim} killed "
                f"after {delay:.2f} s ({phase}); {job.differing_bytes} bytes differed, "
                f"{job.sent_bytes} sent"
            )
        [status] = json.loads(await cli(pair.config_a, "status", pair.vm, "--json"))
        assert status["state"] == "replicating"
