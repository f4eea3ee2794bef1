"""vmreplica: asynchronous replication of VM disks to another site, journaled in Apache Kafka."""

from __future__ import annotations

__version__ = "0.1.0"
