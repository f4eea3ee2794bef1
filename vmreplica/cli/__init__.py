"""The ``vmreplica`` command: replication, failover and the local broker."""
