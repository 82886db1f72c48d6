"""Exceptions in log lines (chatd/logs.py)."""

from __future__ import annotations

from redis.exceptions import ConnectionError as RedisConnectionError

from chatd.logs import error_text


def test_a_redis_error_keeps_its_message() -> None:
    # redis-py 8's repr is its category alone: "network:ConnectionError".
    assert error_text(RedisConnectionError("No connection available.")) == (
        "ConnectionError: No connection available.")


def test_an_error_without_a_message_is_its_type() -> None:
    assert error_text(TimeoutError()) == "TimeoutError"
