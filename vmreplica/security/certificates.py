"""The project's own certificate authorities and the certificates they sign: the secured
broker's, and the NBD TCP listener's (``vmreplica nbd-certificates``).

``vmreplica broker up --secure`` makes a fresh CA and one broker certificate per cluster, in
PEM, the way Kafka 4 reads them (``ssl.keystore.type=PEM``): the private key in PKCS#8 (Kafka
refuses PKCS#1), unencrypted, followed by the certificate chain in one key-store file. Keys are
ECDSA P-256: generating them costs microseconds where RSA costs a noticeable part of a second,
and every test broker makes its own.

Anything that holds a certificate this CA signed reaches the controller listener (mutual TLS)
with its common name as principal, a super user's included. So the CA key is never written
down: it signs the broker certificate and is gone, and nobody can issue another certificate
this cluster trusts.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_VALIDITY_DAYS: Final = 3650
"""The local CA outlives every broker it signs for."""
CERTIFICATE_VALIDITY_DAYS: Final = 825
"""The longest leaf validity clients commonly accept."""
CLOCK_SKEW: Final = datetime.timedelta(minutes=5)
"""Certificates start this much in the past, so a peer whose clock lags accepts them."""
BROKER_HOSTS: Final = ("localhost", "127.0.0.1")
"""Names a client checks the broker certificate against (hostname verification is on)."""


@dataclass(frozen=True)
class BrokerCertificates:
    """Where the PEM files of one secured cluster are."""

    folder: Path

    @property
    def ca_file(self) -> Path:
        """The CA certificate: every client's and every node's trust store."""
        return self.folder / "ca.crt"

    @property
    def keystore_file(self) -> Path:
        """The broker's PKCS#8 key, its certificate and the CA, in one file."""
        return self.folder / "broker.keystore.pem"


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _certificate_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _write_secret(path: Path, content: bytes) -> None:
    """Create ``path`` readable by its owner only, from its first byte."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(content)


def _name(common_name: str) -> x509.Name:
    # The CN alone: Kafka's principal-mapping rule ``^CN=(...)$`` then names the node ``broker``.
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _new_ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A fresh CA key and its self-signed certificate (which signs leaves, and nothing above)."""
    now = datetime.datetime.now(datetime.UTC) - CLOCK_SKEW
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(common_name)
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=CA_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return ca_key, ca


def _new_leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca: x509.Certificate,
    common_name: str,
    hosts: Sequence[str],
    usages: Sequence[x509.ObjectIdentifier],
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A fresh key and its certificate, signed by ``ca``, naming ``hosts`` (DNS names or IP
    addresses) for ``usages`` (server and/or client authentication)."""
    now = datetime.datetime.now(datetime.UTC) - CLOCK_SKEW
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=CERTIFICATE_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if hosts:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(host) for host in hosts]), critical=False
        )
    return key, builder.sign(ca_key, hashes.SHA256())


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_broker_certificates(folder: Path, principal: str = "broker") -> BrokerCertificates:
    """Create a CA and a broker certificate (CN ``principal``) under ``folder``.

    The broker certificate names ``localhost`` and ``127.0.0.1`` and serves both ends of TLS:
    the client listener (server) and the controller listener (server and client, mutual TLS).
    """
    folder.mkdir(parents=True, exist_ok=True)
    files = BrokerCertificates(folder)
    ca_key, ca = _new_ca("vmreplica local CA")
    usages = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)
    key, leaf = _new_leaf(ca_key, ca, principal, BROKER_HOSTS, usages)
    files.ca_file.write_bytes(_certificate_pem(ca))
    _write_secret(
        files.keystore_file, _private_pem(key) + _certificate_pem(leaf) + _certificate_pem(ca)
    )
    return files


NBD_HOSTS: Final = ("localhost", "127.0.0.1", "::1")
"""Names every NBD server certificate carries, beside the ones asked for."""


@dataclass(frozen=True)
class NbdCertificates:
    """A folder of NBD TLS credentials, named as QEMU's ``tls-creds-x509`` and libnbd's
    ``tls-certificates`` read them (GnuTLS's layout): the agent reads the CA and the server
    files; a client host needs the CA and the client files."""

    folder: Path

    @property
    def ca_file(self) -> Path:
        return self.folder / "ca-cert.pem"

    @property
    def server_cert_file(self) -> Path:
        return self.folder / "server-cert.pem"

    @property
    def server_key_file(self) -> Path:
        return self.folder / "server-key.pem"

    @property
    def client_cert_file(self) -> Path:
        return self.folder / "client-cert.pem"

    @property
    def client_key_file(self) -> Path:
        return self.folder / "client-key.pem"


def make_nbd_certificates(folder: Path, hosts: Sequence[str] = ()) -> NbdCertificates:
    """Create a CA, a server certificate for the agent's NBD TCP listener and a client
    certificate for the hypervisor, under ``folder``; keys mode 0600.

    The server certificate names ``hosts`` besides localhost, 127.0.0.1 and ::1 (clients check
    the name they connect to). As for the broker, the CA key is never written down: only the
    client certificate made here (or made by the next run, with a new CA) gets in.
    """
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    files = NbdCertificates(folder)
    ca_key, ca = _new_ca("vmreplica NBD CA")
    names = tuple(dict.fromkeys((*NBD_HOSTS, *hosts)))
    server_key, server = _new_leaf(ca_key, ca, names[0], names, (ExtendedKeyUsageOID.SERVER_AUTH,))
    client_key, client = _new_leaf(
        ca_key, ca, "vmreplica NBD client", (), (ExtendedKeyUsageOID.CLIENT_AUTH,)
    )
    files.ca_file.write_bytes(_certificate_pem(ca))
    _write_secret(files.server_key_file, _private_pem(server_key))
    files.server_cert_file.write_bytes(_certificate_pem(server))
    _write_secret(files.client_key_file, _private_pem(client_key))
    files.client_cert_file.write_bytes(_certificate_pem(client))
    return files
