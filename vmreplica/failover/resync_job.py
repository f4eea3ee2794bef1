"""A resync's job file: what is pending, how far it got, and the lock held by the one process
that runs it (see :mod:`vmreplica.failover.resync` for the steps)."""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from vmreplica.domain.states import ReplicationState
from vmreplica.errors import ConfigurationError, ResyncRefused
from vmreplica.storage.safefile import replace_atomically

JOB_FILE: Final = "resync.json"
LOCK_FILE: Final = ".resync.lock"

Phase = Literal[
    "scheduled",
    "requested",
    "awaiting digests",
    "comparing",
    "sending",
    "done",
    "refused",
    "cancelled",
]
ACTIVE_PHASES: Final = frozenset(
    {"scheduled", "requested", "awaiting digests", "comparing", "sending"}
)


class ResyncBusy(ResyncRefused):
    """Another process runs the VM's resync: this one must not run it too."""


@dataclass(frozen=True)
class ResyncJob:
    """A resync of one VM's replica site, as ``<vm folder>/resync.json`` keeps it."""

    vm: str
    target: str
    """The replica site being resynchronized."""
    reason: str
    started_ms: int
    base_epoch: int
    """The primary's epoch when the job started; the resync's own epoch comes after it."""
    status_from: int
    """Digests the target published at or after this status-topic offset are fresh enough."""
    phase: Phase = "requested"
    automatic: bool = False
    """Started by the agent for a replica that reported it needs one (``auto_resync``)."""
    resume_state: str = ReplicationState.REPLICATING.value
    """The primary's state should the job be refused or cancelled: "resynchronization
    required" when the replica is known to need one."""
    not_before_ms: int = 0
    """A scheduled resync (``--at``) starts no earlier than this."""
    asked_ms: int = 0
    """When the DigestRequest was last published; 0 before."""
    digest_epoch: int = 0
    digest_cycle: int = -1
    """The replica's applied cycle (and its epoch) as of its digests."""
    journal_from: int = 0
    """Journal offset where the cycles after the replica's digests start."""
    total_bytes: int = 0
    examined_bytes: int = 0
    differing_bytes: int = 0
    resent_bytes: int = 0
    """Content appended to the resynchronizing cycle: the differing blocks and every range
    written since the replica's digests."""
    sent_bytes: int = 0
    """That cycle's size on the wire (it also carries the VM's own writes of the cycle)."""
    epoch: int | None = None
    cycle: int | None = None
    """The resynchronizing epoch and cycle, once shipped."""
    message: str = ""
    finished_ms: int | None = None
    differing: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    """The blocks that differ, per disk, as ``[start, end)`` byte ranges (after the compare)."""

    @property
    def active(self) -> bool:
        return self.phase in ACTIVE_PHASES

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def figures(self) -> dict[str, Any]:
        """What `resync --json` and `status --json` show: every field but the ranges, which
        are counted (``differing_ranges``)."""
        fields = asdict(self)
        fields["differing_ranges"] = sum(len(pairs) for pairs in fields.pop("differing").values())
        return fields

    @classmethod
    def from_json(cls, text: str) -> ResyncJob:
        """:raises ConfigurationError: not a job this release wrote."""
        try:
            fields: dict[str, Any] = json.loads(text)
            fields["differing"] = {
                disk: [(int(low), int(high)) for low, high in ranges]
                for disk, ranges in fields.get("differing", {}).items()
            }
            return cls(**fields)
        except (ValueError, TypeError) as error:
            raise ConfigurationError(
                f"unreadable resync job: {error}. Operator action: "
                f"remove the VM's {JOB_FILE} and start the resync "
                "again"
            ) from error

    def summary(self) -> str:
        """One line for the CLI and the log."""
        head = f"resync of VM {self.vm} to {self.target}"
        if self.phase == "done":
            return (
                f"{head} done: {self.target} equals this site at cycle {self.cycle}; "
                f"{self.examined_bytes} bytes examined, {self.differing_bytes} differed, "
                f"{self.resent_bytes} resent, {self.sent_bytes} bytes sent"
            )
        if self.phase in ("refused", "cancelled"):
            return f"{head} {self.phase}: {self.message}"
        if self.phase == "comparing":
            return (
                f"{head}: comparing, {self.examined_bytes} of {self.total_bytes} bytes "
                f"examined, {self.differing_bytes} differ so far"
            )
        return f"{head}: {self.phase}" + (f" ({self.message})" if self.message else "")


def load_job(folder: Path) -> ResyncJob | None:
    """The VM's resync job (running or the last one), or None."""
    try:
        text = (folder / JOB_FILE).read_text()
    except FileNotFoundError:
        return None
    return ResyncJob.from_json(text)


def save_job(folder: Path, job: ResyncJob) -> None:
    """Replace the job file atomically (temp file, fsync, rename, fsync the folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    text = job.to_json()

    def write(path: Path) -> None:
        path.write_text(text)

    replace_atomically(folder / JOB_FILE, write)


@contextlib.contextmanager
def running(folder: Path) -> Iterator[None]:
    """Held by the one process that runs the VM's resync.

    :raises ResyncRefused: another process runs it.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / LOCK_FILE).open("a") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ResyncBusy(
                f"the resync of VM {folder.name!r} is being run by another "
                "process (an agent or another `vmreplica resync`); "
                "`vmreplica status` shows its progress"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
