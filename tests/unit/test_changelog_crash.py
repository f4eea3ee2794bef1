"""A primary killed while its change log starts the next segment loses nothing and reopens.

``ChangeLog.cut`` seals a segment and creates the next one. A kill after the file is created but
before its header is written used to leave an empty ``.hrl`` file that ``open`` then refused as
"shorter than its header" — a VM needing a resynchronization for a crash that lost nothing.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from vmreplica.producers.changelog import ChangeLog, CutMark, RecordKind


class Killed(BaseException):
    """Stands for SIGKILL: the code stops here and the kernel closes the files."""


def test_kill_between_creating_a_segment_and_writing_its_header(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sealed cycle survives whole, and the next segment is created again on open."""
    log = ChangeLog(tmp_path)
    log.open(first_cycle=7)
    log.write(1, 4096, b"w" * 4096)
    log.zero(0, 0, 512)
    sealed_fd = log._fd
    opened: list[int] = []
    real_open = os.open

    def tracking_open(path: str | os.PathLike[str], flags: int, mode: int = 0o777) -> int:
        fd = real_open(path, flags, mode)
        opened.append(fd)
        return fd

    def killed(fd: int, data: bytes) -> int:
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(os, "open", tracking_open)  # the os module changelog.py calls
        patch.setattr(os, "write", killed)
        with pytest.raises(Killed):
            log.cut(CutMark(False, 1, 2))
    for fd in (sealed_fd, *opened):  # what the kernel does for a killed process
        with contextlib.suppress(OSError):  # unless the unwinding closed it already
            os.close(fd)

    reopened = ChangeLog(tmp_path)
    segments = reopened.open()
    assert [s.cycle for s in segments] == [7, 8]
    assert [(r.kind, r.disk, r.offset, r.length) for r in segments[0].records] == [
        (RecordKind.WRITE, 1, 4096, 4096),
        (RecordKind.ZERO, 0, 0, 512),
    ]
    assert segments[0].cut == CutMark(False, 1, 2)
    assert segments[1].records == ()
    assert reopened.cycle == 8
    assert reopened.recovered_unclean
    assert sorted(p.name for p in tmp_path.glob("*.hrl")) == [f"{7:020d}.hrl", f"{8:020d}.hrl"]
    reopened.close()
