"""CLI commands for who may replicate to this site: the site's key and its authorization entries;
and who may attach to its NBD exports over TCP: ``vmreplica nbd-certificates``.

``vmreplica key show|rotate`` and ``vmreplica authorization add|list|set|remove`` — the last four
are Hyper-V's ``New-/Get-/Set-/Remove-VMReplicationAuthorizationEntry``. Neither needs the broker
nor the catalog: keys live in ``<root>/keys/``, entries in ``<root>/authorization.json``.
"""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from vmreplica.cli.replication import config_option, json_option
from vmreplica.cli.support import console, emit_json, reported
from vmreplica.config import load_config
from vmreplica.errors import ConfigurationError
from vmreplica.security.authorization import AuthorizationEntry, AuthorizationStore
from vmreplica.security.certificates import make_nbd_certificates
from vmreplica.security.signing import format_public_key, load_site_key, rotate_site_key


@click.group()
def key() -> None:
    """This site's signing key (Ed25519): what partner sites list to trust its journal."""


@key.command("show")
@config_option
@json_option
@reported
def key_show(config_path: Path | None, as_json: bool) -> None:
    """Print this site's public key (creating the key on first use)."""
    config = load_config(config_path)
    site_key = load_site_key(config.root)
    if as_json:
        emit_json(
            {"site": config.site, "public_key": site_key.public_text, "key_id": site_key.id.hex()}
        )
        return
    click.echo(site_key.public_text)


@key.command("rotate")
@config_option
@json_option
@reported
def key_rotate(config_path: Path | None, as_json: bool) -> None:
    """Make a new key, endorsed by the current one; replicas that trust the old key learn it."""
    config = load_config(config_path)
    new, old = rotate_site_key(config.root)
    if as_json:
        emit_json({"public_key": new.public_text, "previous_key": format_public_key(old)})
        return
    click.echo(new.public_text)
    click.echo(
        "the agent signs with it from its next start; replicas that list the previous key "
        "learn this one from the first record they read",
        err=True,
    )


@click.group()
def authorization() -> None:
    """Primaries this replica site accepts (Hyper-V's VMReplicationAuthorizationEntry)."""


primary_option = click.option(
    "--primary",
    required=True,
    help="Allowed primary site: a name, or a pattern where * stands for any characters.",
)
trust_group_option = click.option(
    "--trust-group", default=None, help="Trust group of the entry (default: this site's)."
)


def _store(config_path: Path | None) -> tuple[AuthorizationStore, str]:
    config = load_config(config_path)
    return AuthorizationStore(config.root), config.trust_group


def _show(entries: list[AuthorizationEntry], as_json: bool) -> None:
    if as_json:
        emit_json(
            [
                {
                    "primary": e.primary,
                    "trust_group": e.trust_group,
                    "storage": e.storage,
                    "keys": list(e.keys),
                }
                for e in entries
            ]
        )
        return
    table = Table("primary", "trust group", "storage", title="authorization entries")
    table.add_column("keys", overflow="fold")
    for e in entries:
        table.add_row(e.primary, e.trust_group, e.storage, "\n".join(e.keys))
    console.print(table)


@authorization.command("add")
@primary_option
@trust_group_option
@click.option("--storage", required=True, help="Folder for this primary's replica images.")
@click.option(
    "--key",
    "keys",
    multiple=True,
    required=True,
    help="The primary's public key, as `vmreplica key show` prints it there; repeatable.",
)
@config_option
@json_option
@reported
def authorization_add(
    primary: str,
    trust_group: str | None,
    storage: str,
    keys: tuple[str, ...],
    config_path: Path | None,
    as_json: bool,
) -> None:
    """Accept a primary (New-VMReplicationAuthorizationEntry); the site then verifies every
    journal record's signature."""
    store, group = _store(config_path)
    entry = store.add(AuthorizationEntry(primary, trust_group or group, storage, keys))
    _show([entry], as_json)


@authorization.command("list")
@config_option
@json_option
@reported
def authorization_list(config_path: Path | None, as_json: bool) -> None:
    """Show the entries (Get-VMReplicationAuthorizationEntry)."""
    store, _ = _store(config_path)
    _show(list(store.entries()), as_json)


@authorization.command("set")
@primary_option
@trust_group_option
@click.option("--storage", default=None, help="New folder for this primary's replica images.")
@click.option("--add-key", "add_keys", multiple=True, help="Trust one more key; repeatable.")
@click.option("--remove-key", "remove_keys", multiple=True, help="Stop trusting a key; repeatable.")
@config_option
@json_option
@reported
def authorization_set(
    primary: str,
    trust_group: str | None,
    storage: str | None,
    add_keys: tuple[str, ...],
    remove_keys: tuple[str, ...],
    config_path: Path | None,
    as_json: bool,
) -> None:
    """Change an entry (Set-VMReplicationAuthorizationEntry)."""
    store, group = _store(config_path)
    entry = store.set(
        primary,
        trust_group or group,
        storage=storage,
        add_keys=add_keys,
        remove_keys=remove_keys,
    )
    _show([entry], as_json)


@authorization.command("remove")
@primary_option
@trust_group_option
@config_option
@reported
def authorization_remove(primary: str, trust_group: str | None, config_path: Path | None) -> None:
    """Remove an entry (Remove-VMReplicationAuthorizationEntry); that primary's records are
    refused from the agent's next read on (with no entry left, the site is open again)."""
    store, group = _store(config_path)
    entry = store.remove(primary, trust_group or group)
    click.echo(f"removed the entry for {entry.primary!r} in trust group {entry.trust_group!r}")
    if not store.entries():
        click.echo(
            "warning: no entry is left, so this site no longer checks journal signatures",
            err=True,
        )


@click.command("nbd-certificates")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path), required=False)
@click.option(
    "--host",
    "hosts",
    multiple=True,
    help="A name or address clients reach the NBD listener by (besides localhost, 127.0.0.1, "
    "::1); repeat for several.",
)
@config_option
@json_option
@reported
def nbd_certificates(
    folder: Path | None, hosts: tuple[str, ...], config_path: Path | None, as_json: bool
) -> None:
    """Make the NBD TLS credentials in FOLDER (default: <root>/nbd-tls): a CA, the agent's
    server certificate and one client certificate for the hypervisor, named as QEMU's
    tls-creds-x509 and libnbd read them. Running it again replaces them all (a new CA: copy
    the client files again)."""
    for host in hosts:
        if not host or any(c.isspace() or c in "/,\0" for c in host):
            raise ConfigurationError(
                f"--host {host!r} is not a host name or an IP address, e.g. --host nbd.example "
                "or --host 192.0.2.10"
            )
    if folder is None:
        folder = load_config(config_path).root / "nbd-tls"
    files = make_nbd_certificates(folder.expanduser().resolve(), hosts)
    if as_json:
        emit_json(
            {
                "folder": str(files.folder),
                "ca": str(files.ca_file),
                "server_certificate": str(files.server_cert_file),
                "server_key": str(files.server_key_file),
                "client_certificate": str(files.client_cert_file),
                "client_key": str(files.client_key_file),
            }
        )
        return
    click.echo(f"NBD TLS credentials in {files.folder}; in site.toml:")
    click.echo(f'nbd_tls_dir = "{files.folder}"')
    click.echo(
        f"clients (QEMU, libnbd) need {files.ca_file.name}, {files.client_cert_file.name} and "
        f"{files.client_key_file.name} in a folder of their own",
        err=True,
    )


def register(main: click.Group) -> None:
    main.add_command(key)
    main.add_command(authorization)
    main.add_command(nbd_certificates)
