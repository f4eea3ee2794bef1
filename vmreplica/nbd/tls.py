"""TLS for the NBD TCP listener: the server's credentials, in the folder layout QEMU's
``tls-creds-x509`` and libnbd's ``tls-certificates`` use (GnuTLS's names), so one folder made
by ``vmreplica nbd-certificates`` serves the agent and, copied, the hypervisor host.

The listener asks every client for a certificate and accepts only one the folder's CA signed:
TLS here is the export's access control, not only its privacy (an NBD client may write the
disk). TLS 1.2 is the oldest version offered, as the NBD spec asks.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from vmreplica.errors import ConfigurationError

CA_FILE: Final = "ca-cert.pem"
SERVER_CERT_FILE: Final = "server-cert.pem"
SERVER_KEY_FILE: Final = "server-key.pem"
CLIENT_CERT_FILE: Final = "client-cert.pem"
CLIENT_KEY_FILE: Final = "client-key.pem"


@dataclass(frozen=True)
class NbdTls:
    """What a TCP listener offers: its TLS context, and whether clients must use it."""

    context: ssl.SSLContext
    required: bool


def load_server_tls(folder: Path, *, required: bool) -> NbdTls:
    """The server side of NBD TLS from ``folder`` (CA, server certificate and key).

    :raises ConfigurationError: a file is missing, unreadable, or not PEM credentials that
        belong together.
    """
    files = [folder / name for name in (CA_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE)]
    missing = [str(path) for path in files if not path.is_file()]
    if missing:
        raise ConfigurationError(
            f"nbd_tls_dir {folder} lacks {', '.join(missing)}. Make the NBD certificates with "
            f"`vmreplica nbd-certificates {folder}` (or put a CA and the server's certificate "
            "and key there under these names)"
        )
    ca, cert, key = files
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_cert_chain(cert, key)
        context.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError, ValueError) as error:
        raise ConfigurationError(
            f"nbd_tls_dir {folder}: cannot load the NBD TLS credentials ({error}). Check that "
            f"{cert.name} and {key.name} are a PEM certificate and its key, and {ca.name} the "
            "CA that signed the clients' certificates; or make a new set with "
            f"`vmreplica nbd-certificates {folder}`"
        ) from None
    return NbdTls(context, required)
