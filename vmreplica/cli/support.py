"""What every CLI command shares: consoles, JSON output, and errors reported without traceback."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
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
