"""The wire contract between primary and replica: Avro schemas, event dataclasses and the codec.

``*.avsc`` holds one self-contained Avro schema per event kind (journal topic:
``io.vmreplica.journal``; status topic: ``io.vmreplica.status``), :mod:`.events` the matching
frozen dataclasses, and :mod:`.codec` the Avro single-object encoding between the two.
:mod:`.payload` packs the disk data inside write batches and seed chunks (zstd, CRC-32) and
checks it on arrival; :mod:`.chain` hash-chains the cycles.
"""
