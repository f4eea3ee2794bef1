"""`vmreplica server show|set`: the site's replication-server settings (Get- and
Set-VMReplicationServer).

Hyper-V keeps them per host; here they are the site configuration (``site.toml``), which every
command and the agent read at start. `server set` changes the named keys of that file in place,
keeping its comments and every other line, checks the result as the agent would load it
(:func:`vmreplica.config.load_config`), and only then replaces the file atomically
(:func:`vmreplica.storage.safefile.replace_atomically`): a bad value leaves it untouched. The
agent reads it when it starts, so the command says to restart it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from vmreplica.cli.replication import config_option, json_option
from vmreplica.cli.support import console, emit_json, reported
from vmreplica.config import SiteConfig, load_config
from vmreplica.domain.names import check_name
from vmreplica.errors import ConfigurationError
from vmreplica.security.authorization import AuthorizationStore
from vmreplica.storage.mailbox import Mailbox
from vmreplica.storage.safefile import replace_atomically

SHOWN = (
    "site",
    "replica_enabled",
    "replica_storage",
    "allowed_primaries",
    "trust_group",
    "topic_prefix",
    "bootstrap_servers",
    "security_protocol",
    "sasl_mechanism",
    "sasl_username",
    "sasl_password_file",
    "ssl_ca_file",
    "ssl_cert_file",
    "ssl_key_file",
    "heartbeat_seconds",
    "metrics_address",
    "metrics_port",
)
"""The settings `server show` prints (never a password)."""

_KEY_LINE = re.compile(r"^(?P<key>[A-Za-z_][A-Za-z0-9_]*)\s*=")


def config_file(config_path: Path | None) -> Path:
    """The configuration file `server set` changes. :raises ConfigurationError: none given."""
    if config_path is None and os.environ.get("VMREPLICA_CONFIG"):
        config_path = Path(os.environ["VMREPLICA_CONFIG"])
    if config_path is None:
        raise ConfigurationError(
            "no site configuration file to change: give --config site.toml (or set "
            "$VMREPLICA_CONFIG); settings that come only from VMREPLICA_* variables are "
            "changed where they are set"
        )
    return config_path


def toml_value(value: Any) -> str:
    """``value`` as a one-line TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, tuple | list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def with_keys(text: str, values: dict[str, Any]) -> str:
    """``text`` (a flat TOML document) with each key of ``values`` set: its line replaced where
    it is, else appended; ``None`` removes the key. Comments and other lines stay as they are.

    :raises ConfigurationError: a key to change spans several lines (a multi-line array or
        string), which a line edit cannot replace safely.
    """
    lines = text.splitlines()
    done: set[str] = set()
    kept: list[str] = []
    for line in lines:
        match = _KEY_LINE.match(line)
        key = match.group("key") if match else None
        if key is None or key not in values:
            kept.append(line)
            continue
        try:
            tomllib.loads(line)
        except tomllib.TOMLDecodeError:
            raise ConfigurationError(
                f"the setting {key!r} spans several lines of the configuration file; write it "
                "on one line, then run `vmreplica server set` again"
            ) from None
        done.add(key)
        if values[key] is not None:
            kept.append(f"{key} = {toml_value(values[key])}")
    kept += [
        f"{key} = {toml_value(value)}"
        for key, value in values.items()
        if key not in done and value is not None
    ]
    return "\n".join(kept) + "\n"


def server_json(config: SiteConfig, config_path: Path | None) -> dict[str, Any]:
    shown = {key: getattr(config, key) for key in SHOWN}
    shown = {k: str(v) if isinstance(v, Path) else v for k, v in shown.items()}
    shown["allowed_primaries"] = list(config.allowed_primaries)
    shown["config_file"] = None if config_path is None else str(config_path)
    shown["storage_root"] = str(config.root)
    shown["default_storage"] = str(config.replica_storage or config.root / "vms")
    try:
        entries = AuthorizationStore(config.root).entries()
    except ConfigurationError as error:
        shown["authorization_error"] = str(error)
        entries = ()
    shown["authorization_entries"] = [
        {"primary": e.primary, "trust_group": e.trust_group, "storage": e.storage} for e in entries
    ]
    shown["verifies_signatures"] = bool(entries)
    return shown


async def _agent_running(config: SiteConfig) -> bool:
    if not config.catalog_path.exists():
        return False
    async with Mailbox(config.catalog_path) as mailbox:
        return await mailbox.agent_running(config.site)


@click.group()
def server() -> None:
    """This site's replication-server settings (Get-/Set-VMReplicationServer)."""


@server.command("show")
@config_option
@json_option
@reported
def server_show(config_path: Path | None, as_json: bool) -> None:
    """Whether this site is a replica server, where replicas go, which primaries it accepts,
    and how it reaches Kafka (the password is never shown)."""
    config = load_config(config_path)
    if config_path is None and os.environ.get("VMREPLICA_CONFIG"):
        config_path = Path(os.environ["VMREPLICA_CONFIG"])
    shown = server_json(config, config_path)
    shown["agent_running"] = asyncio.run(_agent_running(config))
    if as_json:
        emit_json(shown)
        return
    table = Table("setting", "value", title=f"replication server {config.site}")
    for key, value in shown.items():
        if key != "authorization_entries":
            table.add_row(key, "" if value is None else str(value))
    console.print(table)
    for entry in shown["authorization_entries"]:
        console.print(
            f"authorization: primary {entry['primary']} ({entry['trust_group']}) -> "
            f"{entry['storage']}",
            highlight=False,
        )


@server.command("set")
@click.option("--replica/--no-replica", "replica_enabled", default=None, help="Adopt new VMs.")
@click.option(
    "--default-storage",
    default=None,
    metavar="DIR|default",
    help="Where replica images of new VMs go (<DIR>/<vm>/); default: <root>/vms.",
)
@click.option(
    "--allowed-primary",
    "allowed",
    multiple=True,
    help="A site this replica accepts VMs from (repeat; '*': any). Replaces the list.",
)
@click.option("--bootstrap-servers", default=None, metavar="HOST:PORT[,...]")
@click.option(
    "--security-protocol",
    type=click.Choice(["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]),
    default=None,
)
@click.option("--sasl-mechanism", type=click.Choice(["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"]))
@click.option("--sasl-username", default=None)
@click.option("--sasl-password-file", default=None, metavar="FILE")
@click.option("--ssl-ca-file", default=None, metavar="FILE")
@click.option("--heartbeat-seconds", type=float, default=None)
@click.option("--metrics-address", default=None)
@click.option("--metrics-port", type=int, default=None)
@config_option
@json_option
@reported
def server_set(
    replica_enabled: bool | None,
    default_storage: str | None,
    allowed: tuple[str, ...],
    bootstrap_servers: str | None,
    security_protocol: str | None,
    sasl_mechanism: str | None,
    sasl_username: str | None,
    sasl_password_file: str | None,
    ssl_ca_file: str | None,
    heartbeat_seconds: float | None,
    metrics_address: str | None,
    metrics_port: int | None,
    config_path: Path | None,
    as_json: bool,
) -> None:
    """Change this site's replication-server settings in its configuration file, checked
    first; the agent takes them when it starts again."""
    path = config_file(config_path)
    values: dict[str, Any] = {
        "replica_enabled": replica_enabled,
        "allowed_primaries": list(allowed) or None,
        "bootstrap_servers": bootstrap_servers,
        "security_protocol": security_protocol,
        "sasl_mechanism": sasl_mechanism,
        "sasl_username": sasl_username,
        "sasl_password_file": sasl_password_file,
        "ssl_ca_file": ssl_ca_file,
        "heartbeat_seconds": heartbeat_seconds,
        "metrics_address": metrics_address,
        "metrics_port": metrics_port,
    }
    values = {k: v for k, v in values.items() if v is not None}
    for site in allowed:
        if site != "*":
            check_name("site", site)
    removing = []
    if default_storage == "default":
        removing.append("replica_storage")
    elif default_storage is not None:
        storage = Path(default_storage).expanduser()
        if not storage.is_absolute():
            raise ConfigurationError(
                f"--default-storage {default_storage!r} is not an absolute path; give the "
                "folder where new replica images go, e.g. /srv/replicas"
            )
        values["replica_storage"] = str(storage)
    if not values and not removing:
        raise ConfigurationError(
            "`vmreplica server set` was given nothing to change; `vmreplica server set --help` "
            "lists the settings"
        )
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigurationError(f"site configuration {path} does not exist") from None
    before = load_config(path)
    changed = with_keys(text, {**values, **dict.fromkeys(removing)})
    candidate = path.with_name(f".{path.name}.check")
    try:
        candidate.write_text(changed)
        after = load_config(candidate)  # what the agent would load; a mistake stops here
    except ConfigurationError as error:
        raise ConfigurationError(
            f"{str(error).replace(str(candidate), str(path))}; nothing was changed"
        ) from None
    finally:
        candidate.unlink(missing_ok=True)

    def write(temporary: Path) -> None:
        temporary.write_text(changed)

    replace_atomically(path, write)
    overridden = [k for k in (*values, *removing) if f"VMREPLICA_{k.upper()}" in os.environ]
    old, new = server_json(before, path), server_json(after, path)
    differences = {k: {"before": old[k], "after": new[k]} for k in new if old.get(k) != new[k]}
    if as_json:
        emit_json({"config_file": str(path), "changed": differences, "overridden": overridden})
        return
    for key, change in differences.items():
        click.echo(f"{key}: {change['before']} -> {change['after']}")
    if not differences:
        click.echo(f"{path}: those are the settings already; nothing changed")
        return
    for key in overridden:
        click.echo(f"note: $VMREPLICA_{key.upper()} is set and wins over the file")
    click.echo(f"{path} updated; restart `vmreplica agent` for it to take them")


def register(main: click.Group) -> None:
    main.add_command(server)
