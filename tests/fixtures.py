"""Factories for what tests build over and over: sites, their configuration files, and VMs.

Registered from ``tests/conftest.py`` (``pytest_plugins``), so every test can ask for

- ``sites``: a :class:`SiteFactory` — configurations, ``site.toml`` files and :class:`Site`
  objects of any number of sites that share the session's broker and a trust group of their
  own (so topics never collide between tests); sites it started stop after the test;
- ``site_pair``: sites A (``site-a``) and B (``site-b``) of that factory, started;
- ``vm``: enables a VM on a site, with disks of given sizes and settings (:class:`VmFactory`);
- ``site_folder``: where site roots and configuration files go: a short folder under /tmp
  (:func:`short_dir`), as the sites' NBD Unix sockets live there;
- ``broker_security``: ``"plain"``; a module that overrides it with ``"secured"`` runs its
  ``sites`` against the secured broker (``secured_kafka``: one per session, started on first
  use; TLS, SCRAM, ACLs), each of sites ``site-a``, ``site-b`` and ``site-c`` logging in as
  its own Kafka user with the rights of the test's trust group only.

:class:`SiteFactory` and :func:`enable_vm` also work without pytest's fixtures, for a test that
runs its own event loop per hypothesis example.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest

from vmreplica.cli.server import toml_value
from vmreplica.config import SiteConfig
from vmreplica.devtools.cluster import ClusterState
from vmreplica.domain.model import VmRecord, VmSettings
from vmreplica.journal.kafka import KafkaConnection
from vmreplica.runtime.site import Site
from vmreplica.security.sites import SiteAccess, add_site
from vmreplica.storage.image import sha256_of


class SiteFactory:
    """Sites of one test: one broker, one trust group, each root at ``<folder>/<site name>``.

    Every method takes the site's name and any other :class:`SiteConfig` setting as keywords
    (``heartbeat_seconds=1.0``, ``metrics_port=...``, ``trust_group=...`` for a site of
    another group).
    """

    def __init__(
        self,
        folder: Path,
        bootstrap_servers: str,
        trust_group: str,
        secured: SecuredKafka | None = None,
    ) -> None:
        self.folder = folder
        self.bootstrap_servers = bootstrap_servers
        self.trust_group = trust_group
        self.secured = secured
        self.access: dict[str, SiteAccess] = {}
        """Each site's Kafka identity on a secured broker (see :meth:`add_principal`)."""
        self._started: list[Site] = []

    async def add_principal(self, name: str, trust_group: str | None = None) -> SiteAccess:
        """Give site ``name`` its own Kafka user with the rights of ``trust_group`` (the
        factory's by default) on the secured broker."""
        assert self.secured is not None, "a plain broker has no principals"
        group = trust_group or self.trust_group
        access = await self.secured.add_site(name, group, self.folder)
        self.access[name] = access
        return access

    def settings(self, name: str, **overrides: Any) -> dict[str, Any]:
        """The settings of site ``name``, as a configuration file would hold them."""
        security: dict[str, Any] = {}
        if self.secured is not None:
            assert name in self.access, f"call `await sites.add_principal({name!r})` first"
            security = dict(self.access[name].settings())
        return {
            **security,
            "site": name,
            "root": self.folder / name,
            "bootstrap_servers": self.bootstrap_servers,
            "trust_group": self.trust_group,
            **overrides,
        }

    def config(self, name: str, **overrides: Any) -> SiteConfig:
        return SiteConfig(**self.settings(name, **overrides))

    def config_file(self, name: str, *, to: Path | None = None, **overrides: Any) -> Path:
        """Write ``<folder>/<name>.toml`` (or ``to``) for agents and commands run as processes."""
        path = to or self.folder / f"{name}.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            "".join(
                f"{key} = {toml_value(value)}\n"
                for key, value in self.settings(name, **overrides).items()
            )
        )
        return path

    def site(self, name: str, **overrides: Any) -> Site:
        """A site not started yet: ``async with sites.site("site-a") as a: ...``."""
        return Site(self.config(name, **overrides))

    async def start(self, name: str, **overrides: Any) -> Site:
        """A started site, stopped by :meth:`stop` (after the test, for the fixture)."""
        site = self.site(name, **overrides)
        await site.start()
        self._started.append(site)
        return site

    async def stop(self) -> None:
        """Stop the sites :meth:`start` started, newest first; a second call does nothing."""
        while self._started:
            await self._started.pop().stop()


@dataclass(frozen=True)
class SitePair:
    """Sites A (``site-a``, the primary) and B (``site-b``) of one trust group, started."""

    a: Site
    b: Site
    sites: SiteFactory


async def digests(site: Site, vm: str) -> dict[str, str]:
    """SHA-256 of each of the VM's disk images at ``site``."""
    return {d.name: sha256_of(Path(d.path)) for d in (await site.catalog.vm(vm)).disks}


async def catch_up(site: Site, vm: str) -> int:
    """Apply the VM's journal at replica ``site`` up to its end (discovering the VM first if
    the site does not hold it yet); the last cycle applied."""
    if await site.catalog.find_vm(vm) is None:
        await site.discover()
    async with await site.replica(await site.catalog.vm(vm)) as replica:
        cycle = await replica.catch_up()
        assert replica.violation is None, replica.violation
        return cycle


@dataclass(frozen=True)
class EnabledVm:
    """A VM enabled on its primary site, as :func:`enable_vm` left it."""

    name: str
    site: Site
    record: VmRecord
    """The catalog's record right after enabling (re-read it after a state change)."""
    disks: dict[str, Path]
    """The primary's image of each disk."""


async def enable_vm(
    site: Site,
    folder: Path,
    name: str,
    disks: Mapping[str, int],
    settings: VmSettings | None = None,
    *,
    replica_site: str = "site-b",
    create_images: bool = True,
) -> EnabledVm:
    """Enable ``name`` on ``site`` with disks of the given sizes, at ``<folder>/<name>/<disk>.img``.

    ``create_images`` makes sparse image files first, as a hypervisor's disks would be; without
    it ``enable`` gets the sizes and the images are created when the primary opens them.
    """
    images = {disk: folder / name / f"{disk}.img" for disk in disks}
    (folder / name).mkdir(parents=True, exist_ok=True)
    if create_images:
        for disk, path in images.items():
            with path.open("wb") as file:
                file.truncate(disks[disk])
    record = await site.enable(
        name,
        images,
        replica_site,
        settings or VmSettings(),
        sizes=None if create_images else dict(disks),
    )
    return EnabledVm(name, site, record, images)


class VmFactory(Protocol):
    """``await vm(site, {"disk0": 8 * MiB}, VmSettings(frequency_seconds=30))``.

    The name is unique to the test unless given; images go under the test's ``tmp_path``.
    """

    async def __call__(
        self,
        site: Site,
        disks: Mapping[str, int],
        settings: VmSettings | None = None,
        *,
        name: str | None = None,
        replica_site: str = "site-b",
        create_images: bool = True,
    ) -> EnabledVm: ...


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short folder under /tmp for site roots: a Unix socket path must stay under 108 bytes."""
    folder = Path(tempfile.mkdtemp(prefix="vmr-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def site_folder(short_dir: Path) -> Path:
    """Where the test's site roots and configuration files go (pytest's ``tmp_path`` is too
    long for the NBD sockets in a site root)."""
    return short_dir


class SecuredKafka:
    """A secured test broker (``broker up --secure``) and its admin."""

    def __init__(self, state: ClusterState) -> None:
        assert state.secured is not None
        self.state = state
        self.files = state.secured
        self.bootstrap_servers = state.bootstrap_servers
        self.ca_file = state.secured.ca_file

    def admin(self) -> KafkaConnection:
        return self.state.connection("vmreplica-tests-admin")

    async def add_site(self, site: str, trust_group: str, folder: Path) -> SiteAccess:
        """User ``<site>-<trust group>`` (unique to the test) with the group's rights; its
        password file goes in ``folder``."""
        user = f"{site}-{trust_group}"
        return await add_site(
            self.admin(),
            self.ca_file,
            site,
            trust_group,
            folder / f"{user}.password",
            user=user,
        )


SECURED_SITES = ("site-a", "site-b", "site-c")
"""The sites a secured ``sites`` factory gives a principal before the test starts."""


@pytest.fixture
def broker_security() -> str:
    """``plain``, or ``secured`` where a module overrides this fixture."""
    return "plain"


@pytest.fixture
def site_broker(broker_security: str, request: pytest.FixtureRequest) -> SecuredKafka | str:
    """The broker of the test's sites: a secured one, or the bootstrap servers of the plain
    one (started here, outside the event loop: starting a broker waits synchronously)."""
    if broker_security == "secured":
        secured: SecuredKafka = request.getfixturevalue("secured_kafka")
        return secured
    bootstrap_servers: str = request.getfixturevalue("bootstrap_servers")
    return bootstrap_servers


@pytest.fixture
async def sites(
    site_folder: Path, unique: Callable[[str], str], site_broker: SecuredKafka | str
) -> AsyncIterator[SiteFactory]:
    if isinstance(site_broker, SecuredKafka):
        factory = SiteFactory(site_folder, site_broker.bootstrap_servers, unique("tg"), site_broker)
        for name in SECURED_SITES:
            await factory.add_principal(name)
    else:
        factory = SiteFactory(site_folder, site_broker, unique("tg"))
    yield factory
    await factory.stop()


@pytest.fixture
async def site_pair(sites: SiteFactory) -> SitePair:
    return SitePair(await sites.start("site-a"), await sites.start("site-b"), sites)


@pytest.fixture
def vm(tmp_path: Path, unique: Callable[[str], str]) -> VmFactory:
    made = itertools.count(1)

    async def make(
        site: Site,
        disks: Mapping[str, int],
        settings: VmSettings | None = None,
        *,
        name: str | None = None,
        replica_site: str = "site-b",
        create_images: bool = True,
    ) -> EnabledVm:
        if name is None:
            count = next(made)
            name = unique("vm") if count == 1 else f"{unique('vm')}-{count}"
        return await enable_vm(
            site,
            tmp_path / "disks",
            name,
            disks,
            settings,
            replica_site=replica_site,
            create_images=create_images,
        )

    return make
