"""`make demo` is the first command a new user runs: it must run to its end, every digest equal.

It runs the demo module as `make demo` does (its own secured broker on a free port, both sites,
the failover tour, the forger refused), so a change that breaks the tour fails the suite.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(900)
def test_the_demo_runs_to_its_end_with_every_digest_equal() -> None:
    env = {k: v for k, v in os.environ.items() if k != "VMREPLICA_BOOTSTRAP_SERVERS"}
    env["COLUMNS"] = "100"
    done = subprocess.run(
        [sys.executable, "-m", "vmreplica.devtools.demo"],
        capture_output=True,
        text=True,
        env=env,
        timeout=840,
        check=False,
    )
    said = done.stdout + done.stderr
    assert done.returncode == 0, said[-4000:]
    assert "replica identical to the primary at every compared point" in done.stdout, said[-4000:]
    assert "refused it" in done.stdout, said[-4000:]  # the forger's VM
    assert "Traceback" not in said, said[-4000:]
