"""What makes a local broker a secured one: certificates, its own passwords, its settings.

``vmreplica broker up --secure`` serves clients on ``SASL_SSL`` (SCRAM-SHA-512 over TLS) and
the KRaft controller on ``SSL`` with mutual TLS; key and trust stores are PEM files
(:mod:`vmreplica.security.certificates`). Kafka's ``StandardAuthorizer`` denies whatever no ACL
allows; the super users are the broker itself (``User:broker``: its certificate on the
controller listener, its SCRAM login for transaction markers on the client listener) and the
local ``admin`` that ``broker add-site`` uses. Both SCRAM users are created when the storage is
formatted, before the first start; sites' users come later, through the admin API.

Everything secret lives in ``<broker>/secure``, readable by its owner only.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from vmreplica.journal.credentials import ClientSecurity
from vmreplica.security.certificates import BrokerCertificates, make_broker_certificates

BROKER_USER: Final = "broker"
ADMIN_USER: Final = "admin"
MECHANISM: Final = "SCRAM-SHA-512"
PRINCIPAL_RULE: Final = "RULE:^CN=([a-zA-Z0-9._-]+)$/$1/,DEFAULT"
"""``CN=broker`` (the node certificate, the whole subject) is ``User:broker``."""
AUTHORIZER: Final = "org.apache.kafka.metadata.authorizer.StandardAuthorizer"


def write_secret(path: Path, text: str) -> None:
    """Write ``path`` readable by its owner only, from the moment it exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)


def new_password() -> str:
    """A random password of URL-safe characters (safe inside Kafka's ``[name=..,password=..]``
    and JAAS quoting)."""
    return secrets.token_urlsafe(24)


@dataclass(frozen=True)
class SecuredBroker(BrokerCertificates):
    """The secured cluster's files, under ``folder``: its certificates, passwords and the
    admin's client properties."""

    @property
    def broker_password_file(self) -> Path:
        return self.folder / "broker.password"

    @property
    def admin_password_file(self) -> Path:
        return self.folder / "admin.password"

    @property
    def admin_properties(self) -> Path:
        """Client properties of the admin for Kafka's own tools (``--command-config``)."""
        return self.folder / "admin.properties"

    @property
    def sites_folder(self) -> Path:
        """Where ``broker add-site`` writes each site's password file."""
        return self.folder / "sites"

    def admin_security(self) -> ClientSecurity:
        return ClientSecurity(
            "SASL_SSL",
            MECHANISM,
            ADMIN_USER,
            self.admin_password_file.read_text().strip(),
            self.ca_file,
        )

    def prepare(self) -> None:
        """Create the CA, the broker certificate, both passwords and the admin's properties."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        make_broker_certificates(self.folder, BROKER_USER)
        write_secret(self.broker_password_file, new_password())
        admin_password = new_password()
        write_secret(self.admin_password_file, admin_password)
        write_secret(
            self.admin_properties,
            "security.protocol=SASL_SSL\n"
            f"sasl.mechanism={MECHANISM}\n"
            "sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required "
            f'username="{ADMIN_USER}" password="{admin_password}";\n'
            "ssl.truststore.type=PEM\n"
            f"ssl.truststore.location={self.ca_file}\n",
        )

    def scrub(self, text: str) -> str:
        """``text`` (a tool's output) with the broker's and the admin's passwords masked."""
        for file in (self.broker_password_file, self.admin_password_file):
            text = text.replace(file.read_text().strip(), "********")
        return text

    def format_arguments(self) -> list[str]:
        """``StorageTool format`` options that create the broker's and the admin's users."""
        arguments = []
        for user, file in (
            (BROKER_USER, self.broker_password_file),
            (ADMIN_USER, self.admin_password_file),
        ):
            password = file.read_text().strip()
            arguments += ["--add-scram", f"{MECHANISM}=[name={user},password={password}]"]
        return arguments

    def properties(self, broker_port: int, controller_port: int) -> dict[str, str]:
        """The listener and security settings of one node."""
        password = self.broker_password_file.read_text().strip()
        return {
            "listeners": (
                f"CLIENT://127.0.0.1:{broker_port},CONTROLLER://127.0.0.1:{controller_port}"
            ),
            "advertised.listeners": f"CLIENT://127.0.0.1:{broker_port}",
            "listener.security.protocol.map": "CLIENT:SASL_SSL,CONTROLLER:SSL",
            "inter.broker.listener.name": "CLIENT",
            "sasl.enabled.mechanisms": MECHANISM,
            "sasl.mechanism.inter.broker.protocol": MECHANISM,
            f"listener.name.client.{MECHANISM.lower()}.sasl.jaas.config": (
                "org.apache.kafka.common.security.scram.ScramLoginModule required "
                f'username="{BROKER_USER}" password="{password}";'
            ),
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(self.keystore_file),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(self.ca_file),
            "ssl.endpoint.identification.algorithm": "https",
            "listener.name.controller.ssl.client.auth": "required",
            "ssl.principal.mapping.rules": PRINCIPAL_RULE,
            "authorizer.class.name": AUTHORIZER,
            "super.users": f"User:{BROKER_USER};User:{ADMIN_USER}",
            "allow.everyone.if.no.acl.found": "false",
        }
