"""Which hypervisor runs a VM at a site, as ``--hypervisor`` and the site's ``hypervisor`` say.

A spec is one line of text, parsed here and nowhere else:

- ``qemu:<qmp socket>[,ga=<guest agent socket>][,timeout=<seconds>]``: QEMU's QMP Unix socket
  (``-qmp unix:<path>,server=on,wait=off``) and, for application-consistent points, the socket
  of the guest agent's virtio-serial channel;
- ``libvirt:<domain>[,connect=<uri>][,timeout=<seconds>]``: a libvirt domain, driven by
  ``virsh`` (``-c <uri>`` when given).

``{vm}`` anywhere in a spec stands for the VM's name, so one site-wide spec
(``qemu:/run/vmreplica/{vm}.qmp,ga=/run/vmreplica/{vm}.qga``) serves every VM. ``timeout`` bounds
every call to the hypervisor (default :data:`HYPERVISOR_TIMEOUT_SECONDS`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, Literal

from vmreplica.errors import ConfigurationError

HypervisorKind = Literal["qemu", "libvirt"]

HYPERVISOR_TIMEOUT_SECONDS: Final = 60.0
"""Longest one hypervisor call may take (a QMP command, a freeze, a guest's shutdown)."""
MAX_TIMEOUT_SECONDS: Final = 3600.0
"""A longer timeout would hold a failover or a frozen guest for more than an hour."""

_KEYS: Final[dict[str, tuple[str, ...]]] = {
    "qemu": ("ga", "timeout"),
    "libvirt": ("connect", "timeout"),
}
_EXAMPLES: Final = (
    "qemu:/run/vmreplica/web01.qmp[,ga=/run/vmreplica/web01.qga][,timeout=60] or "
    "libvirt:web01[,connect=qemu:///system][,timeout=60]"
)


@dataclass(frozen=True)
class HypervisorSpec:
    """A parsed ``--hypervisor`` value, ``{vm}`` already replaced."""

    kind: HypervisorKind
    target: str
    """The QMP socket's path (qemu) or the domain's name (libvirt)."""
    guest_agent: str | None = None
    """qemu: the guest agent's socket, needed to freeze the guest's file systems."""
    connect: str | None = None
    """libvirt: the connection URI (``virsh -c``)."""
    timeout_seconds: float = HYPERVISOR_TIMEOUT_SECONDS


def parse_hypervisor(text: str, vm: str = "{vm}", option: str = "--hypervisor") -> HypervisorSpec:
    """Parse ``text`` for VM ``vm`` (the default keeps ``{vm}`` as it is, to check a template).

    :raises ConfigurationError: an unknown kind or key, a relative socket path, a bad timeout;
        the message names ``option`` and shows the accepted forms.
    """
    kind, colon, rest = text.strip().partition(":")
    if kind not in _KEYS or not colon or not rest:
        raise ConfigurationError(f"{option} {text!r}: expected {_EXAMPLES}")
    target, *pairs = rest.replace("{vm}", vm).split(",")
    options: dict[str, str] = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if key not in _KEYS[kind] or not equals or not value:
            raise ConfigurationError(
                f"{option} {text!r}: {pair!r} is not one of the {kind} options "
                f"({', '.join(k + '=...' for k in _KEYS[kind])}); expected {_EXAMPLES}"
            )
        options[key] = value
    timeout = _timeout(options.get("timeout"), text, option)
    if kind == "libvirt":
        if not target.strip():
            raise ConfigurationError(f"{option} {text!r}: name the libvirt domain")
        return HypervisorSpec("libvirt", target, connect=options.get("connect"),
                              timeout_seconds=timeout)  # fmt: skip
    guest_agent = options.get("ga")
    for what, path in (("QMP socket", target), ("guest agent socket", guest_agent)):
        if path is not None and not path.startswith("/"):
            raise ConfigurationError(
                f"{option} {text!r}: the {what} must be an absolute path, not {path!r}"
            )
    return HypervisorSpec("qemu", target, guest_agent=guest_agent, timeout_seconds=timeout)


def _timeout(value: str | None, text: str, option: str) -> float:
    if value is None:
        return HYPERVISOR_TIMEOUT_SECONDS
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= MAX_TIMEOUT_SECONDS:
        raise ConfigurationError(
            f"{option} {text!r}: timeout must be a number of seconds above 0 and at most "
            f"{MAX_TIMEOUT_SECONDS:g}, not {value!r}"
        )
    return seconds
