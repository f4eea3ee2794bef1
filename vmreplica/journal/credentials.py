"""How a client proves who it is to Kafka and checks that the broker is the right one.

:class:`ClientSecurity` turns a site's settings (protocol, SASL mechanism, user, password, CA,
client certificate) into aiokafka's options; every producer, consumer and admin client of
:mod:`vmreplica.journal.kafka` takes them through :class:`~vmreplica.journal.kafka.KafkaConnection`.
:func:`check_login` opens one connection the way those clients will, so a wrong password or an
untrusted broker certificate is reported at start-up in one line instead of as an endless
"unable to bootstrap" later. The password never appears in ``repr``, logs or messages.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from aiokafka.conn import create_conn
from aiokafka.errors import (
    AuthenticationFailedError,
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)
from aiokafka.helpers import create_ssl_context

from vmreplica.errors import ConfigurationError

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"]
LOGIN_TIMEOUT_MS: Final = 10_000
"""How long the start-up login check waits for one broker to answer."""


@contextlib.contextmanager
def _quiet_aiokafka() -> Iterator[None]:
    """aiokafka logs a failed connection itself; the caller reports it in one line instead."""
    logger = logging.getLogger("aiokafka")  # its modules' loggers inherit its level
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


@dataclass(frozen=True)
class ClientSecurity:
    """TLS and SASL settings of every Kafka client of one process (PLAINTEXT: none)."""

    protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism = "SCRAM-SHA-512"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @property
    def uses_tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.protocol.startswith("SASL_")

    def describe(self) -> str:
        """Who connects and how, for messages (never the password)."""
        if self.uses_sasl:
            return f"user {self.username!r} ({self.sasl_mechanism} over {self.protocol})"
        return f"{self.protocol} client"

    def ssl_context(self) -> ssl.SSLContext:
        """A context that checks the broker's certificate and host name against ``ca_file``.

        :raises ConfigurationError: a certificate, key or CA file cannot be read.
        """
        try:
            with _quiet_aiokafka():  # it logs every CA file it loads, once per client
                context: ssl.SSLContext = create_ssl_context(
                    cafile=self.ca_file, certfile=self.cert_file, keyfile=self.key_file
                )
            return context
        except (OSError, ssl.SSLError) as error:
            files = ", ".join(
                f"{name} {path}"
                for name, path in (
                    ("ssl_ca_file", self.ca_file),
                    ("ssl_cert_file", self.cert_file),
                    ("ssl_key_file", self.key_file),
                )
                if path is not None
            )
            raise ConfigurationError(
                f"cannot load the TLS files ({files or 'system CAs'}): "
                f"{getattr(error, 'strerror', None) or error}. Operator action: point these "
                "settings at readable PEM files (the CA the broker's certificate is signed by)"
            ) from None

    def options(self) -> dict[str, Any]:
        """aiokafka keyword arguments for this security setting."""
        if self.protocol == "PLAINTEXT":
            return {}
        options: dict[str, Any] = {"security_protocol": self.protocol}
        if self.uses_tls:
            options["ssl_context"] = self.ssl_context()
        if self.uses_sasl:
            options["sasl_mechanism"] = self.sasl_mechanism
            options["sasl_plain_username"] = self.username
            options["sasl_plain_password"] = self.password
        return options


async def check_login(bootstrap_servers: str, security: ClientSecurity, client_id: str) -> None:
    """Log in to the first bootstrap server that answers, as every client will.

    A broker that cannot be reached is not an error here (the agent waits for it as before);
    a broker that refuses the login, or whose certificate the CA does not vouch for, is.

    :raises ConfigurationError: the credentials or the TLS settings do not work (one line).
    """
    if security.protocol == "PLAINTEXT":
        return
    options = security.options()
    for server in bootstrap_servers.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            with _quiet_aiokafka():
                connection = await create_conn(
                    host,
                    int(port),
                    client_id=client_id,
                    request_timeout_ms=LOGIN_TIMEOUT_MS,
                    **options,
                )
        except ssl.SSLCertVerificationError as error:
            raise ConfigurationError(
                f"the broker at {server} is not trusted: {error.verify_message}. Operator "
                "action: set `ssl_ca_file` to the CA that signed the broker's certificate "
                "(`vmreplica broker status --json` shows it as ca_file)"
            ) from None
        except UnsupportedSaslMechanismError:
            raise ConfigurationError(
                f"Kafka at {server} does not accept {security.sasl_mechanism}. Operator "
                "action: set `sasl_mechanism` to one the broker enables (SCRAM-SHA-512 for "
                "`vmreplica broker up --secure`)"
            ) from None
        except (SaslAuthenticationFailed, AuthenticationFailedError):
            raise ConfigurationError(
                f"Kafka at {server} refused the login of {security.describe()}: the user name "
                "or password is wrong. Operator action: check `sasl_username` and the password "
                "in `sasl_password_file` (or $VMREPLICA_SASL_PASSWORD); `vmreplica broker "
                "add-site` writes both"
            ) from None
        except (KafkaError, OSError, TimeoutError):
            continue  # not reachable, or not answering yet: the agent waits for it as before
        connection.close()
        return
