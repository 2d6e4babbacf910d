"""The checkpoint store's client (see client.py for its parts)."""

from tokenmill.common.clients.checkpoint.client import CheckpointClient
from tokenmill.common.clients.checkpoint.core import DEFAULT_CHUNK_SIZE, DEFAULT_STREAMS
from tokenmill.common.clients.checkpoint.uploads import Upload

__all__ = ["DEFAULT_CHUNK_SIZE", "DEFAULT_STREAMS", "CheckpointClient", "Upload"]
