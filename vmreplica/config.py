"""A site's settings: one object per process, validated at start-up.

Read from a TOML file (``--config site.toml`` or ``$VMREPLICA_CONFIG``) and ``VMREPLICA_*``
environment variables, the environment winning. A mistake is reported as one
:class:`ConfigurationError` naming the setting and what is allowed.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Any, Final

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from vmreplica.domain.hypervisor import parse_hypervisor
from vmreplica.domain.names import DEFAULT_PREFIX, DEFAULT_TRUST_GROUP, check_name
from vmreplica.errors import ConfigurationError

DEFAULT_BOOTSTRAP_SERVERS: Final = "127.0.0.1:19092"
"""Where `vmreplica broker up` listens by default."""


class SiteConfig(BaseSettings):
    """Everything one site's agent and commands need to know."""

    model_config = SettingsConfigDict(env_prefix="VMREPLICA_", extra="forbid", frozen=True)

    site: str = Field(default="site-a", description="This site's name, as partners know it.")
    root: Path = Field(
        default=Path("~/.vmreplica/site"),
        description="Storage root: catalog, change logs, replica images.",
    )
    bootstrap_servers: str = DEFAULT_BOOTSTRAP_SERVERS
    trust_group: str = DEFAULT_TRUST_GROUP
    topic_prefix: str = DEFAULT_PREFIX
    replication_factor: int = Field(default=1, ge=1, le=5)
    allowed_primaries: tuple[str, ...] = Field(
        default=("*",), description="Sites this replica accepts VMs from ('*': any)."
    )
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Serve Prometheus metrics on /metrics at this "
        "port (0: any free port; default: no metrics).",
    )
    metrics_address: str = Field(
        default="127.0.0.1",
        description="Address the metrics listen on: 0.0.0.0 (or ::) lets "
        "a Prometheus server on another host scrape them.",
    )
    heartbeat_seconds: float = Field(
        default=30.0,
        gt=0,
        description="A primary heartbeats this often (and once more when "
        "it has shipped all it had); a replica counts it alive until three pass without one. "
        "Use the same value at every site.",
    )
    nbd_socket_dir: Path | None = Field(
        default=None,
        description="Folder of the agent's NBD sockets, <dir>/<vm>.sock "
        "(default: <root>/vms/<vm>/nbd.sock). Socket paths must stay under 108 bytes.",
    )
    nbd_tcp_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Also serve every NBD export on this "
        "loopback TCP port, named <vm>.<disk> (0: any free port; default: Unix sockets only).",
    )
    nbd_tcp_host: str = Field(
        default="127.0.0.1", description="Loopback address of the NBD TCP listener."
    )
    vm_stop_command: str | None = Field(
        default=None, description="Hypervisor hook run before a planned failover ({vm})."
    )
    vm_start_command: str | None = Field(
        default=None, description="Hypervisor hook run by `failover planned --start` ({vm})."
    )
    hypervisor: str | None = Field(
        default=None,
        description="Hypervisor adapter of every VM of this site without its own "
        "--hypervisor: qemu:<qmp socket>[,ga=<guest agent socket>] or libvirt:<domain> "
        "({vm}: the VM's name). Takes the place of vm_stop_command and vm_start_command.",
    )

    @field_validator("site", "trust_group", "topic_prefix")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        return check_name("site or trust group", value)

    @field_validator("hypervisor")
    @classmethod
    def _hypervisor(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_hypervisor(value, option="hypervisor")
            except ConfigurationError as error:
                raise ValueError(str(error)) from None
        return value

    @field_validator("root")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("nbd_socket_dir")
    @classmethod
    def _absolute_or_none(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser().resolve()

    @field_validator("nbd_tcp_host")
    @classmethod
    def _loopback(cls, value: str) -> str:
        # NBD has no authentication here: the export must not be reachable from the network.
        try:
            loopback = ipaddress.ip_address(value).is_loopback
        except ValueError:
            loopback = value == "localhost"
        if not loopback:
            raise ValueError(
                f"{value!r} is not a loopback address (127.0.0.1, ::1); the NBD "
                "exports carry no authentication and must stay on this machine"
            )
        return value

    @field_validator("metrics_address")
    @classmethod
    def _ip_address(cls, value: str) -> str:
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            raise ValueError(
                f"{value!r} is not an IP address (127.0.0.1, 0.0.0.0, ::1, ::, "
                "or one of this host's addresses)"
            ) from None

    @property
    def catalog_path(self) -> Path:
        return self.root / "catalog.sqlite"

    def vm_folder(self, vm: str) -> Path:
        return self.root / "vms" / check_name("VM", vm)

    def accepts(self, primary_site: str) -> bool:
        return "*" in self.allowed_primaries or primary_site in self.allowed_primaries


def load_config(path: Path | None = None, **overrides: Any) -> SiteConfig:
    """The site configuration from ``path`` (or ``$VMREPLICA_CONFIG``), env and overrides.

    :raises ConfigurationError: the file is missing or unreadable, or a value is invalid.
    """
    if path is None and os.environ.get("VMREPLICA_CONFIG"):
        path = Path(os.environ["VMREPLICA_CONFIG"])
    values: dict[str, Any] = {}
    if path is not None:
        try:
            values = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigurationError(f"site configuration {path} does not exist") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigurationError(
                f"site configuration {path} is not valid TOML: {error}"
            ) from None
    environment = {
        name.removeprefix("VMREPLICA_").lower()
        for name in os.environ
        if name.startswith("VMREPLICA_")
    }
    values = {k: v for k, v in values.items() if k not in environment}
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return SiteConfig(**values)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()
        )
        source = f" in {path}" if path else ""
        raise ConfigurationError(f"invalid site configuration{source}: {problems}") from None


def cannot_listen(
    port_setting: str, address_setting: str, port: int, address: str, error: OSError
) -> ConfigurationError:
    """A listener of the agent could not start: one line naming the settings, what went wrong
    and what to do."""
    # asyncio's own strerror repeats the address: the errno's text is enough
    problem = os.strerror(error.errno) if error.errno else str(error)
    if error.errno == errno.EADDRINUSE:
        action = (
            f"stop the process that listens there (`ss -ltnp 'sport = :{port}'` names "
            f"it), or set `{port_setting}` to a free port (0: any free port)"
        )
    elif error.errno == errno.EADDRNOTAVAIL:
        action = f"set `{address_setting}` to an address of this machine"
    elif error.errno == errno.EACCES:
        action = f"set `{port_setting}` to a port above 1023, or grant CAP_NET_BIND_SERVICE"
    else:
        action = f"check `{port_setting}` and `{address_setting}`"
    return ConfigurationError(
        f"cannot listen on {address} port {port} (`{port_setting}`): "
        f"{problem}. Operator action: {action}."
    )
