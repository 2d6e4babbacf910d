"""One way to get a Redis client: `connect(config)`.

Every client uses `decode_responses=True` (keys and values are str), so code sharing a client
never has to guess between bytes and str. Connection errors are retried with exponential backoff
and idle connections are health-checked, so a service rides out a Redis restart (up to ~20 s)
instead of crashing. Blocking reads (XREAD/XREADGROUP BLOCK) must block for less than
`SOCKET_TIMEOUT_S`, or the socket timeout fires first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from tokenmill.common.platform.redis_embedded import EmbeddedRedis

if TYPE_CHECKING:
    from tokenmill.common.config import Config

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
