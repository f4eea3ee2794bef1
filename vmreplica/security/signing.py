"""Site keys and record signatures: every journal and status record says which site's key
wrote it.

Each site has an Ed25519 key, created on first use in ``<root>/keys/`` (PKCS#8 PEM, mode 0600,
written atomically). Its public half is what a replica site puts in an authorization entry
(:mod:`.authorization`), as one line: ``ed25519:<base64 of the 32 raw bytes>``.

**What is signed.** A record's ``signature`` covers the record as this release encodes it with
``signature`` null (Avro single-object encoding, so the schema fingerprint, and with it the
record's kind, is covered too), through a SHA-256 digest and a fixed context string. The VM,
epoch, cycle, batch index, extents and (encrypted) payload are all inside: a record cannot be
replayed under another VM, epoch, cycle or batch index. Kafka offsets are not covered (they change
under mirroring). A cycle is covered whole: each WriteBatch is signed, and the CycleCommit pins
the cycle's extents through the hash chain (:mod:`vmreplica.schemas.chain`) and is signed too.
Status records (a replica's position, digest maps and resync requests) are signed the same way
by the replica site that reports them; the schema fingerprint keeps a status record from passing
for a journal record or the reverse.

**Wire format** of the ``signature`` field::

    01 | key id (8) | Ed25519 signature (64)
    02 | key id (8) | Ed25519 signature (64)
       | new public key (32) | old key id (8) | endorsement (64)

The key id is the first 8 bytes of SHA-256 of the raw public key. Form ``02`` is written after
a key rotation (:func:`rotate_site_key`): the old key signed the new public key (the
*endorsement*), so a replica that trusts the old key learns the new one from the first record it
reads, and keeps both (old records stay verifiable until the topic's retention drops them).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from vmreplica.errors import ConfigurationError
from vmreplica.schemas.codec import encode
from vmreplica.schemas.events import Event, SeedChunk, WriteBatch
from vmreplica.storage.safefile import replace_atomically

KEYS_FOLDER: Final = "keys"
CURRENT_KEY_FILE: Final = "site-ed25519.pem"
ENDORSEMENT_FILE: Final = "endorsement.bin"
"""The current key's endorsement by the key it replaced (absent before the first rotation)."""
PUBLIC_KEY_PREFIX: Final = "ed25519:"
KEY_ID_BYTES: Final = 8
SIGNATURE_BYTES: Final = 64
PUBLIC_KEY_BYTES: Final = 32
PLAIN: Final = 1
ENDORSED: Final = 2
PLAIN_SIZE: Final = 1 + KEY_ID_BYTES + SIGNATURE_BYTES
ENDORSED_SIZE: Final = PLAIN_SIZE + PUBLIC_KEY_BYTES + KEY_ID_BYTES + SIGNATURE_BYTES
E = TypeVar("E", bound=Event)
_RECORD_CONTEXT: Final = b"vmreplica journal record signature v1\0"
_ROTATION_CONTEXT: Final = b"vmreplica site key rotation v1\0"


def key_id(public: bytes) -> bytes:
    """The 8-byte id of a raw Ed25519 public key, as it travels in a signature."""
    return hashlib.sha256(public).digest()[:KEY_ID_BYTES]


def format_public_key(public: bytes) -> str:
    """``ed25519:<base64>``: the one-line form `vmreplica key show` prints."""
    return PUBLIC_KEY_PREFIX + base64.b64encode(public).decode()


def parse_public_key(text: str) -> bytes:
    """The raw 32 bytes of a public key given as ``ed25519:<base64>``.

    :raises ConfigurationError: any other text.
    """
    body = text.strip().removeprefix(PUBLIC_KEY_PREFIX)
    try:
        raw = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if not text.strip().startswith(PUBLIC_KEY_PREFIX) or len(raw) != PUBLIC_KEY_BYTES:
        raise ConfigurationError(
            f"{text.strip()[:80]!r} is not a site public key: expected ed25519: followed by 44 "
            "base64 characters, as `vmreplica key show` prints it on the primary site"
        )
    return raw


def _raw_public(private: Ed25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def _write_private(path: Path, private: Ed25519PrivateKey) -> None:
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_secret(path, pem)


def write_secret(path: Path, data: bytes) -> None:
    def write(temporary: Path) -> None:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(data)

    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    replace_atomically(path, write)


def _read_private(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as error:
        raise ConfigurationError(
            f"{path} is not a PEM Ed25519 private key ({error}); restore it from a backup, or "
            "move it away and run `vmreplica key rotate` (partners must then trust the new key)"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigurationError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


@dataclass(frozen=True)
class SiteKey:
    """A site's signing key, and the endorsement of it by the key it replaced (if any)."""

    private: Ed25519PrivateKey
    public: bytes
    endorsement: bytes = b""
    """``new public | old key id | old key's signature`` (104 bytes), or empty."""

    @property
    def id(self) -> bytes:
        return key_id(self.public)

    @property
    def public_text(self) -> str:
        return format_public_key(self.public)

    def sign_bytes(self, message: bytes) -> bytes:
        """The ``signature`` field value for a record whose signed message is ``message``."""
        signature = self.private.sign(message)
        if self.endorsement:
            return bytes([ENDORSED]) + self.id + signature + self.endorsement
        return bytes([PLAIN]) + self.id + signature

    def sign(self, event: E) -> E:
        """``event`` with its signature set (any signature it had is replaced)."""
        return dataclasses.replace(event, signature=self.sign_bytes(signed_message(event)))

    def encode(self, event: Event) -> bytes:
        """``event`` signed and single-object encoded: what a site publishes.

        The same bytes as ``encode(self.sign(event))``, but the record (a 4 MiB write batch) is
        encoded once: the signature is spliced in where the unsigned encoding has its null.
        """
        unsigned = encode(dataclasses.replace(event, signature=None) if event.signature else event)
        signature = self.sign_bytes(_RECORD_CONTEXT + hashlib.sha256(unsigned).digest())
        tail = _after_signature(event)
        cut = len(unsigned) - len(tail) - len(_NULL_BRANCH)
        return b"".join((memoryview(unsigned)[:cut], _signature_union(signature), tail))


def load_site_key(root: Path) -> SiteKey:
    """The site's key under ``root``, created (mode 0600) when there is none yet.

    :raises ConfigurationError: the key file exists but cannot be read as an Ed25519 key.
    """
    folder = root / KEYS_FOLDER
    path = folder / CURRENT_KEY_FILE
    if not path.exists():
        _write_private(path, Ed25519PrivateKey.generate())
    private = _read_private(path)
    endorsement_path = folder / ENDORSEMENT_FILE
    endorsement = endorsement_path.read_bytes() if endorsement_path.exists() else b""
    public = _raw_public(private)
    if endorsement and endorsement[:PUBLIC_KEY_BYTES] != public:
        endorsement = b""  # left over from an interrupted rotation: it endorses another key
    return SiteKey(private, public, endorsement)


def rotate_site_key(root: Path) -> tuple[SiteKey, bytes]:
    """Make a new site key, endorsed by the current one; return it and the old public key.

    Steps, in this order for crash safety: 1. the old key is kept as ``retired-<id>.pem``;
    2. the endorsement (new public key signed by the old key) is written; 3. the new key replaces
    the current one. A crash before 3 leaves the old key current (the stray endorsement names
    another key and is ignored); after 3 the new key is current and endorsed.
    """
    old = load_site_key(root)
    folder = root / KEYS_FOLDER
    new = Ed25519PrivateKey.generate()
    new_public = _raw_public(new)
    _write_private(folder / f"retired-{old.id.hex()}.pem", old.private)  # step 1
    endorsement = new_public + old.id + old.private.sign(_ROTATION_CONTEXT + new_public)
    write_secret(folder / ENDORSEMENT_FILE, endorsement)  # step 2
    _write_private(folder / CURRENT_KEY_FILE, new)  # step 3
    return SiteKey(new, new_public, endorsement), old.public


def signed_message(event: Event) -> bytes:
    """What a record's signature signs: a context string and SHA-256 of its unsigned encoding."""
    unsigned = dataclasses.replace(event, signature=None) if event.signature else event
    return _RECORD_CONTEXT + hashlib.sha256(encode(unsigned)).digest()


def record_signed_message(record: bytes, event: Event) -> bytes | None:
    """:func:`signed_message` of ``event`` computed from the ``record`` it was decoded from,
    without encoding it again: the record's bytes with its signature replaced by null.

    None when the record does not end the way this release encodes ``event`` (then use
    :func:`signed_message`).
    """
    tail = _after_signature(event)
    union = _signature_union(event.signature)
    end = len(record) - len(tail)
    start = end - len(union)
    view = memoryview(record)
    if start <= 0 or view[start:end] != union or view[end:] != tail:
        return None
    digest = hashlib.sha256(view[:start])
    digest.update(_NULL_BRANCH)
    digest.update(view[end:])
    return _RECORD_CONTEXT + digest.digest()


_NULL_BRANCH: Final = b"\x00"
"""Avro's encoding of the null branch of ``["null", ...]``: union index 0."""


def _avro_long(value: int) -> bytes:
    zigzag = (value << 1) ^ (value >> 63)
    out = bytearray()
    while zigzag > 0x7F:
        out.append((zigzag & 0x7F) | 0x80)
        zigzag >>= 7
    out.append(zigzag)
    return bytes(out)


def _avro_bytes(value: bytes) -> bytes:
    return _avro_long(len(value)) + value


def _signature_union(signature: bytes | None) -> bytes:
    """Avro's encoding of the ``signature`` field (``["null", "bytes"]``)."""
    return _NULL_BRANCH if signature is None else _avro_long(1) + _avro_bytes(signature)


def _after_signature(event: Event) -> bytes:
    """Avro's encoding of the fields after ``signature``: ``encryption`` in WriteBatch and
    SeedChunk, nothing elsewhere, status records included (a test pins this against every
    schema)."""
    if not isinstance(event, WriteBatch | SeedChunk):
        return b""
    encryption = event.encryption
    if encryption is None:
        return _NULL_BRANCH
    return (
        _avro_long(1)
        + _avro_bytes(encryption.algorithm.encode())
        + _avro_bytes(encryption.key_id.encode())
        + _avro_bytes(encryption.nonce)
    )


@dataclass(frozen=True)
class Signature:
    """A ``signature`` field taken apart (nothing verified yet)."""

    key_id: bytes
    signature: bytes
    new_public: bytes = b""
    """Form 02: the signing key's public half, endorsed by the key ``endorsed_by``."""
    endorsed_by: bytes = b""
    endorsement: bytes = b""

    def verify(self, public: bytes, message: bytes) -> bool:
        """Whether ``public`` made this signature over ``message``."""
        return _verifies(public, self.signature, message)

    def endorsement_verifies(self, old_public: bytes) -> bool:
        """Whether ``old_public`` endorsed :attr:`new_public` (form 02)."""
        return bool(self.new_public) and _verifies(
            old_public, self.endorsement, _ROTATION_CONTEXT + self.new_public
        )


def parse_signature(field: bytes) -> Signature | None:
    """The parts of a ``signature`` field, or None when it has neither known form."""
    if len(field) == PLAIN_SIZE and field[0] == PLAIN:
        return Signature(field[1 : 1 + KEY_ID_BYTES], field[1 + KEY_ID_BYTES :])
    if len(field) == ENDORSED_SIZE and field[0] == ENDORSED:
        at = PLAIN_SIZE
        new_public = field[at : at + PUBLIC_KEY_BYTES]
        endorsed_by = field[at + PUBLIC_KEY_BYTES : at + PUBLIC_KEY_BYTES + KEY_ID_BYTES]
        endorsement = field[at + PUBLIC_KEY_BYTES + KEY_ID_BYTES :]
        return Signature(
            field[1 : 1 + KEY_ID_BYTES],
            field[1 + KEY_ID_BYTES : PLAIN_SIZE],
            new_public,
            endorsed_by,
            endorsement,
        )
    return None


def _verifies(public: bytes, signature: bytes, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True
