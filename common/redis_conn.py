"""One way to get a Redis client: `connect(config)`.

Every client uses `decode_responses=True` (keys and values are str), so code sharing a client
never has to guess between bytes and str. Connection errors are retried with exponential backoff
and idle connections are health-checked, so a service rides out a Redis restart (up to ~20 s)
instead of crashing. Blocking reads (XREAD/XREADGROUP BLOCK) must block for less than
`SOCKET_TIMEOUT_S`, or the socket timeout fires first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from tokenmill.common.platform.redis_embedded import EmbeddedRedis

if TYPE_CHECKING:
    from tokenmill.common.config import Config

_T = TypeVar("_T")

SOCKET_TIMEOUT_S = 30.0
RETRIES = 12  # with the backoff below: ~20 s of retrying before the error reaches the caller


def redis_url_for(config: Config) -> str:
    """config.redis_url if set; otherwise the embedded server under config.data_dir (started if needed)."""
    if config.redis_url:
        return config.redis_url
    return EmbeddedRedis(config.data_dir).start()


def connect_url(url: str, *, client_name: str | None = None) -> redis.Redis:
    """A client for `url` with the retry and health-check policy every tokenmill process uses."""
    retry = Retry(
        ExponentialBackoff(cap=2.0, base=0.05),
        RETRIES,
        supported_errors=(redis.ConnectionError, redis.TimeoutError, ConnectionError, TimeoutError),
    )
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        retry=retry,
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        health_check_interval=15,
        socket_connect_timeout=5.0,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_keepalive=True,
        client_name=client_name,
    )


def connect(config: Config, *, client_name: str | None = None) -> redis.Redis:
    """A Redis client for this config (see `redis_url_for`)."""
    return connect_url(redis_url_for(config), client_name=client_name)


class InterruptibleReads:
    """Blocking reads (XREAD/XREADGROUP BLOCK) that another thread can end at once.

    A worker loop blocks in Redis for up to its block time; stopping it would wait that out, on
    every shutdown. These reads run on a connection of their own whose id is known while a read
    blocks, so `interrupt()` ends the wait with CLIENT UNBLOCK (the read returns as if it timed
    out). Where an ACL forbids CLIENT UNBLOCK, stopping just takes up to the block time."""

    def __init__(self, client: redis.Redis):
        self._client = client
        self._reader: redis.Redis | None = None
        self._blocked_id: int | None = None

    def run(self, read: Callable[[redis.Redis], _T]) -> _T:
        """`read(connection)`: one blocking command on the dedicated connection."""
        if self._reader is None:
            self._reader = self._client.client()
        try:
            self._blocked_id = self._reader.client_id()
            return read(self._reader)
        finally:
            self._blocked_id = None

    def interrupt(self) -> None:
        """End the read blocked now, if any (a read that starts after this blocks as usual)."""
        blocked = self._blocked_id
        if blocked is not None:
            with contextlib.suppress(redis.RedisError):
                self._client.client_unblock(blocked)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
