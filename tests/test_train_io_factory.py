"""The trainer engine builds worker CheckpointIOs through a factory the service passes in, so the
engine never imports the service (tokenmill.services.trainer.io_factory) that knows the checkpoint store."""

from __future__ import annotations

import pytest

from tokenmill.common import errors
from tokenmill.common.trainer.checkpoint_io import resolve_io_factory
from tokenmill.common.trainer.local_io import LocalCheckpointIO, local_checkpoint_io
from tokenmill.services.trainer.io_factory import DOTTED, make_checkpoint_io


def test_engine_default_factory_builds_local_only(tmp_path):
    assert isinstance(local_checkpoint_io({"kind": "local", "root": str(tmp_path)}), LocalCheckpointIO)
    with pytest.raises(errors.InvalidArgument, match="io_factory"):
        local_checkpoint_io({"kind": "store", "address": "127.0.0.1:1"})


def test_factories_resolve_from_callables_and_dotted_paths(tmp_path):
    assert resolve_io_factory(make_checkpoint_io) is make_checkpoint_io
    assert resolve_io_factory(DOTTED) is make_checkpoint_io
    for bad in ("no-colon", "tokenmill.services.trainer.io_factory:nope", ":x"):
        with pytest.raises(errors.InvalidArgument, match="io factory"):
            resolve_io_factory(bad)


def test_service_factory_knows_both_kinds(tmp_path):
    assert isinstance(make_checkpoint_io({"kind": "local", "root": str(tmp_path)}), LocalCheckpointIO)
    store = make_checkpoint_io({"kind": "store", "address": "127.0.0.1:1", "token": "t" * 16})
    assert type(store).__name__ == "StoreCheckpointIO"
    store.client.close()
    with pytest.raises(errors.InvalidArgument, match="unknown checkpoint io kind"):
        make_checkpoint_io({"kind": "s3"})
