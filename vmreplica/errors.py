"""The one error hierarchy of vmreplica.

Every error a user or operator can cause derives from :class:`ReplicationError` and also from the
builtin it resembles, so callers may catch either. Messages say what happened, where, and what the
operator should do next; the CLI prints them without a traceback and exits 2 for a user mistake
(:class:`ConfigurationError`) and 1 for everything else, a refusal included.

``retriable`` tells the agent whether trying the same work again later can succeed by itself (a
broker that is down, a hook that timed out) or needs someone to act first (a bad setting, a broken
journal, a newer primary). The agent retries the first kind on a timer and the second only once the
VM's relationship has changed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:  # the bottom layer names these types without importing them
    from vmreplica.domain.model import Position
    from vmreplica.domain.states import ReplicationState
    from vmreplica.schemas.events import EpochStart


class ReplicationError(Exception):
    """Root of every error vmreplica raises on purpose."""

    retriable: ClassVar[bool] = False


class ConfigurationError(ReplicationError, ValueError):
    """A setting, a name or an argument is invalid: a user mistake (exit 2)."""


class PrerequisiteMissingError(ReplicationError, RuntimeError):
    """A program or resource vmreplica needs (Java, Maven, a jar, a broker) is not available."""


class BrokerError(ReplicationError, RuntimeError):
    """The Kafka broker refused or failed a request."""

    retriable = True


class AccessDenied(BrokerError):
    """Kafka's ACLs refuse this principal a topic, group or transactional id.

    Not retriable: only an operator granting access (or fixing the site's identity) helps.
    """

    retriable = False


class BrokerUnreachable(BrokerError):
    """No broker of the cluster answered (refused, timed out): the site is cut off from Kafka.

    What works without a broker — failover, points, views — goes on; what publishes waits.
    """


class FencedError(BrokerError):
    """Another producer with this VM's transactional id (a newer primary) has taken over.

    Retriable: the next attempt reads the newer epoch and stands down as its replica.
    """


class FencedWritesError(FencedError):
    """This site is no longer the primary of the VM; writes are refused."""


class SupersededError(FencedError):
    """A newer epoch started at another site while this one was away: it is no longer primary."""

    def __init__(self, vm: str, start: EpochStart, offset: int) -> None:
        super().__init__(
            f"VM {vm!r}: site {start.primary_site} became primary in epoch {start.epoch} "
            f"({start.reason}); this site no longer accepts writes for it. Operator action: "
            f"`vmreplica reverse {vm}` at {start.primary_site} makes this site its replica"
        )
        self.start = start
        self.offset = offset


class FailoverRefused(ReplicationError, RuntimeError):
    """A failover cannot be done now (exit 1); the message says why and what to do."""


class InitialReplicationRefused(ReplicationError, RuntimeError):
    """An initial replication's export or import cannot be done now (exit 1): the VM is not
    waiting for one, or another runs. Nothing was changed; the message says what to do."""


class ResyncRefused(ReplicationError, RuntimeError):
    """A resynchronization cannot be started or finished now (exit 1): one is already running,
    the VM is not replicating, or the replica's block digests do not fit its disks. Nothing
    was sent; the message says why and what to do."""


class StateRefused(ReplicationError, RuntimeError):
    """A change the VM's current state does not allow now (exit 1); nothing was changed."""

    def __init__(self, vm: str, current: ReplicationState, expected: ReplicationState) -> None:
        super().__init__(
            f"VM {vm!r} is {current.value}, not {expected.value}: nothing was changed. "
            f"Operator action: check `vmreplica status {vm}` and try again"
        )
        self.vm = vm
        self.current = current
        self.expected = expected


class StorageFullError(ReplicationError, RuntimeError):
    """A file system this site writes to is full. Nothing of the work in hand was kept (a cycle
    is applied whole or not at all); it is retried by itself, and goes through once space is
    freed."""

    retriable = True

    def __init__(self, vm: str, folder: str, doing: str, problem: str) -> None:
        super().__init__(
            f"VM {vm!r}: no space left on the file system of {folder} ({problem}, {doing}); "
            "replication of the VM is paused and nothing of it was half done. Operator action: "
            "free space there (or grow the file system) and it resumes by itself."
        )
        self.vm = vm
        self.folder = folder


class HookError(ReplicationError, RuntimeError):
    """A hypervisor hook failed or did not finish in time."""

    retriable = True


class HypervisorError(HookError):
    """A hypervisor adapter's call (QMP, the guest agent, ``virsh``) failed, was refused, or did
    not answer in time; the message names the call, the socket or domain, and what to do."""


class ScanStopped(ReplicationError):
    """A change scan was cancelled; what it appended stays in the open segment."""

    retriable = True


class DecodeError(ReplicationError, ValueError):
    """Bytes found on a topic are not a record vmreplica can decode."""


class CorruptEventError(DecodeError):
    """The bytes are truncated, garbled or fail their checksum."""


class UnknownSchemaError(DecodeError):
    """The record names a schema fingerprint this version of vmreplica does not know."""


class InvalidEventError(DecodeError):
    """A record decodes, but a value in it is one no vmreplica writes: a name that could escape a
    folder, a negative offset, an empty range, a size or a count beyond its bound. Never used.

    ``kind`` is the record's class name (``VmConfig``), ``problem`` names the field and value.
    """

    def __init__(self, kind: str, problem: str) -> None:
        super().__init__(f"invalid {kind} record: {problem}")
        self.kind = kind
        self.problem = problem


class JournalIntegrityError(ReplicationError, ValueError):
    """A journal event breaks sequence, epoch, checksum or bounds rules; none of it is applied."""


class JournalViolation(JournalIntegrityError):
    """A journal record breaks a rule; nothing of its cycle is applied."""

    def __init__(
        self, vm: str, offset: int, message: str, state: ReplicationState | None = None
    ) -> None:
        from vmreplica.domain.states import ReplicationState  # noqa: PLC0415 — bottom layer

        super().__init__(f"VM {vm!r}, journal offset {offset}: {message}")
        self.vm = vm
        self.offset = offset
        self.state = ReplicationState.RESYNCHRONIZATION_REQUIRED if state is None else state


class JournalTruncated(ReplicationError, RuntimeError):
    """The record a reader needs next is gone: the topic's retention deleted it (Kafka's offset
    out of range). A replica that far behind can only catch up by a resynchronization."""

    def __init__(self, topic: str, wanted: int, start: int) -> None:
        super().__init__(
            f"{topic}: offset {wanted} is no longer in the journal, which now starts at offset "
            f"{start} (the topic's retention deleted the records before it)"
        )
        self.topic = topic
        self.wanted = wanted
        self.start = start


class UntrustedRecordError(JournalViolation):
    """A journal record is unsigned, badly signed, or signed by a key that no authorization entry
    of this site lists for the site it speaks for: it is refused before any byte of it is used,
    and the VM stops in the error state with the record's offset in its message."""

    def __init__(self, vm: str, offset: int, problem: str) -> None:
        from vmreplica.domain.states import ReplicationState  # noqa: PLC0415 — bottom layer

        super().__init__(
            vm,
            offset,
            f"refused an untrusted record: {problem}. Nothing of it was applied. Operator "
            "action: if the primary's key changed, add its new key with `vmreplica authorization "
            "set --add-key`; otherwise someone without a trusted key wrote to the journal",
            ReplicationState.ERROR,
        )
        self.problem = problem


class UntrustedStatusError(ReplicationError, ValueError):
    """A status record (a replica's position, digest map or resync request) is unsigned, badly
    signed, or signed by a key that no authorization entry of this site lists for the site it
    names: its reader skips it, logs why with the record's offset, and uses nothing of it."""

    def __init__(self, vm: str, offset: int, problem: str) -> None:
        super().__init__(
            f"VM {vm!r}, status offset {offset}: refused an untrusted record: {problem}. "
            "Nothing of it was used. Operator action: if that site's key changed, add its new "
            "key with `vmreplica authorization set --add-key`; otherwise someone without a "
            "trusted key wrote to the status topic"
        )
        self.vm = vm
        self.offset = offset
        self.problem = problem


class PositionRegressedError(JournalIntegrityError):
    """A position write would move a VM back; nothing was recorded.

    Positions only move forward (:class:`vmreplica.domain.model.Position`); a failover that goes
    back on purpose rewinds instead, giving its reason.
    """

    def __init__(self, vm: str, current: Position, offered: Position) -> None:
        super().__init__(
            f"VM {vm!r}: position ({offered}) would move back from ({current}); positions only "
            "move forward, and nothing was recorded. Operator action: make sure one agent alone "
            "uses this site's catalog; if the VM's journal was recreated, resynchronize the VM."
        )
        self.vm = vm
        self.current = current
        self.offered = offered


class ChangeLogCorrupt(JournalIntegrityError):
    """A sealed change-log segment fails its checksum; the VM needs a resynchronization."""


class NbdProtocolError(ReplicationError, ValueError):
    """An NBD client sent bytes that break the protocol; the server drops only its connection."""


class OutOfBoundsError(JournalIntegrityError):
    """A read or write reaches past the end of a disk image; nothing of it is done."""

    def __init__(self, path: str, offset: int, length: int, size: int) -> None:
        self.path = path
        self.offset = offset
        self.length = length
        self.size = size
        super().__init__(
            f"{path}: range at offset {offset} of {length} bytes is outside the disk of {size} "
            "bytes. Operator action: check that the disk was resized on both sites, then "
            "resynchronize it."
        )


class UndoCorruptError(CorruptEventError):
    """An undo log file is missing, torn or fails a checksum where a sealed one is needed."""

    def __init__(self, path: str, position: int, problem: str) -> None:
        self.path = path
        self.position = position
        self.problem = problem
        super().__init__(
            f"{path} at byte {position}: {problem}. Operator action: recovery points older than "
            "this cycle cannot be rebuilt; if the cycle was being applied, resynchronize the VM."
        )
