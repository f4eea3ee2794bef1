"""Wall-clock time as the journal and the catalog carry it: integer milliseconds since the epoch."""

from __future__ import annotations

import time
from typing import Final

HOUR_MS: Final = 3_600_000


def now_ms() -> int:
    return int(time.time() * 1000)
