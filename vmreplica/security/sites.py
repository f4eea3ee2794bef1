"""A site's identity at a secured Kafka: its SCRAM user, its password file, its grants.

``vmreplica broker add-site SITE --trust-group G`` creates the user (named after the site
unless told otherwise), writes its password to a file only the owner can read, and grants it
the rights of :func:`vmreplica.security.grants.site_grants` for trust group ``G``. Running it
again for the same user keeps the password already in its file and adds the rights of another
trust group, so one site can serve several groups. The password is never printed or logged:
the site's configuration names the file (``sasl_password_file``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vmreplica.domain.names import DEFAULT_PREFIX, check_name
from vmreplica.journal.access import grant_site
from vmreplica.journal.kafka import KafkaConnection
from vmreplica.security.broker import MECHANISM, new_password, write_secret
from vmreplica.security.grants import Grant, site_grants


@dataclass(frozen=True)
class SiteAccess:
    """What a site needs in its configuration to use the secured cluster."""

    site: str
    user: str
    password_file: Path
    trust_group: str
    bootstrap_servers: str
    ca_file: Path
    grants: tuple[Grant, ...]

    def settings(self) -> dict[str, str]:
        """The site.toml settings, the password by file only."""
        return {
            "bootstrap_servers": self.bootstrap_servers,
            "trust_group": self.trust_group,
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": MECHANISM,
            "sasl_username": self.user,
            "sasl_password_file": str(self.password_file),
            "ssl_ca_file": str(self.ca_file),
        }


def _password(file: Path) -> str:
    """The password already in ``file``, or a new one written there (mode 0600)."""
    if file.is_file():
        existing = file.read_text().strip()
        if existing:
            return existing
    password = new_password()
    write_secret(file, password + "\n")
    return password


async def add_site(
    admin: KafkaConnection,
    ca_file: Path,
    site: str,
    trust_group: str,
    password_file: Path,
    *,
    user: str | None = None,
    prefix: str = DEFAULT_PREFIX,
) -> SiteAccess:
    """Create or update ``site``'s user and grant it trust group ``trust_group``.

    :raises ConfigurationError: a name is not a valid site, trust-group or prefix name.
    :raises BrokerError: the cluster refused the admin or did not apply the change in time.
    """
    check_name("site", site)
    user = check_name("Kafka user", user or site)
    grants = site_grants(trust_group, prefix)
    password = _password(password_file)
    await grant_site(admin, user, password, grants, mechanism=MECHANISM)
    return SiteAccess(
        site, user, password_file, trust_group, admin.bootstrap_servers, ca_file, grants
    )
