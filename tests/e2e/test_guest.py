"""A real guest survives failover: Linux under QEMU (TCG), its disk the primary's NBD export.

Agents are ``vmreplica agent`` processes; the hypervisor is ``qemu-system-x86_64`` booting
Debian's kernel and a busybox initramfs (:mod:`tests.e2e.guest`), driven by the ``qemu``
adapter over QMP and the guest agent's channel; every step is a CLI command.

1. At A the guest makes an ext4 file system, writes files, records their SHA-256 and syncs;
   the agent's application-consistent cuts (every "hour", shortened for the test) freeze it
   through the guest agent, and B keeps such points.
2. Planned failover A -> B with ``--reverse``: the adapter freezes and stops A's QEMU before
   the final cycle, and ends it (``quit``) once B took over. The guest boots at B from B's
   export: ``e2fsck -f`` finds nothing to fix, every checksum matches; it writes more.
3. Fail back B -> A (B's adapter comes from its site configuration): the guest boots at A,
   ``e2fsck`` clean, all the files of both sites intact.
4. ``failover --point latest-app-consistent`` at B after A's QEMU is SIGKILLed: the guest
   boots at B from that point, clean, with every file written before it.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.clients import cli, enable_nbd, make_disk
from tests.e2e.guest import Guest, guest_image, running
from tests.e2e.sites import Agents, in_step, nbd_uris, roles, served_writable, until
from tests.fixtures import SiteFactory
from vmreplica.producers.app_consistent import HOUR_SECONDS_VARIABLE

pytestmark = [pytest.mark.e2e, pytest.mark.guest]
MiB = 1024 * 1024
HOUR_SECONDS = 4.0
"""Site A's application-consistent "hour" in this test: a freeze every few seconds."""


class GuestAgents(Agents):
    """Agents whose site configuration names the QEMU adapter of every VM (``{vm}``)."""

    def __init__(self, sites: SiteFactory, folder: Path, guests: Path) -> None:
        super().__init__(sites, folder)
        self.guests = guests

    def config(self, site: str) -> Path:
        if site == "site-a":  # A's VM names its own adapter on `enable`
            return super().config(site)
        letter = site[-1]
        return self.sites.config_file(
            site,
            heartbeat_seconds=1.0,
            hypervisor=f"qemu:{self.guests}/{{vm}}.{letter}.qmp,ga={self.guests}/{{vm}}.{letter}.ga",
        )


@pytest.fixture
def guest_agents(
    sites: SiteFactory, tmp_path: Path, short_dir: Path
) -> GuestAgents:  # the sockets need short paths
    return GuestAgents(sites, tmp_path, short_dir)


async def app_consistent_points(agents: Agents, site: str, vm: str) -> list[dict[str, int]]:
    rows = json.loads(await cli(agents.config(site), "points", "list", vm, "--json"))
    return [row for row in rows if row["consistency"] == "application"]


async def test_a_linux_guest_fails_over_and_back_with_its_file_system_intact(
    tmp_path: Path,
    short_dir: Path,
    sites: SiteFactory,
    guest_agents: GuestAgents,
    unique: Callable[[str], str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    agents = guest_agents
    image = guest_image(tmp_path)
    vm = unique("vm")
    disk = make_disk(tmp_path / "disk0.img", 64 * MiB)
    enabled = await enable_nbd(
        agents.config("site-a"),
        vm,
        {"disk0": disk},
        "continuous",
        "--recovery-history",
        "1",
        "--app-consistent-hours",
        "1",
        "--hypervisor",
        f"qemu:{short_dir}/{{vm}}.a.qmp,ga={short_dir}/{{vm}}.a.ga,timeout=20",
    )
    at_a = enabled["nbd"]["disk0"]["unix"]
    monkeypatch.setenv(HOUR_SECONDS_VARIABLE, str(HOUR_SECONDS))
    agents.start("site-a")
    monkeypatch.delenv(HOUR_SECONDS_VARIABLE)
    agents.start("site-b")
    timings: dict[str, float] = {}
    async with sites.site("site-a") as a, sites.site("site-b") as b:
        wait = functools.partial(until, sites={"a": a, "b": b}, vm=vm)
        await wait(lambda: in_step(a, b, vm), "site B to replicate the VM")

        # 1. The guest at A: a file system, files, checksums, sync; then a frozen cut.
        async with running(Guest(image, at_a, short_dir, f"{vm}.a", "format", tag="a")) as guest:
            assert await guest.wait_for("SYNCED") == ["a", "4"]
            timings["format and write at A"] = time.monotonic() - guest.started
            synced_ms = time.time() * 1000

            async def frozen_after_sync() -> bool:
                points = await app_consistent_points(agents, "site-b", vm)
                return bool(guest.markers("THAWED")) and any(
                    p["cut_at_ms"] > synced_ms for p in points
                )

            await wait(frozen_after_sync, "an application-consistent point after the sync")

            # 2. Planned failover A -> B: freeze and stop first, then the final cycle.
            started = time.monotonic()
            await cli(agents.config("site-a"), "failover", "planned", vm, "--reverse")

            async def swapped() -> bool:
                return await roles({"a": a, "b": b}, vm) == {"a": "replica", "b": "primary"}

            await wait(swapped, "B to take over and A to become its replica")
            timings["planned failover"] = time.monotonic() - started
            assert await guest.wait_exit(30) == 0  # `quit` once B took over

        # The guest at B: clean file system, every checksum; more files.
        at_b = (await nbd_uris(agents, "site-b", vm))["disk0"]
        await wait(lambda: served_writable(at_b), "the new primary to serve its export writable")
        async with running(Guest(image, at_b, short_dir, f"{vm}.b", "check", tag="b")) as guest:
            assert await guest.wait_for("FSCK") == ["0"], guest.lines()
            assert await guest.wait_for("SUMS") == ["0", "4"], guest.lines()
            assert await guest.wait_for("SYNCED") == ["b", "8"]
            timings["boot, check and write at B"] = time.monotonic() - guest.started

            # 3. Fail back B -> A, with B's adapter from its site configuration.
            await wait(lambda: in_step(b, a, vm), "A to apply B's writes")
            await cli(agents.config("site-b"), "failover", "planned", vm, "--reverse")

            async def back() -> bool:
                return await roles({"a": a, "b": b}, vm) == {"a": "primary", "b": "replica"}

            await wait(back, "A to take over again")
            assert await guest.wait_exit(30) == 0

        await wait(lambda: served_writable(at_a), "the new primary to serve its export writable")
        async with running(Guest(image, at_a, short_dir, f"{vm}.a", "check")) as guest:
            assert await guest.wait_for("FSCK") == ["0"], guest.lines()
            assert await guest.wait_for("SUMS") == ["0", "8"], guest.lines()
            assert await guest.wait_exit() == 0
            timings["boot and check at A"] = time.monotonic() - guest.started

        # 4. A new guest run at A writes more and is frozen for a point; then it is killed,
        # and B fails over to the latest application-consistent point.
        await wait(lambda: in_step(a, b, vm), "B to follow A again")
        async with running(Guest(image, at_a, short_dir, f"{vm}.a", "write", tag="c")) as guest:
            assert await guest.wait_for("SYNCED") == ["c", "12"]
            synced_ms = time.time() * 1000
            await wait(frozen_after_sync, "an application-consistent point after the sync")
            assert guest.process is not None
            guest.process.kill()  # the hypervisor dies: the site is lost
        [*_, point] = await app_consistent_points(agents, "site-b", vm)
        await cli(
            agents.config("site-b"),
            "failover",
            "unplanned",
            vm,
            "--point",
            "latest-app-consistent",
            "--force",
        )

        async def failed_over() -> bool:
            record = await b.catalog.vm(vm)
            return record.role == "primary"

        await wait(failed_over, "B to fail over")
        position = await b.catalog.position(vm)
        assert position is not None
        assert position.cycle == point["point"]
        at_b = (await nbd_uris(agents, "site-b", vm))["disk0"]
        await wait(lambda: served_writable(at_b), "the new primary to serve its export writable")
        async with running(Guest(image, at_b, short_dir, f"{vm}.b", "check")) as guest:
            assert await guest.wait_for("FSCK") == ["0"], guest.lines()
            assert await guest.wait_for("SUMS") == ["0", "12"], guest.lines()
            assert await guest.wait_exit() == 0
    print("guest timings (s):", {k: round(v, 1) for k, v in timings.items()})


FSCK_AFTER_A_CRASH = (
    "e2fsck ",
    "recovering journal",
    "Pass ",
    "Free blocks count wrong",
    "Free inodes count wrong",
    "Fix? yes",
    "FILE SYSTEM WAS MODIFIED",
    "files (",
    "clean,",
)
"""What ``e2fsck -f -y`` may say of an ext4 file system cut at a crash-consistent point: a
journal replay, and the free counts ext4 keeps in memory. Anything else is damage."""


def damage(guest: Guest) -> list[str]:
    """What ``e2fsck`` said beyond :data:`FSCK_AFTER_A_CRASH`."""
    said = [
        line.removeprefix("fsck:").strip() for line in guest.lines() if line.startswith("fsck:")
    ]
    return [line for line in said if line and not any(a in line for a in FSCK_AFTER_A_CRASH)]


async def test_a_writing_guest_survives_a_planned_failover_and_a_crash(
    tmp_path: Path,
    short_dir: Path,
    sites: SiteFactory,
    guest_agents: GuestAgents,
    unique: Callable[[str], str],
) -> None:
    """The guest writes and syncs file after file throughout.

    - Planned failover A -> B while it writes: the VM is stopped before the exports stop taking
      writes, so the guest never sees an I/O error, and every file it synced is at B.
    - At B it writes on; QEMU and B's agent are SIGKILLed mid-write, and A fails over (unplanned):
      ``e2fsck`` finds at most a journal replay to do, and every file synced before the last
      cycle A applied is intact.
    """
    agents = guest_agents
    image = guest_image(tmp_path)
    vm = unique("vm")
    disk = make_disk(tmp_path / "disk0.img", 32 * MiB)
    enabled = await enable_nbd(
        agents.config("site-a"),
        vm,
        {"disk0": disk},
        "continuous",
        "--hypervisor",
        f"qemu:{short_dir}/{{vm}}.a.qmp,ga={short_dir}/{{vm}}.a.ga,timeout=20",
    )
    at_a = enabled["nbd"]["disk0"]["unix"]
    agents.start("site-a")
    agents.start("site-b")
    async with sites.site("site-a") as a, sites.site("site-b") as b:
        wait = functools.partial(until, sites={"a": a, "b": b}, vm=vm)
        await wait(lambda: in_step(a, b, vm), "site B to replicate the VM")
        async with running(
            Guest(image, at_a, short_dir, f"{vm}.a", "stream", tag="a", kib=64)
        ) as guest:

            async def files_written() -> bool:
                return len(guest.files()) >= 3

            await wait(files_written, "the guest at A to write files")
            await cli(agents.config("site-a"), "failover", "planned", vm, "--reverse")

            async def swapped() -> bool:
                return await roles({"a": a, "b": b}, vm) == {"a": "replica", "b": "primary"}

            await wait(swapped, "B to take over")
            assert await guest.wait_exit(30) == 0
            written_at_a = guest.files()
            errors = [line for line in guest.lines() if "I/O error" in line or "EXT4-fs" in line]
            assert errors == [], "the guest saw its disk fail before it was stopped"

        at_b = (await nbd_uris(agents, "site-b", vm))["disk0"]
        await wait(lambda: served_writable(at_b), "the new primary to serve its export writable")
        async with running(
            Guest(image, at_b, short_dir, f"{vm}.b", "check", tag="b", kib=64, stream=True)
        ) as guest:
            assert await guest.wait_for("FSCK") == ["0"], guest.lines()
            await guest.wait_for("LISTED")
            assert written_at_a.items() <= guest.files("HAS").items()

            async def b_files_written() -> bool:
                return len(guest.files()) >= 3

            await wait(b_files_written, "the guest at B to write files")
            synced, seen_ms = guest.files(), time.time() * 1000

            async def applied_at_a() -> bool:  # a cycle cut after those files were synced
                points = await a.catalog.points(vm)
                return bool(points) and points[-1].cut_at_ms > seen_ms

            await wait(applied_at_a, "A to apply a cycle holding B's files")
            assert guest.process is not None
            guest.process.kill()
        agents.kill("site-b")
        await cli(agents.config("site-a"), "failover", "unplanned", vm, "--force")

        async def failed_over() -> bool:
            return (await a.catalog.vm(vm)).role == "primary"

        await wait(failed_over, "A to fail over")
        await wait(lambda: served_writable(at_a), "the new primary to serve its export writable")
        async with running(Guest(image, at_a, short_dir, f"{vm}.a", "check")) as guest:
            assert await guest.wait_for("FSCK") in (["0"], ["1"]), guest.lines()
            assert damage(guest) == []
            await guest.wait_for("LISTED")
            found = guest.files("HAS")
            print("e2fsck after the crash:", [ln for ln in guest.lines() if ln.startswith("fsck:")])
            print(f"{len(found)} files found, {len(synced)} synced at B before A's last cycle")
        assert written_at_a.items() <= found.items()
        assert synced.items() <= found.items()
