"""The bandwidth limit's arithmetic (:mod:`vmreplica.journal.pace`) and its validation."""

from __future__ import annotations

import pytest

from vmreplica.domain.model import VmSettings
from vmreplica.errors import ConfigurationError
from vmreplica.journal.pace import Pace, pace_for


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_bytes_sent_wait_until_they_fit_the_rate() -> None:
    clock = Clock()
    pace = Pace(1_000_000, clock)
    assert pace.delay() == 0
    pace.spent(3_000_000)  # a 3 MB cycle at 1 MB/s: the next waits three seconds
    assert pace.delay() == pytest.approx(3.0)
    clock.now += 1.0
    pace.spent(1_000_000)  # a heartbeat-sized control record counts, and never waits itself
    assert pace.delay() == pytest.approx(3.0)
    clock.now += 10.0  # idle time is not saved up for a later burst
    assert pace.delay() == 0
    pace.spent(500_000)
    assert pace.delay() == pytest.approx(0.5)


def test_limits_are_checked_like_every_setting() -> None:
    assert pace_for(None) is None
    assert VmSettings(bandwidth_bytes_per_second=10 << 20).validate()
    with pytest.raises(ConfigurationError, match="below the least allowed, 65536"):
        VmSettings(bandwidth_bytes_per_second=1000).validate()
