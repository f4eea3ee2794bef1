"""aiokafka's own records of a Kafka error reach the agent's log in one line, no traceback."""

from __future__ import annotations

import asyncio
import io
import logging

from aiokafka.errors import KafkaConnectionError, KafkaError

from vmreplica.journal.kafka import quiet_client_errors


def test_aiokafkas_traceback_of_a_closed_connection_becomes_one_line() -> None:
    loop = asyncio.new_event_loop()
    try:
        quiet_client_errors(loop)
    finally:
        loop.close()
    sender = logging.getLogger("aiokafka.producer.sender")
    text = io.StringIO()
    handler = logging.StreamHandler(text)
    sender.addHandler(handler)
    try:
        try:
            raise KafkaError("KafkaConnectionError('Connection at 127.0.0.1:1 closed')") from (
                KafkaConnectionError("Connection at 127.0.0.1:1 closed")
            )
        except KafkaError:
            sender.error("Unexpected error in sender routine", exc_info=True)
        try:
            raise ValueError("a bug")
        except ValueError:
            sender.error("Unexpected error in sender routine", exc_info=True)
    finally:
        sender.removeHandler(handler)
    lines = text.getvalue().splitlines()
    assert lines[0] == (
        "Unexpected error in sender routine: KafkaError: KafkaError: "
        "KafkaConnectionError('Connection at 127.0.0.1:1 closed')"
    )
    assert "Traceback" in lines[2]  # anything else keeps its traceback
