"""The catalog's tables (:mod:`vmreplica.storage.catalog`): one row per VM and what hangs off
it — disks, applied position, recovery points, seed progress, failover marks, test failover,
extended replication, cycle statistics, the epoch a failover could not publish yet, heartbeats —
and the columns added since the first release, which a catalog created before gets at start-up.
The event log's and statistics' tables are :mod:`vmreplica.storage.history`'s."""

from __future__ import annotations

from typing import Final

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS vm (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    trust_group TEXT NOT NULL,
    partner_site TEXT NOT NULL,
    settings TEXT NOT NULL,
    epoch INTEGER NOT NULL DEFAULT 1,
    state TEXT NOT NULL,
    state_message TEXT NOT NULL DEFAULT '',
    state_changed_ms INTEGER NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0,
    primary_seen_ms INTEGER,
    failover_point INTEGER,
    reverse_wanted INTEGER NOT NULL DEFAULT 0,
    config_pending INTEGER NOT NULL DEFAULT 0,
    seed_held INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS removed_vm (
    name TEXT PRIMARY KEY,
    removed_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS disk (
    vm TEXT NOT NULL REFERENCES vm(name) ON DELETE CASCADE,
    name TEXT NOT NULL,
    path TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    position INTEGER NOT NULL,
    PRIMARY KEY (vm, name)
);
CREATE TABLE IF NOT EXISTS position (
    vm TEXT PRIMARY KEY REFERENCES vm(name) ON DELETE CASCADE,
    epoch INTEGER NOT NULL,
    cycle INTEGER NOT NULL,
    cycle_hash BLOB NOT NULL,
    next_offset INTEGER NOT NULL,
    at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS recovery_point (
    vm TEXT NOT NULL REFERENCES vm(name) ON DELETE CASCADE,
    cycle INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    journal_offset INTEGER NOT NULL,
    cut_at_ms INTEGER NOT NULL,
    consistency TEXT NOT NULL,
    cycle_hash BLOB NOT NULL DEFAULT x'',
    PRIMARY KEY (vm, cycle)
);
CREATE TABLE IF NOT EXISTS seed_progress (
    vm TEXT NOT NULL REFERENCES vm(name) ON DELETE CASCADE,
    disk TEXT NOT NULL,
    next_offset INTEGER NOT NULL,
    PRIMARY KEY (vm, disk)
);
CREATE TABLE IF NOT EXISTS canceled_epoch (
    vm TEXT NOT NULL REFERENCES vm(name) ON DELETE CASCADE,
    epoch INTEGER NOT NULL,
    PRIMARY KEY (vm, epoch)
);
CREATE TABLE IF NOT EXISTS test_failover (
    vm TEXT PRIMARY KEY REFERENCES vm(name) ON DELETE CASCADE,
    point INTEGER NOT NULL,
    status TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS extension (
    vm TEXT PRIMARY KEY REFERENCES vm(name) ON DELETE CASCADE,
    to_site TEXT NOT NULL,
    trust_group TEXT NOT NULL,
    bootstrap_servers TEXT NOT NULL,
    frequency_seconds INTEGER NOT NULL,
    upstream_offset INTEGER
);
CREATE TABLE IF NOT EXISTS cycle_stat (
    vm TEXT NOT NULL REFERENCES vm(name) ON DELETE CASCADE,
    cycle INTEGER NOT NULL,
    cut_at_ms INTEGER NOT NULL,
    done_at_ms INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    started_at_ms INTEGER,
    PRIMARY KEY (vm, cycle)
);
CREATE INDEX IF NOT EXISTS cycle_stat_done ON cycle_stat (vm, done_at_ms);
CREATE TABLE IF NOT EXISTS pending_epoch (
    vm TEXT PRIMARY KEY REFERENCES vm(name) ON DELETE CASCADE,
    event BLOB NOT NULL,
    recorded_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS heartbeat (
    vm TEXT PRIMARY KEY REFERENCES vm(name) ON DELETE CASCADE,
    at_ms INTEGER NOT NULL,
    idle_at_ms INTEGER,
    idle INTEGER NOT NULL
);
"""
ADDED_COLUMNS: Final = (
    ("cycle_stat", "started_at_ms", "INTEGER"),
    ("vm", "config_pending", "INTEGER NOT NULL DEFAULT 0"),
    ("vm", "seed_held", "INTEGER NOT NULL DEFAULT 0"),
)
"""Columns added after the first release: a catalog created before gets them at start-up."""
