"""The demo's security steps: the sites trust each other's keys, and a forger is refused.

Both sites add an authorization entry holding the other's public key, through the CLI as an
operator would, so each verifies every journal record it applies (and site A can wrap the VM's
payload key for site B). Later a forger — a producer with a key of its own — publishes a VM of
its own into the trust group, claiming to be site A; site B's agent refuses to adopt it and logs
why, which the demo prints.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Final

from rich.console import Console

from vmreplica.config import load_config
from vmreplica.domain import names
from vmreplica.journal.kafka import JournalPublisher
from vmreplica.runtime.site import Site
from vmreplica.schemas.chain import GENESIS_HASH
from vmreplica.schemas.events import (
    Compression,
    DiskSize,
    EpochStart,
    JournalEvent,
    SeedChunk,
    VmConfig,
)
from vmreplica.security.signing import load_site_key

INTRUDER: Final = "intruder"
REFUSAL_WAIT_SECONDS: Final = 30.0


def _cli(config: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "vmreplica.cli", *args, "--config", str(config)],
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout.strip()


def trust_each_other(config_a: Path, config_b: Path, console: Console) -> None:
    """Each site lists the other as an allowed primary, with its public key."""
    key_a, key_b = _cli(config_a, "key", "show"), _cli(config_b, "key", "show")
    for config, partner, key in ((config_b, "site-a", key_a), (config_a, "site-b", key_b)):
        storage = load_config(config).root / "replicas"
        _cli(config, "authorization", "add", "--primary", partner, "--storage", str(storage),
             "--key", key)  # fmt: skip
    console.print(
        f"[bold]sites[/]: site-b trusts site-a's key {key_a[:20]}…, site-a trusts site-b's "
        f"{key_b[:20]}…; every journal record is signed and checked, payloads are encrypted"
    )


async def _forge(config_a: Path, forger_root: Path) -> None:
    forger = load_site_key(forger_root)
    async with Site(load_config(config_a)) as site:
        await site.ensure_topics(INTRUDER)
        records: list[JournalEvent] = [
            EpochStart(INTRUDER, 1, 0, "site-a", 1, "initial replication", 1, GENESIS_HASH),
            VmConfig(INTRUDER, 1, (DiskSize("system", 1 << 20),), 30, 0, None, "site-a", 1),
            SeedChunk(INTRUDER, 1, "", 0, 0, Compression.NONE, b"", 0, "forged", True),
        ]
        # An insider: site A's own Kafka login (the ACLs let it write there), not its key.
        config = site.config
        forged_id = names.transactional_id(INTRUDER, config.trust_group, config.topic_prefix)
        async with JournalPublisher(site.connection, forged_id) as publisher:
            await publisher.publish(
                site.journal_topic(INTRUDER), INTRUDER.encode(), [forger.encode(r) for r in records]
            )


def forged_record_refused(config_a: Path, agent_log: Path, console: Console) -> bool:
    """Publish the forger's VM; True once site B's agent logged that it refused it."""
    asyncio.run(_forge(config_a, agent_log.parent / "forger"))
    console.print(
        f"[bold]forger[/]: published VM {INTRUDER!r} with site-a's Kafka login, claiming to be "
        "site-a, signed by a key no site trusts"
    )
    deadline = time.monotonic() + REFUSAL_WAIT_SECONDS
    while time.monotonic() < deadline:
        for line in agent_log.read_text(errors="replace").splitlines():
            if f".{INTRUDER}.journal" in line and "refused an untrusted record" in line:
                reason = line.split("refused an untrusted record: ", 1)[1].split(". Nothing")[0]
                console.print(f"[bold]site-b[/]: refused it — {reason}; nothing was created")
                return True
        time.sleep(0.5)
    console.print(f"[bold red]site-b did not refuse the forged VM within {REFUSAL_WAIT_SECONDS} s")
    return False
