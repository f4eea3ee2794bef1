"""What every CLI command shares: consoles, JSON output, and errors reported without traceback."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from functools import wraps
from typing import Any, Final, ParamSpec, Protocol, TypeVar

import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

from vmreplica.errors import ConfigurationError, ReplicationError

P = ParamSpec("P")
R = TypeVar("R")

console = Console()
errors = Console(stderr=True)

LOG_PROGRESS_SECONDS: Final = 10.0
"""How often long work says how far it got when stderr is a log, not a terminal."""


class Advance(Protocol):
    """Tell a :func:`progress` display how far the work got: ``done`` of ``total`` bytes
    (``total`` 0: not known), and optionally what it does now."""

    def __call__(self, done: int, total: int, doing: str = "") -> None: ...


@contextmanager
def progress(what: str) -> Iterator[Advance]:
    """Long work's progress on stderr: a bar on a terminal; in a log, a plain line at most every
    :data:`LOG_PROGRESS_SECONDS` (``resync of web01: sending, 1.2 GiB of 4.0 GiB, 30 s``)."""
    started = time.monotonic()
    said = [started]
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeElapsedColumn(),
        console=errors,
        transient=True,
        disable=not errors.is_terminal,
    ) as bar:
        task = bar.add_task(what, total=None)

        def advance(done: int, total: int, doing: str = "") -> None:
            described = f"{what}: {doing}" if doing else what
            bar.update(task, description=described, completed=done, total=total or None)
            now = time.monotonic()
            if not errors.is_terminal and now - said[0] >= LOG_PROGRESS_SECONDS:
                said[0] = now
                amount = f", {_size(done)} of {_size(total)}" if total else ""
                errors.print(f"{described}{amount}, {now - started:.0f} s", highlight=False)

        yield advance


def _size(count: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


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
