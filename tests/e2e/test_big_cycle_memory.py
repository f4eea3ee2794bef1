"""A cycle bigger than the replica agent may hold in memory is applied in bounded memory.

A real ``vmreplica agent`` process applies one 512 MiB cycle (zstd-friendly data, so the test
costs seconds: the agent still decompresses, checks and writes every byte); its peak RSS must
stay under 300 MiB, where gathering the cycle before applying it needs more than 512 MiB. The
2 GiB measurement is ``benchmarks/apply_memory.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import pytest

from tests.fixtures import SiteFactory
from vmreplica.devtools.big_cycle import big_cycle

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

MiB: Final = 1024 * 1024
CYCLE_BYTES: Final = 512 * MiB
PEAK_RSS_LIMIT_BYTES: Final = 300 * MiB


async def test_a_512_mib_cycle_is_applied_with_the_agent_under_300_mib(
    tmp_path: Path, sites: SiteFactory
) -> None:
    result = await big_cycle(
        tmp_path, sites.bootstrap_servers, sites.trust_group, CYCLE_BYTES, compressible=True
    )
    print(
        f"512 MiB cycle: agent peak RSS {result.peak_rss_bytes // MiB} MiB "
        f"({result.rss_before_bytes // MiB} MiB before it), applied in "
        f"{result.applied_seconds:.1f} s"
    )
    assert result.identical, "the replica image differs from the primary's disk"
    assert result.peak_rss_bytes < PEAK_RSS_LIMIT_BYTES, result
