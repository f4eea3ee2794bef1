"""Something started before use and stopped after; ``async with`` does both.

A subclass implements :meth:`start` and :meth:`stop`; ``stop`` is harmless to call twice, so
whoever holds the object may stop it early and leave the ``async with`` to call it again.
"""

from __future__ import annotations

import abc
from typing import Self


class Service(abc.ABC):
    @abc.abstractmethod
    async def start(self) -> None:
        """Open what the object needs (connections, files, listeners)."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Close it; a second call is harmless."""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()
