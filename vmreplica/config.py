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

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from vmreplica.domain.hypervisor import parse_hypervisor
from vmreplica.domain.names import DEFAULT_PREFIX, DEFAULT_TRUST_GROUP, check_name
from vmreplica.errors import ConfigurationError
from vmreplica.journal.credentials import ClientSecurity, SaslMechanism, SecurityProtocol

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
    replica_enabled: bool = Field(
        default=True,
        description="This site adopts new VMs of its trust group as their replica "
        "(Hyper-V's ReplicationEnabled); false: it keeps those it has and adopts no other.",
    )
    replica_storage: Path | None = Field(
        default=None,
        description="Where replica images of newly adopted VMs go, <dir>/<vm>/ (Hyper-V's "
        "DefaultStorageLocation; default: <root>/vms/<vm>/); an authorization entry's storage "
        "wins for its primaries.",
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
        default="127.0.0.1",
        description="Address of the NBD TCP listener: loopback, unless TLS is required "
        "(nbd_tls_dir and nbd_tls_required).",
    )
    nbd_tls_dir: Path | None = Field(
        default=None,
        description="Folder holding ca-cert.pem, server-cert.pem and server-key.pem "
        "(`vmreplica nbd-certificates` makes them): the NBD TCP listener offers TLS "
        "(NBD_OPT_STARTTLS) and admits only clients with a certificate that CA signed.",
    )
    nbd_tls_required: bool = Field(
        default=True,
        description="With nbd_tls_dir: refuse TCP clients that do not start TLS "
        "(NBD_REP_ERR_TLS_REQD). Unix sockets stay plain.",
    )
    security_protocol: SecurityProtocol = Field(
        default="PLAINTEXT",
        description="How clients reach Kafka: SASL_SSL for `broker up --secure`.",
    )
    sasl_mechanism: SaslMechanism = "SCRAM-SHA-512"
    sasl_username: str | None = Field(default=None, description="This site's Kafka user.")
    sasl_password_file: Path | None = Field(
        default=None, description="File holding the user's password (mode 0600)."
    )
    sasl_password: SecretStr | None = Field(
        default=None,
        description="The password itself, for $VMREPLICA_SASL_PASSWORD (prefer the file).",
    )
    ssl_ca_file: Path | None = Field(
        default=None, description="PEM CA that signed the brokers' certificates."
    )
    ssl_cert_file: Path | None = Field(
        default=None, description="PEM client certificate, for brokers that require one."
    )
    ssl_key_file: Path | None = Field(default=None, description="PEM key of ssl_cert_file.")
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

    @field_validator(
        "nbd_socket_dir",
        "nbd_tls_dir",
        "sasl_password_file",
        "ssl_ca_file",
        "ssl_cert_file",
        "ssl_key_file",
        "replica_storage",
    )
    @classmethod
    def _absolute_or_none(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser().resolve()

    @model_validator(mode="after")
    def _complete_security(self) -> SiteConfig:
        if self.security_protocol.startswith("SASL_"):
            if not self.sasl_username:
                raise ValueError(f"security_protocol {self.security_protocol} needs sasl_username")
            if (self.sasl_password_file is None) == (self.sasl_password is None):
                raise ValueError(
                    f"security_protocol {self.security_protocol} needs exactly one of "
                    "sasl_password_file and $VMREPLICA_SASL_PASSWORD"
                )
        if (self.ssl_cert_file is None) != (self.ssl_key_file is None):
            raise ValueError("ssl_cert_file and ssl_key_file go together")
        return self

    @model_validator(mode="after")
    def _loopback_unless_tls(self) -> SiteConfig:
        # Without required TLS (client certificates) an NBD client is not authenticated: the
        # exports must not be reachable from the network.
        value = self.nbd_tcp_host
        try:
            loopback = ipaddress.ip_address(value).is_loopback
        except ValueError:
            loopback = value == "localhost"
        if not loopback and (self.nbd_tls_dir is None or not self.nbd_tls_required):
            raise ValueError(
                f"nbd_tcp_host {value!r} is not a loopback address (127.0.0.1, ::1); without "
                "TLS the NBD exports carry no authentication and must stay on this machine. "
                "Set nbd_tls_dir (and leave nbd_tls_required on) to serve them on the network"
            )
        return self

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

    def client_security(self) -> ClientSecurity:
        """The Kafka clients' TLS and SASL settings, the password read from its file.

        :raises ConfigurationError: the password file cannot be read or is empty (one line).
        """
        password = None
        if self.sasl_password is not None:
            password = self.sasl_password.get_secret_value()
        elif self.sasl_password_file is not None and self.security_protocol.startswith("SASL_"):
            file = self.sasl_password_file
            try:
                password = file.read_text().strip()
            except OSError as error:
                raise ConfigurationError(
                    f"cannot read sasl_password_file {file}: {error.strerror}. Operator "
                    "action: point it at the file `vmreplica broker add-site` wrote"
                ) from None
            if not password:
                raise ConfigurationError(f"sasl_password_file {file} is empty")
        return ClientSecurity(
            self.security_protocol,
            self.sasl_mechanism,
            self.sasl_username,
            password,
            self.ssl_ca_file,
            self.ssl_cert_file,
            self.ssl_key_file,
        )

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
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" if e["loc"] else e["msg"]
            for e in error.errors()
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
