"""Names of VMs, sites, disks and trust groups, and the Kafka names derived from them.

One journal topic per VM, ``<prefix>.<trust-group>.<vm>.journal``, and a ``.status`` topic beside
it; one compacted ``<prefix>.<trust-group>.configs`` topic per trust group; the same
``transactional_id`` for a VM at every site. A name that passes :func:`check_name` is safe as a
topic part, a file name and an NBD export name alike.
"""

from __future__ import annotations

import re
from typing import Final

from vmreplica.errors import ConfigurationError

NAME_PATTERN: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
"""VM, site and trust-group names: safe as topic parts, file names and NBD export names alike."""
SHOWN_NAME_CHARS: Final = 40
"""A refused name is quoted up to this many characters: a 1,000-character one would drown the
message (and the VM state and log line that carry it)."""
DEFAULT_PREFIX: Final = "vmreplica"
DEFAULT_TRUST_GROUP: Final = "default"


def check_name(kind: str, name: str) -> str:
    """Return ``name`` if it is a valid VM, site, disk or trust-group name.

    :raises ConfigurationError: the name could escape a folder, collide or break a topic name.
    """
    if not NAME_PATTERN.fullmatch(name):
        raise ConfigurationError(
            f"{kind} name {shown_name(name)} is not allowed: use 1-64 letters, digits, '-' or "
            "'_', starting with a letter or digit (no dots, slashes or spaces)"
        )
    return name


def shown_name(name: object) -> str:
    """``name`` quoted for a message: control characters escaped, a long one cut short."""
    text = repr(name)
    if not isinstance(name, str) or len(name) <= SHOWN_NAME_CHARS:
        return text
    return f"{name[:SHOWN_NAME_CHARS]!r}... ({len(name)} characters)"


def journal_topic(
    vm: str, trust_group: str = DEFAULT_TRUST_GROUP, prefix: str = DEFAULT_PREFIX
) -> str:
    return f"{prefix}.{check_name('trust group', trust_group)}.{check_name('VM', vm)}.journal"


def status_topic(
    vm: str, trust_group: str = DEFAULT_TRUST_GROUP, prefix: str = DEFAULT_PREFIX
) -> str:
    return f"{prefix}.{check_name('trust group', trust_group)}.{check_name('VM', vm)}.status"


def configs_topic(trust_group: str = DEFAULT_TRUST_GROUP, prefix: str = DEFAULT_PREFIX) -> str:
    """The trust group's compacted topic of VM configurations (key: VM), where a replica site
    added at any time finds every VM and its settings. Three parts, never four: no VM's topic
    (``<prefix>.<group>.<vm>.journal``) can take its name."""
    return f"{prefix}.{check_name('trust group', trust_group)}.configs"


def transactional_id(
    vm: str, trust_group: str = DEFAULT_TRUST_GROUP, prefix: str = DEFAULT_PREFIX
) -> str:
    """The same at every site, so the broker fences a stale primary when a new one starts."""
    return f"{prefix}.{check_name('trust group', trust_group)}.{check_name('VM', vm)}.primary"
