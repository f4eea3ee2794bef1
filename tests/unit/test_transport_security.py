"""Transport security without a broker: the certificates Kafka will read, the ACL entries a
site gets, and the client settings of a site (secrets never shown)."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from vmreplica.config import SiteConfig, load_config
from vmreplica.domain import names
from vmreplica.errors import ConfigurationError
from vmreplica.journal.credentials import ClientSecurity
from vmreplica.security.broker import SecuredBroker
from vmreplica.security.certificates import make_broker_certificates
from vmreplica.security.grants import Operation, PatternType, ResourceType, site_grants


def test_broker_certificates_are_pem_pkcs8_and_name_the_loopback_host(tmp_path: Path) -> None:
    files = make_broker_certificates(tmp_path / "certs")
    keystore = files.keystore_file.read_bytes()
    assert keystore.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, not "EC PRIVATE KEY"
    assert stat.S_IMODE(files.keystore_file.stat().st_mode) == 0o600
    assert sorted(p.name for p in files.folder.iterdir()) == ["broker.keystore.pem", "ca.crt"]
    leaf, ca = x509.load_pem_x509_certificates(keystore)
    assert leaf.subject.rfc4514_string() == "CN=broker"
    names_ = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names_.get_values_for_type(x509.DNSName) == ["localhost"]
    assert names_.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert ca.public_bytes(serialization.Encoding.PEM) == files.ca_file.read_bytes()
    leaf.verify_directly_issued_by(ca)
    key = serialization.load_pem_private_key(keystore, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key() == leaf.public_key()


def test_the_secured_broker_keeps_its_secrets_to_its_owner(tmp_path: Path) -> None:
    secured = SecuredBroker(tmp_path / "secure")
    secured.prepare()
    for secret in (
        secured.broker_password_file,
        secured.admin_password_file,
        secured.admin_properties,
        secured.keystore_file,
    ):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    settings = secured.properties(30000, 30001)
    assert settings["listener.security.protocol.map"] == "CLIENT:SASL_SSL,CONTROLLER:SSL"
    assert settings["super.users"] == "User:broker;User:admin"
    assert settings["allow.everyone.if.no.acl.found"] == "false"
    password = secured.admin_password_file.read_text().strip()
    assert f'password="{password}"' in secured.admin_properties.read_text()
    assert password not in repr(secured.admin_security())


def test_a_site_is_granted_its_trust_group_and_nothing_else() -> None:
    grants = site_grants("tg")
    every_name = {
        names.journal_topic("web01", "tg"),
        names.status_topic("web01", "tg"),
        names.transactional_id("web01", "tg"),
    }
    assert {g.resource_name for g in grants} == {"vmreplica.tg."}
    assert all(g.pattern_type is PatternType.PREFIXED for g in grants)
    assert all(name.startswith("vmreplica.tg.") for name in every_name)
    # The trailing dot: group "tg" never covers group "tg2".
    assert not names.journal_topic("web01", "tg2").startswith("vmreplica.tg.")
    by_resource = {
        resource: {g.operation for g in grants if g.resource_type is resource}
        for resource in ResourceType
    }
    assert by_resource[ResourceType.TRANSACTIONAL_ID] == {Operation.WRITE, Operation.DESCRIBE}
    assert by_resource[ResourceType.GROUP] == {Operation.READ}
    assert by_resource[ResourceType.CLUSTER] == set()
    assert {Operation.WRITE, Operation.READ, Operation.CREATE} <= by_resource[ResourceType.TOPIC]


def _secured(tmp_path: Path, **settings: object) -> dict[str, object]:
    return {
        "site": "site-a",
        "root": tmp_path / "root",
        "security_protocol": "SASL_SSL",
        "sasl_username": "site-a",
        "ssl_ca_file": tmp_path / "ca.crt",
        **settings,
    }


def test_client_settings_read_the_password_file_and_never_show_it(tmp_path: Path) -> None:
    file = tmp_path / "site-a.password"
    file.write_text("s3cret-Pa55\n")
    config = SiteConfig(**_secured(tmp_path, sasl_password_file=file))  # type: ignore[arg-type]
    security = config.client_security()
    assert security.password == "s3cret-Pa55"
    assert "s3cret" not in repr(security)
    assert security.describe() == "user 'site-a' (SCRAM-SHA-512 over SASL_SSL)"
    secret = SiteConfig(**_secured(tmp_path, sasl_password="from-env"))  # type: ignore[arg-type]
    assert "from-env" not in repr(secret)
    assert secret.client_security().password == "from-env"


def test_incomplete_client_settings_are_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "site.toml"
    config.write_text(f'site = "site-a"\nroot = "{tmp_path}"\nsecurity_protocol = "SASL_SSL"\n')
    with pytest.raises(ConfigurationError, match="SASL_SSL needs sasl_username"):
        load_config(config)
    monkeypatch.setenv("VMREPLICA_SASL_USERNAME", "site-a")
    with pytest.raises(ConfigurationError, match="exactly one of sasl_password_file"):
        load_config(config)
    monkeypatch.setenv("VMREPLICA_SASL_PASSWORD_FILE", str(tmp_path / "absent"))
    loaded = load_config(config)
    with pytest.raises(ConfigurationError, match=r"cannot read sasl_password_file .*absent"):
        loaded.client_security()
    monkeypatch.setenv("VMREPLICA_SECURITY_PROTOCOL", "TLS")
    with pytest.raises(ConfigurationError, match="security_protocol"):
        load_config(config)


def test_an_unreadable_ca_file_is_named(tmp_path: Path) -> None:
    security = ClientSecurity("SSL", ca_file=tmp_path / "no-such-ca.crt")
    with pytest.raises(ConfigurationError, match=r"ssl_ca_file .*no-such-ca\.crt"):
        security.options()
    assert ClientSecurity().options() == {}
