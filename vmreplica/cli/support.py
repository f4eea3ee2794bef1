"""What every CLI command shares: consoles, JSON output, and errors reported without traceback."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import datetime, timedelta
from functools import wraps
from typing import Any, ParamSpec, TypeVar

import click
from rich.console import Console

from vmreplica.errors import ConfigurationError, ReplicationError

P = ParamSpec("P")
R = TypeVar("R")

console = Console()
errors = Console(stderr=True)


def reported(command: Callable[P, R]) -> Callable[P, R]:
    """Turn vmreplica errors into a clear message and a non-zero exit, without a traceback."""

    @wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except ConfigurationError as error:
            errors.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
            sys.exit(2)
        except ReplicationError as error:
            errors.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
            sys.exit(1)

    return run


def emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True, default=str))


def parse_at(text: str, now: datetime | None = None, option: str = "--at") -> int:
    """``--at`` (or ``option``, ``--initial-at``): ``HH:MM`` (the next such time of day) or an
    ISO 8601 date and time (local time unless it names an offset), as ms since the Unix epoch.

    :raises ConfigurationError: neither, or a moment already past.
    """
    now = now or datetime.now().astimezone()
    try:
        if len(text) <= 5 and ":" in text:
            hours, minutes = (int(part) for part in text.split(":"))
            moment = now.replace(hour=hours, minute=minutes, second=0, microsecond=0)
            if moment <= now:
                moment += timedelta(days=1)
        else:
            moment = datetime.fromisoformat(text)
            if moment.tzinfo is None:
                moment = moment.astimezone()
    except ValueError:
        raise ConfigurationError(
            f"{option} {text!r}: expected HH:MM or a date and time such as 2026-12-01T18:30"
        ) from None
    if moment < now - timedelta(minutes=1):
        raise ConfigurationError(f"{option} {text!r} is in the past ({moment.isoformat()})")
    return int(moment.timestamp() * 1000)
