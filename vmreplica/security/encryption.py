"""End-to-end payload encryption: a broker (or anyone who reads the topic) never sees disk data.

**Per VM, a ring of payload keys.** A VM whose replication is encrypted (``enable --encrypt``)
has 256-bit AES keys, each with a random id, kept at every site that holds the VM in
``<root>/keys/vm-<vm>.json`` (mode 0600, replaced atomically). The primary compresses each
payload, then encrypts it with AES-256-GCM under the newest key and a random 96-bit nonce; the
record says which key (``Encryption.key_id``) and carries the nonce. The associated data binds
the payload to its VM, epoch, cycle, batch index and extents (or seed id, disk and range), as
:mod:`vmreplica.schemas.payload` defines it — never to a Kafka offset, which mirroring changes.

**Keys travel wrapped per site, inside the signed VmConfig.** There is no second key to
exchange: a site's X25519 key is its Ed25519 signing key in Montgomery form (the standard map,
as libsodium's ``crypto_sign_ed25519_*_to_curve25519``), so the public key an operator already
put in an authorization entry is also the key to wrap for. For each replica site the primary
draws an ephemeral X25519 key, agrees a secret with the site's key, derives a wrapping key with
HKDF-SHA256 (bound to the VM, key id and site) and encrypts the payload key with AES-256-GCM.
A replica unwraps the keys addressed to it when it applies a VmConfig that a trusted key signed,
and stores them in its own ring before any payload needs them. The primary therefore needs an
authorization entry for each replica site (the one reverse replication needs anyway).

**Rotation.** A primary whose current key is older than :data:`PAYLOAD_KEY_MAX_AGE_MS` makes a
new one when it starts and publishes a VmConfig carrying it (wrapped) before its first payload.
**Old keys** stay in the ring after a newer one is made (:meth:`VmKeyRing.rotate`): records
encrypted with them remain on the topic until its retention passes, and a replica may read them
again (a resynchronization, a cancelled failover). :meth:`VmKeyRing.prune` forgets a retired key
only once the topic's retention has passed since it was retired.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from vmreplica.domain.clock import now_ms
from vmreplica.errors import ConfigurationError, CorruptEventError
from vmreplica.schemas.events import Encryption, VmConfig, WrappedKey
from vmreplica.security.signing import KEYS_FOLDER, SiteKey, write_secret

ALGORITHM: Final = "AES-256-GCM"
KEY_BYTES: Final = 32
NONCE_BYTES: Final = 12
_WRAP_CONTEXT: Final = b"vmreplica payload key wrap v1\0"
PAYLOAD_KEY_MAX_AGE_MS: Final = 7 * 24 * 3_600_000
"""A primary whose current payload key is older makes a new one when it starts (and announces
it in a VmConfig before using it): a week bounds what one stolen key reads."""
_P: Final = 2**255 - 19
"""The prime of Curve25519 and Ed25519."""


def x25519_public(ed25519_public: bytes) -> bytes:
    """The X25519 public key of a site, from its Ed25519 public key (u = (1 + y) / (1 - y)).

    :raises ConfigurationError: the key is not a usable point.
    """
    y = int.from_bytes(ed25519_public, "little") & ((1 << 255) - 1)
    if y >= _P or (1 - y) % _P == 0:
        raise ConfigurationError("that public key is not one payload keys can be wrapped for")
    u = (1 + y) * pow(1 - y, -1, _P) % _P
    return u.to_bytes(32, "little")


def x25519_private(site_key: SiteKey) -> X25519PrivateKey:
    """The X25519 private key of a site: the Ed25519 secret scalar (RFC 8032's SHA-512 of the
    seed, first half; X25519 clamps it the same way)."""
    seed = site_key.private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return X25519PrivateKey.from_private_bytes(hashlib.sha512(seed).digest()[:32])


def _wrapping_key(shared: bytes, vm: str, key_id: str, site: str) -> tuple[AESGCM, bytes]:
    context = _WRAP_CONTEXT + b"\0".join(part.encode() for part in (vm, key_id, site))
    derived = HKDF(hashes.SHA256(), KEY_BYTES, salt=None, info=context).derive(shared)
    return AESGCM(derived), context


@dataclass(frozen=True)
class PayloadKey:
    """One payload key of a VM."""

    id: str
    key: bytes
    created_ms: int
    retired_ms: int | None = None
    """When a newer key replaced it (None: it is the current key)."""


class VmKeyRing:
    """The payload keys of one VM at one site (a :class:`.payload.PayloadCipher`)."""

    def __init__(self, root: Path, vm: str, site_key: SiteKey) -> None:
        self.path = root / KEYS_FOLDER / f"vm-{vm}.json"
        self.vm = vm
        self.site_key = site_key
        self._keys: dict[str, PayloadKey] = {}
        self._ciphers: dict[str, AESGCM] = {}
        if self.path.exists():
            self._keys = self._read()

    def _read(self) -> dict[str, PayloadKey]:
        try:
            document = json.loads(self.path.read_text())
            keys = [
                PayloadKey(
                    str(k["id"]),
                    base64.b64decode(k["key"]),
                    int(k["created_ms"]),
                    None if k.get("retired_ms") is None else int(k["retired_ms"]),
                )
                for k in document["keys"]
            ]
        except (ValueError, KeyError, TypeError) as error:
            raise ConfigurationError(
                f"{self.path} is not a payload key ring ({error}); restore it from a backup"
            ) from None
        return {k.id: k for k in keys}

    def _write(self) -> None:
        document = {
            "vm": self.vm,
            "keys": [
                {
                    "id": k.id,
                    "key": base64.b64encode(k.key).decode(),
                    "created_ms": k.created_ms,
                    "retired_ms": k.retired_ms,
                }
                for k in self._keys.values()
            ],
        }
        write_secret(self.path, (json.dumps(document, indent=2) + "\n").encode())

    @property
    def keys(self) -> tuple[PayloadKey, ...]:
        return tuple(self._keys.values())

    def current(self) -> PayloadKey | None:
        """The key new payloads are encrypted with (the newest not retired)."""
        live = [k for k in self._keys.values() if k.retired_ms is None]
        return max(live, key=lambda k: k.created_ms) if live else None

    def needs_rotation(self, at_ms: int | None = None) -> bool:
        """No current key, or one older than :data:`PAYLOAD_KEY_MAX_AGE_MS`."""
        current = self.current()
        at = now_ms() if at_ms is None else at_ms
        return current is None or at - current.created_ms > PAYLOAD_KEY_MAX_AGE_MS

    def rotate(self) -> PayloadKey:
        """Make a new current key (the first one, or retire the current); durable on return."""
        now = now_ms()
        old = self.current()
        if old is not None:
            self._keys[old.id] = replace(old, retired_ms=now)
        new = PayloadKey(os.urandom(8).hex(), AESGCM.generate_key(bit_length=256), now)
        self._keys[new.id] = new
        self._write()
        return new

    def prune(self, retention_ms: int, at_ms: int | None = None) -> list[str]:
        """Forget keys retired longer than ``retention_ms`` ago (no record on the topic still
        needs them); return their ids."""
        at = now_ms() if at_ms is None else at_ms
        gone = [
            k.id
            for k in self._keys.values()
            if k.retired_ms is not None and k.retired_ms + retention_ms < at
        ]
        if gone:
            for key_id in gone:
                del self._keys[key_id]
                self._ciphers.pop(key_id, None)
            self._write()
        return gone

    def _cipher(self, key_id: str) -> AESGCM | None:
        cipher = self._ciphers.get(key_id)
        if cipher is None and key_id in self._keys:
            cipher = self._ciphers[key_id] = AESGCM(self._keys[key_id].key)
        return cipher

    def seal(self, data: bytes, associated: bytes) -> tuple[Encryption, bytes]:
        """``data`` encrypted under the current key (a first key is made when there is none)."""
        key = self.current() or self.rotate()
        cipher = self._cipher(key.id)
        assert cipher is not None  # the current key is in the ring
        nonce = os.urandom(NONCE_BYTES)
        return Encryption(ALGORITHM, key.id, nonce), cipher.encrypt(nonce, data, associated)

    def open(self, encryption: Encryption, data: bytes, associated: bytes) -> bytes:
        """The plaintext of ``data``.

        :raises CorruptEventError: another algorithm, an unknown key id, or an altered payload,
            nonce or context (another VM, cycle or batch index than it was sealed for).
        """
        if encryption.algorithm != ALGORITHM:
            raise CorruptEventError(
                f"the payload is encrypted with {encryption.algorithm!r}; vmreplica reads "
                f"{ALGORITHM} only"
            )
        cipher = self._cipher(encryption.key_id)
        if cipher is None:
            raise CorruptEventError(
                f"the payload is encrypted with key {encryption.key_id!r}, which this site does "
                f"not hold for VM {self.vm!r}; it learns keys from the VM's signed VmConfig"
            )
        try:
            return cipher.decrypt(encryption.nonce, data, associated)
        except (InvalidTag, ValueError):
            raise CorruptEventError(
                f"the payload does not decrypt with key {encryption.key_id!r}: it was altered, "
                "or replayed under another VM, epoch, cycle or batch than it was sealed for"
            ) from None

    def wrap_for(self, recipients: dict[str, bytes]) -> tuple[WrappedKey, ...]:
        """Every key of the ring, wrapped for each site (name → its Ed25519 public key)."""
        wrapped = []
        for site, public in sorted(recipients.items()):
            peer = X25519PublicKey.from_public_bytes(x25519_public(public))
            for key in self._keys.values():
                ephemeral = X25519PrivateKey.generate()
                cipher, context = _wrapping_key(ephemeral.exchange(peer), self.vm, key.id, site)
                raw = ephemeral.public_key().public_bytes(
                    serialization.Encoding.Raw, serialization.PublicFormat.Raw
                )
                wrapped.append(
                    WrappedKey(
                        site, key.id, raw, cipher.encrypt(bytes(NONCE_BYTES), key.key, context)
                    )
                )
        return tuple(wrapped)

    def learn(self, config: VmConfig, site: str) -> list[str]:
        """Unwrap and keep the keys ``config`` wrapped for ``site``; return the new ids.

        Call only for a VmConfig whose signature was verified.

        :raises CorruptEventError: a key wrapped for this site does not unwrap (it was wrapped
            for another key of this site's, or altered).
        """
        own = x25519_private(self.site_key)
        learnt = []
        for wrapped in config.wrapped_keys:
            if wrapped.site != site or wrapped.key_id in self._keys:
                continue
            try:
                shared = own.exchange(X25519PublicKey.from_public_bytes(wrapped.ephemeral_public))
                cipher, context = _wrapping_key(shared, self.vm, wrapped.key_id, site)
                key = cipher.decrypt(bytes(NONCE_BYTES), wrapped.wrapped, context)
            except (InvalidTag, ValueError):
                raise CorruptEventError(
                    f"payload key {wrapped.key_id!r} wrapped for site {site!r} does not unwrap "
                    "with this site's key: the primary wrapped it for another key of this site "
                    "(was this site's key rotated?), or it was altered"
                ) from None
            self._keys[wrapped.key_id] = PayloadKey(wrapped.key_id, key, config.at_ms)
            learnt.append(wrapped.key_id)
        if learnt:
            self._write()  # durable before any payload needs it
        return learnt
