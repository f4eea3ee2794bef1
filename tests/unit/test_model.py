"""The model's rules: which settings are allowed, how consistency crosses the wire, which way a
position may move. Pure; no catalog, no broker."""

from __future__ import annotations

import pytest

from vmreplica.domain.model import (
    Consistency,
    Position,
    VmSettings,
    check_extended_frequency,
    parse_frequency,
)
from vmreplica.errors import ConfigurationError
from vmreplica.schemas import events


@pytest.mark.parametrize(
    ("text", "seconds"), [("30", 30), ("300", 300), ("900", 900), ("continuous", 0)]
)
def test_frequencies_by_name(text: str, seconds: int) -> None:
    assert parse_frequency(text) == seconds


@pytest.mark.parametrize("text", ["0", "60", "5m", "", "Continuous"])
def test_other_frequencies_are_refused_naming_the_option(text: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        parse_frequency(text, "--frequency")
    assert str(raised.value) == f"--frequency must be 30, 300, 900 or continuous, not {text!r}"


def test_extended_replication_runs_at_five_or_fifteen_minutes() -> None:
    assert check_extended_frequency(900) == 900
    with pytest.raises(
        ConfigurationError,
        match=r"^extended replication runs every 300 or 900 "
        r"seconds, not 30$",
    ):
        check_extended_frequency(30)


@pytest.mark.parametrize(
    "settings",
    [
        VmSettings(),
        VmSettings(frequency_seconds=0, continuous_points_hours=24),
        VmSettings(frequency_seconds=30, recovery_history=24, app_consistent_hours=12),
        VmSettings(frequency_seconds=900, continuous_points_hours=4, app_consistent_hours=4),
        VmSettings(continuous_points_hours=0),
    ],
)
def test_valid_settings_pass(settings: VmSettings) -> None:
    assert settings.validate() is settings


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            VmSettings(frequency_seconds=60),
            "replication frequency must be 30, 300, 900 seconds or continuous, not 60",
        ),
        (VmSettings(recovery_history=25), "recovery history must be 0-24 hours, got 25"),
        (VmSettings(recovery_history=-1), "recovery history must be 0-24 hours, got -1"),
        (
            VmSettings(continuous_points_hours=48),
            "continuous recovery points must be 0-24 hours, got 48",
        ),
        (
            VmSettings(recovery_history=24, app_consistent_hours=13),
            "application-consistent points must come every 1-12 hours, got 13",
        ),
        (
            VmSettings(recovery_history=4, app_consistent_hours=6),
            "application-consistent points every 6 hours would fall outside "
            "a recovery history of 4 hours: raise hours to at least 6",
        ),
        (
            VmSettings(app_consistent_hours=2),
            "application-consistent points every 2 hours would fall outside "
            "a recovery history of 0 hours: raise hours to at least 2",
        ),
    ],
)
def test_invalid_settings_are_refused(settings: VmSettings, message: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        settings.validate()
    assert str(raised.value) == message


def test_consistency_names_mirror_the_wire_symbols() -> None:
    """The Avro enum converts by name; its values are the catalog's text."""
    assert [c.name for c in Consistency] == [c.name for c in events.Consistency]
    for wire in events.Consistency:
        assert Consistency[wire.name].value == wire.value.lower()
    assert Consistency.parse("application") is Consistency.APPLICATION
    with pytest.raises(
        ConfigurationError,
        match=r"^consistency must be 'crash' or "
        r"'application', got 'CRASH'$",
    ):
        Consistency.parse("CRASH")


@pytest.mark.parametrize(
    ("offered", "back"),
    [
        (Position(2, 7, b"", 70, 0), False),
        (Position(2, 7, b"", 71, 0), False),
        (Position(2, 8, b"", 10, 0), False),
        (Position(3, 7, b"", 10, 0), False),
        (Position(2, 7, b"", 69, 0), True),
        (Position(2, 6, b"", 99, 0), True),
        (Position(1, 8, b"", 99, 0), True),
        (Position(3, 6, b"", 99, 0), True),
    ],
)
def test_which_positions_move_back(offered: Position, back: bool) -> None:
    assert offered.moves_back_from(Position(2, 7, b"", 70, 0)) is back
