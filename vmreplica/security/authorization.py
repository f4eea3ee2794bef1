"""Authorization entries: which primaries a replica site accepts, and the keys that speak for them.

Like Hyper-V's ``New-/Get-/Set-/Remove-VMReplicationAuthorizationEntry``, an entry names an
allowed primary (a site name, or a pattern where ``*`` stands for any run of name characters),
its trust group, the storage location for that primary's replica images, and, beyond Hyper-V,
the primary's public signing keys (:mod:`.signing`). Entries live in ``<root>/authorization.json``,
replaced atomically on every change.

**The rule.** A site with no entry is *open*: it applies journals without checking signatures,
as releases before signing did (plain lab set-ups and the older tests). A site with at least one
entry *verifies*: every journal record must carry a signature by a key of an entry whose trust
group is the VM's and whose pattern matches the site that speaks — the site the record names
(``primary_site``, ``site``), or, for records that name none (write batches, cycle commits, seed
chunks, resizes), the VM's current primary. Anything else is refused with
:class:`~vmreplica.errors.UntrustedRecordError` before a byte of it is used. Status records
(what a replica reports to its primary) follow the same rule, the speaker being the reporting
site (:class:`StatusVerifier`, :class:`~vmreplica.errors.UntrustedStatusError`). ``make demo``
and a secured deployment add entries on every site.

A record signed by a key nobody listed, but endorsed by a listed key of the same entry (a key
rotation, form 02 of :mod:`.signing`), teaches the entry its new key: it is added, durably,
before the record is applied; the old key stays until an operator removes it.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Final

from vmreplica.domain.names import check_name
from vmreplica.errors import ConfigurationError, UntrustedRecordError, UntrustedStatusError
from vmreplica.schemas.events import (
    DigestRequest,
    EpochStart,
    Event,
    FailoverPrepared,
    Heartbeat,
    JournalEvent,
    StatusEvent,
    VmConfig,
)
from vmreplica.security.signing import (
    format_public_key,
    key_id,
    parse_public_key,
    parse_signature,
    record_signed_message,
    signed_message,
)
from vmreplica.storage.safefile import exclusive_lock, replace_atomically

ENTRIES_FILE: Final = "authorization.json"
FORMAT_VERSION: Final = 1
_PATTERN: Final = re.compile(r"^[A-Za-z0-9_*-]{1,64}$")


def check_pattern(pattern: str) -> str:
    """Return ``pattern`` if it is a site name in which ``*`` may stand for any run of characters.

    :raises ConfigurationError: any other text.
    """
    if not _PATTERN.fullmatch(pattern):
        raise ConfigurationError(
            f"allowed primary {pattern[:40]!r} is not a site name or pattern: use 1-64 letters, "
            "digits, '-', '_' and '*' (any run of characters), e.g. site-a or dc1-*"
        )
    return pattern


def matches(pattern: str, site: str) -> bool:
    """Whether ``site`` is one of the primaries ``pattern`` allows."""
    regex = "[A-Za-z0-9_-]*".join(re.escape(part) for part in pattern.split("*"))
    return re.fullmatch(regex, site) is not None


@dataclass(frozen=True)
class AuthorizationEntry:
    """One allowed primary (pattern) of one trust group, where its VMs go, and its keys."""

    primary: str
    trust_group: str
    storage: str
    """Absolute folder for the replica images of this primary's VMs (``<storage>/<vm>/``)."""
    keys: tuple[str, ...]
    """Public keys (``ed25519:<base64>``) that sign for this primary; the newest last."""

    def key_ids(self) -> dict[bytes, bytes]:
        raw = (parse_public_key(text) for text in self.keys)
        return {key_id(public): public for public in raw}


class AuthorizationStore:
    """The entries of one site, in ``<root>/authorization.json``; re-read when the file changes."""

    def __init__(self, root: Path) -> None:
        self.path = root / ENTRIES_FILE
        self._seen: tuple[int, int] | None = None
        self._entries: tuple[AuthorizationEntry, ...] = ()
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def _changing(self) -> Iterator[None]:
        """One change at a time, across threads and processes (the CLI and a learning agent);
        the file is read again inside, so no change is lost."""
        with self._lock, exclusive_lock(self.path.with_name(ENTRIES_FILE + ".lock")):
            self._seen = None
            yield

    def entries(self) -> tuple[AuthorizationEntry, ...]:
        """Every entry, as the file holds them now.

        :raises ConfigurationError: the file is not one this release wrote.
        """
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return ()
        seen = (stat.st_mtime_ns, stat.st_size)
        if seen != self._seen:
            self._entries = self._read()
            self._seen = seen
        return self._entries

    def _read(self) -> tuple[AuthorizationEntry, ...]:
        try:
            document = json.loads(self.path.read_text())
            return tuple(
                AuthorizationEntry(
                    str(e["primary"]), str(e["trust_group"]), str(e["storage"]), tuple(e["keys"])
                )
                for e in document["entries"]
            )
        except (ValueError, KeyError, TypeError) as error:
            raise ConfigurationError(
                f"{self.path} is not an authorization entries file ({error}); restore it from a "
                "backup or remove it and add the entries again with `vmreplica authorization add`"
            ) from None

    def _write(self, entries: Sequence[AuthorizationEntry]) -> None:
        document = {"version": FORMAT_VERSION, "entries": [asdict(e) for e in entries]}
        text = json.dumps(document, indent=2, sort_keys=True) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)

        def write(temporary: Path) -> None:
            temporary.write_text(text)

        replace_atomically(self.path, write)
        self._seen = None

    def find(self, primary: str, trust_group: str) -> AuthorizationEntry | None:
        """The entry for exactly this pattern and trust group."""
        for entry in self.entries():
            if (entry.primary, entry.trust_group) == (primary, trust_group):
                return entry
        return None

    def add(self, entry: AuthorizationEntry) -> AuthorizationEntry:
        """Add a new entry (New-VMReplicationAuthorizationEntry).

        :raises ConfigurationError: a bad pattern, trust group, folder or key, or an entry for
            this pattern and trust group exists already.
        """
        entry = _checked(entry)
        with self._changing():
            if self.find(entry.primary, entry.trust_group) is not None:
                raise ConfigurationError(
                    f"an authorization entry for {entry.primary!r} in trust group "
                    f"{entry.trust_group!r} exists already; change it with `vmreplica "
                    "authorization set`"
                )
            self._write([*self.entries(), entry])
        return entry

    def set(
        self,
        primary: str,
        trust_group: str,
        *,
        storage: str | None = None,
        add_keys: Sequence[str] = (),
        remove_keys: Sequence[str] = (),
    ) -> AuthorizationEntry:
        """Change an entry (Set-VMReplicationAuthorizationEntry).

        :raises ConfigurationError: no such entry, a bad folder or key, or the change would leave
            the entry without a key.
        """
        with self._changing():
            entry = self._existing(primary, trust_group)
            removed = {format_public_key(parse_public_key(k)) for k in remove_keys}
            unknown = removed - set(entry.keys)
            if unknown:
                raise ConfigurationError(
                    f"the entry for {primary!r} has no key {sorted(unknown)[0]}; "
                    "`vmreplica authorization list` shows its keys"
                )
            keys = [k for k in entry.keys if k not in removed]
            keys += [k for k in add_keys if k not in keys]
            keys_now = tuple(keys)
            changed = _checked(
                replace(entry, storage=entry.storage if storage is None else storage, keys=keys_now)
            )
            self._write([changed if e == entry else e for e in self.entries()])
        return changed

    def remove(self, primary: str, trust_group: str) -> AuthorizationEntry:
        """Remove an entry (Remove-VMReplicationAuthorizationEntry).

        :raises ConfigurationError: no such entry.
        """
        with self._changing():
            entry = self._existing(primary, trust_group)
            self._write([e for e in self.entries() if e != entry])
        return entry

    def learn_key(self, entry: AuthorizationEntry, public: bytes) -> None:
        """Add a rotated key that a listed key of ``entry`` endorsed (durable before use)."""
        with self._changing():
            current = self.find(entry.primary, entry.trust_group)
            text = format_public_key(public)
            if current is None or text in current.keys:
                return
            self._write(
                [replace(e, keys=(*e.keys, text)) if e == current else e for e in self.entries()]
            )

    def _existing(self, primary: str, trust_group: str) -> AuthorizationEntry:
        entry = self.find(primary, trust_group)
        if entry is None:
            raise ConfigurationError(
                f"there is no authorization entry for {primary!r} in trust group "
                f"{trust_group!r}; `vmreplica authorization list` shows the entries"
            )
        return entry

    def for_primary(self, site: str, trust_group: str) -> list[AuthorizationEntry]:
        """The entries that allow ``site`` as a primary of ``trust_group``."""
        return [
            e for e in self.entries() if e.trust_group == trust_group and matches(e.primary, site)
        ]

    def storage_for(self, site: str, trust_group: str) -> Path | None:
        """Where replica images of ``site``'s VMs go, when an entry says."""
        found = self.for_primary(site, trust_group)
        return Path(found[0].storage) if found else None


def _checked(entry: AuthorizationEntry) -> AuthorizationEntry:
    check_pattern(entry.primary)
    check_name("trust group", entry.trust_group)
    storage = Path(entry.storage).expanduser()
    if not storage.is_absolute():
        raise ConfigurationError(
            f"storage location {entry.storage!r} is not an absolute path; give the folder "
            "where this primary's replica images go, e.g. /var/lib/vmreplica/replicas"
        )
    if not entry.keys:
        raise ConfigurationError(
            f"the entry for {entry.primary!r} needs at least one key: run `vmreplica key show` "
            "on the primary site and pass what it prints with --key"
        )
    keys = tuple(dict.fromkeys(format_public_key(parse_public_key(k)) for k in entry.keys))
    return replace(entry, storage=str(storage.resolve()), keys=keys)


def speaker(event: JournalEvent) -> str | None:
    """The site a record says wrote it, for the kinds that name one."""
    if isinstance(event, VmConfig | EpochStart):
        return event.primary_site
    if isinstance(event, FailoverPrepared | Heartbeat | DigestRequest):
        return event.site
    return None


def signature_problem(
    store: AuthorizationStore, trust_group: str, site: str, event: Event, record: bytes | None
) -> str | None:
    """None when a key that an entry of ``trust_group`` lists for ``site`` signed ``event``;
    otherwise what is wrong, in a phrase. A key that a listed key endorsed (a rotation) is
    learnt, durably, before this returns None.

    ``record``, the bytes ``event`` was decoded from, spares encoding it again.
    """
    kind = type(event).__name__
    entries = store.for_primary(site, trust_group)
    if not entries:
        return (
            f"{kind} speaks for site {site!r}, which no authorization entry of trust group "
            f"{trust_group!r} allows as a primary"
        )
    if event.signature is None:
        return f"{kind} is not signed, and this site requires signatures"
    signature = parse_signature(event.signature)
    if signature is None:
        return f"{kind} has a signature in no known form"
    message = (record and record_signed_message(record, event)) or signed_message(event)
    for entry in entries:
        known = entry.key_ids()
        public = known.get(signature.key_id)
        if public is not None:
            if not signature.verify(public, message):
                return (
                    f"{kind} signature by key {signature.key_id.hex()} of {site!r} does not "
                    "verify: the record was altered or forged"
                )
            return None
        old = known.get(signature.endorsed_by)
        if (
            old is not None
            and key_id(signature.new_public) == signature.key_id
            and signature.endorsement_verifies(old)
            and signature.verify(signature.new_public, message)
        ):
            store.learn_key(entry, signature.new_public)
            return None
    return (
        f"{kind} is signed by key {signature.key_id.hex()}, which no authorization entry "
        f"lists for {site!r}"
    )


class JournalVerifier:
    """Checks the signature of every record of one VM's journal against a site's entries."""

    def __init__(
        self, store: AuthorizationStore, trust_group: str, vm: str, primary_site: str
    ) -> None:
        self.store = store
        self.trust_group = trust_group
        self.vm = vm
        self.primary_site = primary_site
        """The VM's primary as far as verified records said; follows verified epochs."""

    def check(self, event: JournalEvent, offset: int, record: bytes | None = None) -> None:
        """Return when ``event`` may be used; a verified EpochStart or VmConfig moves the primary.

        ``record``, the bytes ``event`` was decoded from, spares encoding it again.

        :raises UntrustedRecordError: unsigned, badly signed, or signed by a key no entry lists
            for the site that speaks; nothing of the record may be used.
        """
        if not self.store.entries():
            return  # an open site (no entry): see the module docstring
        site = speaker(event) or self.primary_site
        problem = signature_problem(self.store, self.trust_group, site, event, record)
        if problem is not None:
            raise UntrustedRecordError(self.vm, offset, problem)
        if isinstance(event, VmConfig | EpochStart):
            self.primary_site = event.primary_site


class StatusVerifier:
    """Checks the signature of every record of one VM's status topic against a site's entries.

    The same rule as the journal's: a site with no entry is open; a site with entries uses a
    status record (a replica's position, digest map or resync request) only when a key that an
    entry of its trust group lists for the site the record names signed it. Replicas are
    primaries after a failover, so a verifying site lists its partners anyway.
    """

    def __init__(self, store: AuthorizationStore, trust_group: str, vm: str) -> None:
        self.store = store
        self.trust_group = trust_group
        self.vm = vm

    def check(self, event: StatusEvent, offset: int, record: bytes | None = None) -> None:
        """Return when ``event`` may be used.

        :raises UntrustedStatusError: unsigned, badly signed, or signed by a key no entry lists
            for the site it names; nothing of the record may be used.
        """
        if not self.store.entries():
            return
        problem = signature_problem(self.store, self.trust_group, event.site, event, record)
        if problem is not None:
            raise UntrustedStatusError(self.vm, offset, problem)
