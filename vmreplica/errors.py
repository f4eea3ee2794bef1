"""The one error hierarchy of vmreplica.

Every error a user or operator can cause derives from :class:`ReplicationError` and also from the
builtin it resembles, so callers may catch either. Messages say what happened, where, and what the
operator should do next; the CLI prints them without a traceback.
"""

from __future__ import annotations


class ReplicationError(Exception):
    """Root of every error vmreplica raises on purpose."""


class ConfigurationError(ReplicationError, ValueError):
    """A setting, a name or an argument is invalid."""


class PrerequisiteMissingError(ReplicationError, RuntimeError):
    """A program or resource vmreplica needs (Java, Maven, a jar, a broker) is not available."""


class BrokerError(ReplicationError, RuntimeError):
    """The Kafka broker refused or failed a request."""


class FencedError(BrokerError):
    """Another producer with this VM's transactional id (a newer primary) has taken over."""


class DecodeError(ReplicationError, ValueError):
    """Bytes found on a topic are not a record vmreplica can decode."""


class CorruptEventError(DecodeError):
    """The bytes are truncated, garbled or fail their checksum."""


class UnknownSchemaError(DecodeError):
    """The record names a schema fingerprint this version of vmreplica does not know."""


class JournalIntegrityError(ReplicationError, ValueError):
    """A journal event breaks sequence, epoch, checksum or bounds rules; none of it is applied."""


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
