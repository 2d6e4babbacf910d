"""The trainer's local mode is the checkpoint store engine in process: several ranks (each with its own
store instance, as in separate worker processes) write one version; versions, tags, ``latest`` and the
name rules are the store's."""

from __future__ import annotations

import pytest
import torch

from tokenmill.common import errors
from tokenmill.common.checkpoint import CheckpointStore
from tokenmill.common.checkpoint.format import piece_name
from tokenmill.common.trainer.checkpoint_io import read_full, read_tensor
from tokenmill.common.trainer.local_io import LocalCheckpointIO


def _save(root, weight: torch.Tensor, *, tags=()) -> str:
    """Two ranks, each with half of `weight`'s rows as a shard piece; rank 0 also writes a file."""
    ranks = [LocalCheckpointIO(root), LocalCheckpointIO(root)]
    upload_id = ranks[0].begin("m", config={"hidden": 4}, tags=tags, metrics={"loss": 1.5, "x": [1]})
    half = weight.shape[0] // 2
    for rank in (1, 0):  # any order: rank 0 commits after the barrier
        offsets = [rank * half, 0]
        key = piece_name("w", offsets)
        info = {"logical_name": "w", "offsets": offsets, "global_shape": list(weight.shape)}
        files = {"train_state.json": b'{"step": 3}'} if rank == 0 else {}
        ranks[rank].write(upload_id, rank, {key: weight[rank * half : (rank + 1) * half]}, {key: info}, files)
    return ranks[0].commit(upload_id)


def test_ranks_write_one_store_version_read_back_on_any_slice(tmp_path):
    weight = torch.randn(6, 4, dtype=torch.bfloat16)
    assert _save(tmp_path, weight, tags=["run-a"]) == "m:1"
    reader = LocalCheckpointIO(tmp_path)
    assert torch.equal(read_full(reader, "m:run-a")["w"], weight)
    layout = reader.layout("m")
    assert torch.equal(read_tensor(reader, "m", layout, "w", [slice(2, 5)]), weight[2:5])  # spans both pieces
    assert reader.read_files("m:1", ["train_state.json"]) == {"train_state.json": b'{"step": 3}'}
    with pytest.raises(errors.NotFound):
        reader.read_files("m:1", ["missing.json"])
    # it is the store's version: its manifest, metrics and staging are the store's own
    store = CheckpointStore.open(str(tmp_path))
    version = store.get("m:run-a")
    assert version.manifest.metrics == {"loss": 1.5} and version.tags == ["latest", "run-a"]
    assert not any((tmp_path / "staging").iterdir())


def test_versions_latest_and_names_come_from_the_store(tmp_path):
    io = LocalCheckpointIO(tmp_path)
    first = _save(tmp_path, torch.zeros(4, 2), tags=["run-a"])
    second = _save(tmp_path, torch.ones(4, 2), tags=["run-a"])
    assert (first, second) == ("m:1", "m:2")
    assert io.resolve("m") == io.resolve("m:latest") == io.resolve("m:run-a") == "m:2"
    assert io.resolve("m:1") == "m:1" and io.resolve("m:7") is None and io.resolve("ghost") is None
    assert torch.equal(read_full(io, "m:1")["w"], torch.zeros(4, 2))
    with pytest.raises(errors.InvalidArgument, match="invalid checkpoint name"):
        io.begin("a..b", config={})
    with pytest.raises(errors.InvalidArgument, match="reserved"):
        io.begin("m", config={}, tags=["latest"])
