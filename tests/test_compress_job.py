"""Compress jobs end to end: a real checkpoint service, real Redis, the compress service with its
worker; a model saved to the store, packed datasets on disk. Covers the report, lineage, serving
the result, and every bad input refused before work (NOT_FOUND / INVALID_ARGUMENT / FAILED_PRECONDITION)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from tests.fixtures.grpc import TEST_TOKEN, make_test_config
from tokenmill.common import errors
from tokenmill.common.cli.main import cli
from tokenmill.common.clients import CompressClient
from tokenmill.common.compress import MethodSpec, compress_model
from tokenmill.common.data.dataset import MANIFEST, ShardWriter, token_dtype_for, write_json_atomic
from tokenmill.common.inference.config import EngineConfig
from tokenmill.common.inference.llm_engine import build_engine
from tokenmill.common.inference.request import SamplingParams
from tokenmill.common.jobs import JobQueue, JobState, JobWorker
from tokenmill.common.model.quant import dequantize_state_dict
from tokenmill.common.model.transformer import ModelConfig, Transformer
from tokenmill.common.runtime import ServiceApp
from tokenmill.common.runtime.proto_struct import struct_to_dict
from tokenmill.services.compress.job import REPORT_FILE, CompressJobHandler
from tokenmill.services.compress.server import JOB_TYPE, build
from tokenmill.services.inference.loader import load_model
from tokenmill.v1 import common_pb2

VOCAB = 256
CONFIG = ModelConfig(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
    max_seq_len=64, tie_embeddings=True,
)  # fmt: skip


def write_dataset(data_dir: Path, name: str, vocab: int = VOCAB, tokens: int = 4096) -> None:
    out = data_dir / "datasets" / name
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    splits = {}
    for split in ("train", "val"):
        with ShardWriter(out, split, vocab_size=vocab, eos_id=0) as w:
            for _ in range(tokens // 64):
                w.add(rng.integers(1, vocab, 63))
            splits[split] = w.close()
    write_json_atomic(
        out / MANIFEST,
        {"name": name, "created_at": 0.0, "token_dtype": token_dtype_for(vocab), "vocab_size": vocab,
         "eos_id": 0, "splits": splits, "stages": [], "config": {}},
    )  # fmt: skip


def model_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in Transformer(CONFIG).state_dict().items()}


@pytest.fixture
def env(tmp_path, ckpt, redis_url, redis_client):
    config = make_test_config(tmp_path, redis_url=redis_url, services={"checkpoint": {"port": ckpt.app.port}})
    app = ServiceApp("compress", config, port=0, metrics=False)
    build(config, app)
    app.start()
    app.set_serving()
    ckpt.client.save("base", model_tensors(), config=CONFIG.to_dict())
    write_dataset(tmp_path, "calib")
    with CompressClient(f"127.0.0.1:{app.port}", token=TEST_TOKEN, timeout=30) as client:
        client.cli_yaml = {  # type: ignore[attr-defined]
            "data_dir": str(tmp_path), "redis_url": redis_url, "auth": {"tokens": [TEST_TOKEN]},
            "services": {"checkpoint": {"port": ckpt.app.port}, "compress": {"port": app.port}},
        }  # fmt: skip
        yield client, ckpt, tmp_path
    app.stop(0)


@pytest.mark.slow
def test_int8_job_stores_a_child_version_with_report_and_serves_like_its_dequantized_reference(env):
    client, ckpt, _ = env
    job = client.submit("base", "base-int8", "int8", eval_dataset="calib", eval_batches=1)
    done = client.wait(job.id, timeout=120)
    assert done.state == common_pb2.JOB_STATE_SUCCEEDED, done.error
    report = done.result["report"]
    assert report["source"] == "base:1" and report["output"] == "base-int8:1"
    assert report["bytes_after"] < report["bytes_before"] and report["ratio"] > 1.5
    assert abs(report["perplexity_after"] / report["perplexity_before"] - 1) < 0.05
    assert report["tokens_per_second_before"] > 0 and report["tokens_per_second_after"] > 0
    assert len(report["per_layer_errors"]) == 2 * 7 and all(
        0 < e["error"] < 0.05 for e in report["per_layer_errors"]
    )
    progress = [e for e in client.watch_job(job.id, follow=False) if e.kind == "progress"]
    assert [p.data["layer"] for p in progress] == list(range(1, 15))
    version = ckpt.client.get("base-int8:1")
    assert version.manifest.lineage.parent == "base:1" and version.manifest.lineage.job_id == job.id
    assert REPORT_FILE in {f.name for f in version.manifest.files}
    loaded = load_model(ckpt.client, "base-int8")  # what `tokenmill serve` runs, no extra flags
    assert loaded.quantization == "int8"
    assert_serves_like_its_dequantized_reference(loaded)


def test_the_source_is_pinned_to_the_version_checked_at_submit(env):
    """A version saved after the submit (or before a retry) must not become what the job compresses:
    the report, the lineage and the checks made at submit all name the version that was checked."""
    client, ckpt, _ = env
    job = client.submit("base", "base-pinned", "int8")
    assert job.spec["source"] == "base:1"
    ckpt.client.save("base", model_tensors(seed=1), config=CONFIG.to_dict())  # base:2, now the latest
    done = client.wait(job.id, timeout=120)
    assert done.state == common_pb2.JOB_STATE_SUCCEEDED, done.error
    assert done.result["report"]["source"] == "base:1"
    assert ckpt.client.get("base-pinned:1").manifest.lineage.parent == "base:1"


def test_a_sharded_trainer_checkpoint_with_optimizer_state_compresses(env):
    """What `tokenmill train` stores with 2+ workers: each parameter as FSDP row pieces named
    `name@offsets`, beside optimizer state named after the weights. The submit's checks saw the
    pieces, found no decoder linear ("keeps every one of the 0 decoder linears dense") and refused
    every such checkpoint, the demo's included."""
    client, ckpt, _ = env
    tensors, shards = {}, {}
    for name, t in model_tensors().items():
        half = t.shape[0] // 2
        for offset, piece in ((0, t[:half]), (half, t[half:])):
            key = f"{name}@{offset}{',0' * (t.dim() - 1)}"
            tensors[key] = piece.clone()
            shards[key] = {
                "logical_name": name,
                "global_shape": list(t.shape),
                "offsets": [offset] + [0] * (t.dim() - 1),
            }
        tensors[f"optim.exp_avg.{name}"] = torch.zeros_like(t)
    ckpt.client.save("sharded", tensors, config=CONFIG.to_dict(), shards=shards)
    done = client.wait(client.submit("sharded", "sharded-int8", "int8").id, timeout=120)
    assert done.state == common_pb2.JOB_STATE_SUCCEEDED, done.error
    assert len(done.result["report"]["per_layer_errors"]) == 2 * 7
    assert not any(k.startswith("optim.") for k in ckpt.client.load("sharded-int8:1"))


def assert_serves_like_its_dequantized_reference(loaded) -> None:
    """The inference engine's greedy output on the stored tensors equals a training-model forward
    over the dequantized weights."""
    stored = dict(loaded.tensors)
    engine = build_engine(loaded.tensors, loaded.config, EngineConfig(num_blocks=16))
    reference = Transformer(CONFIG).float().eval()
    reference.load_state_dict(dequantize_state_dict(stored), strict=False)
    prompt = [5, 9, 17, 33]
    out = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(reference(torch.tensor([ids]))[0, -1].argmax()))
    assert out.output_token_ids == ids[len(prompt) :]


Q_PROJ = "model.layers.0.self_attn.q_proj"


@pytest.mark.slow
def test_wanda_2_4_job_then_int8_job_serves_like_its_reference_keeping_the_2_4_metadata(env):
    """Two jobs compose: prune_2_4 scored by Wanda (calibrated), then int8 of that version. The int8
    child keeps the parent's nm_index and zeros, records both steps, and serves like its reference."""
    client, ckpt, _ = env
    job = client.submit(
        "base", "base-24", "prune_2_4", score="wanda", calibration_dataset="calib", calibration_samples=8
    )
    done = client.wait(job.id, timeout=120)
    assert done.state == common_pb2.JOB_STATE_SUCCEEDED, done.error
    assert done.result["report"]["settings"] == {"method": "prune-wanda", "sparsity": 0.5, "pattern": "2:4",
                                                 "keep_dense": []}  # fmt: skip
    pruned = ckpt.client.load("base-24:1")
    assert torch.all((pruned[f"{Q_PROJ}.weight"] != 0).reshape(-1, 4).sum(-1) == 2)
    done = client.wait(client.submit("base-24", "base-24-int8", "int8").id, timeout=120)
    assert done.state == common_pb2.JOB_STATE_SUCCEEDED, done.error
    assert done.result["report"]["sparsity"] == 0.5
    version = ckpt.client.get("base-24-int8:1", include_manifest=True)
    assert version.manifest.lineage.parent == "base-24:1"
    recorded = struct_to_dict(version.manifest.config)["compression"]
    assert [s["method"] for s in recorded["steps"]] == ["prune-wanda", "int8"] and recorded["sparsity"] == 0.5
    loaded = load_model(ckpt.client, "base-24-int8")
    assert loaded.quantization == "int8"
    assert torch.equal(loaded.tensors[f"{Q_PROJ}.nm_index"], pruned[f"{Q_PROJ}.nm_index"])
    assert torch.all((loaded.tensors[f"{Q_PROJ}.qweight"] != 0).reshape(-1, 4).sum(-1) <= 2)
    assert_serves_like_its_dequantized_reference(loaded)


def test_compositions_that_do_not_make_sense_are_failed_precondition_naming_both_methods(env):
    client, ckpt, _ = env
    tensors = model_tensors()
    for steps, name in (
        ([MethodSpec("int8")], "q8"),
        ([MethodSpec("prune-magnitude", sparsity=0.5)], "sparse"),
        ([MethodSpec("svd", rank_fraction=0.5)], "low"),
    ):
        done = compress_model(tensors, steps, config=CONFIG)
        ckpt.client.save(name, done.tensors, config={**CONFIG.to_dict(), **done.manifest_meta})
    refused = [
        ("q8", "int4_rtn", {"group_size": 32}, "int4-rtn cannot be applied to a checkpoint already compressed with int8"),
        ("q8", "int8", {}, "int8 cannot be applied to a checkpoint already compressed with int8"),
        ("q8", "prune_magnitude", {"sparsity": 0.5}, "prune-magnitude cannot be applied to .* with int8"),
        ("q8", "svd", {"rank_fraction": 0.5}, "svd cannot be applied to .* with int8"),
        ("sparse", "int4_gptq", {"group_size": 32, "calibration_dataset": "calib"},
         "int4-gptq cannot be applied to .* with prune-magnitude: it would refill"),
        ("sparse", "svd", {"rank_fraction": 0.5}, "svd cannot be applied to .* with prune-magnitude"),
        ("low", "int8", {}, "int8 cannot be applied to .* with svd"),
    ]  # fmt: skip
    for source, method, fields, message in refused:
        with pytest.raises(errors.FailedPrecondition, match=message):
            client.submit(source, "out", method, **fields)
    done = client.wait(client.submit("sparse", "sparse-q4", "int4_rtn", group_size=32).id, timeout=120)
    assert done.state == common_pb2.JOB_STATE_SUCCEEDED, done.error  # int4 after pruning composes


def test_submit_rejects_unknown_checkpoint_with_not_found(env):
    client, _, _ = env
    with pytest.raises(errors.NotFound, match="checkpoint 'nope' not found"):
        client.submit("nope", "out", "int8")
    with pytest.raises(errors.NotFound, match="not found"):
        client.submit("base:9", "out", "int8")


def test_submit_rejects_methods_that_do_not_apply(env):
    client, ckpt, _ = env
    with pytest.raises(errors.InvalidArgument, match="group_size 128 does not divide in_features 64"):
        client.submit("base", "out", "int4_rtn")
    odd = ModelConfig(**{**CONFIG.to_dict(), "hidden_size": 66, "num_heads": 3, "num_kv_heads": 3})
    torch.manual_seed(1)
    ckpt.client.save("odd", Transformer(odd).state_dict(), config=odd.to_dict())
    with pytest.raises(errors.InvalidArgument, match="not divisible by 4"):
        client.submit("odd", "out", "prune_2_4")
    packed = compress_model(model_tensors(), MethodSpec("int4-rtn", group_size=32), config=CONFIG)
    ckpt.client.save("q4", packed.tensors, config={**CONFIG.to_dict(), **packed.manifest_meta})
    with pytest.raises(errors.FailedPrecondition, match="int4-rtn cannot be .* compressed with int4-rtn"):
        client.submit("q4", "out", "int4_rtn", group_size=32)
    bare = {k: v for k, v in packed.manifest_meta.items() if k != "compression"}  # quantized elsewhere
    ckpt.client.save("q4-bare", packed.tensors, config={**CONFIG.to_dict(), **bare})
    with pytest.raises(errors.FailedPrecondition, match="int4-awq cannot .* int4 quantization .*qweight"):
        client.submit("q4-bare", "out", "int4_awq", group_size=32, calibration_dataset="calib")


def test_submit_rejects_missing_empty_small_or_foreign_vocabulary_datasets(env):
    client, ckpt, data_dir = env
    gptq = {"group_size": 32}
    with pytest.raises(errors.NotFound, match="calibration_dataset 'ghost' not found"):
        client.submit("base", "out", "int4_gptq", calibration_dataset="ghost", **gptq)
    with pytest.raises(errors.NotFound, match="eval_dataset 'ghost' not found"):
        client.submit("base", "out", "int8", eval_dataset="ghost")
    write_dataset(data_dir, "tiny", tokens=64)
    with pytest.raises(errors.FailedPrecondition, match="has 64 tokens in its 'train' split; at least 128"):
        client.submit("base", "out", "int4_gptq", calibration_dataset="tiny", **gptq)
    write_dataset(data_dir, "empty", tokens=0)
    with pytest.raises(errors.FailedPrecondition, match="has 0 tokens in its 'val' split"):
        client.submit("base", "out", "int8", eval_dataset="empty")
    with pytest.raises(errors.FailedPrecondition, match="'empty' has 0 tokens in its 'train' split"):
        client.submit("base", "out", "prune_2_4", score="wanda", calibration_dataset="empty")
    write_dataset(data_dir, "wide", vocab=1024)
    with pytest.raises(
        errors.FailedPrecondition, match="1024-token vocabulary but base:1 has vocab_size 256"
    ):
        client.submit("base", "out", "prune_wanda", sparsity=0.5, calibration_dataset="wide")
    with pytest.raises(
        errors.FailedPrecondition, match="eval_dataset 'wide' was tokenized with a 1024-token"
    ):
        client.submit("base", "out", "int8", eval_dataset="wide")
    # Enough tokens for the engine's minimum but not for one calibration row of a 512-token model.
    ckpt.client.save("long", model_tensors(), config=CONFIG.replace(max_seq_len=512).to_dict())
    write_dataset(data_dir, "short", tokens=256)
    with pytest.raises(errors.FailedPrecondition, match="has 256 tokens in its 'train' split; at least 512"):
        client.submit("long", "out", "int4_gptq", calibration_dataset="short", **gptq)


def test_submit_refuses_an_eval_seq_len_above_what_the_model_is_evaluated_with(env):
    client, _, _ = env
    with pytest.raises(errors.InvalidArgument, match="eval_seq_len=128 is above 64, the most this model"):
        client.submit("base", "out", "int8", eval_dataset="calib", eval_seq_len=128)


def test_submit_refuses_settings_that_would_only_fail_or_do_nothing_in_the_worker(env):
    client, ckpt, data_dir = env
    with pytest.raises(errors.InvalidArgument, match="calibration_samples=1 rows of 64 tokens .* >= 2"):
        client.submit("base", "out", "int4_gptq", group_size=32, calibration_dataset="calib",
                      calibration_samples=1)  # fmt: skip
    with pytest.raises(errors.InvalidArgument, match="keep_dense pattern '\\*.down_prj' matches no"):
        client.submit("base", "out", "int8", keep_dense=["*.down_prj"])
    with pytest.raises(errors.InvalidArgument, match="nothing is left to compress"):
        client.submit("base", "out", "int8", keep_dense=["*"])
    with pytest.raises(errors.InvalidArgument, match="svd rank_fraction 0.9: every layer's factors"):
        client.submit("base", "out", "svd", rank_fraction=0.9)
    done = client.wait(client.submit("base", "base-p5", "prune_magnitude", sparsity=0.5).id, timeout=60)
    assert done.state == common_pb2.JOB_STATE_SUCCEEDED, done.error
    with pytest.raises(errors.FailedPrecondition, match="sparsity 0.3 would prune nothing"):
        client.submit("base-p5", "out", "prune_magnitude", sparsity=0.3)


@pytest.mark.slow
def test_eval_ids_outside_the_vocabulary_fail_precisely_when_the_dataset_records_no_vocabulary(env):
    client, _, data_dir = env
    write_dataset(data_dir, "unrecorded", vocab=1024)
    manifest = data_dir / "datasets" / "unrecorded" / MANIFEST
    body = json.loads(manifest.read_text())
    del body["vocab_size"]  # built by hand: nothing says which tokenizer made it
    write_json_atomic(manifest, body)
    done = client.wait(client.submit("base", "out", "int8", eval_dataset="unrecorded").id, timeout=60)
    assert done.state == common_pb2.JOB_STATE_FAILED and done.attempts == 1, done.error
    assert "FAILED_PRECONDITION" in done.error and "outside the model's vocabulary of 256" in done.error


@pytest.mark.slow
def test_svd_energy_job_stores_its_report_whole_carries_the_hf_config_and_serves(env):
    """Layers whose factors would outgrow the weight stay dense and are named in the notes; the
    stored report (what `ckpt show` prints) has the wall time; config.json travels to the child, so
    the child can be a distillation teacher like its parent."""
    client, ckpt, _ = env
    hf_config = json.dumps({**CONFIG.to_hf_config(), "architectures": ["LlamaForCausalLM"]}).encode()
    ckpt.client.save("hf", model_tensors(), config=CONFIG.to_dict(), files={"config.json": hf_config})
    done = client.wait(client.submit("hf", "hf-svd", "svd", energy=0.6).id, timeout=120)
    assert done.state == common_pb2.JOB_STATE_SUCCEEDED, done.error
    report = done.result["report"]
    assert report["settings"]["energy"] == 0.6
    stored = ckpt.client.load("hf-svd:1")
    dense = sorted(b[: -len(".weight")] for b in stored if b.endswith("_proj.weight"))
    assert [n.split(":")[0] for n in report["notes"]] == [f"svd {b}" for b in dense]
    assert any(k.endswith(".svd_u") for k in stored)
    files = ckpt.client.load_files("hf-svd:1", ["config.json", REPORT_FILE])
    assert files["config.json"] == hf_config
    assert json.loads(files[REPORT_FILE])["wall_seconds"] > 0
    assert_serves_like_its_dequantized_reference(load_model(ckpt.client, "hf-svd"))


@pytest.mark.slow
def test_nan_weights_fail_the_job_before_work_without_retry_or_new_version(env):
    client, ckpt, _ = env
    bad = model_tensors()
    bad["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    ckpt.client.save("broken", bad, config=CONFIG.to_dict())
    done = client.wait(client.submit("broken", "broken-int8", "int8").id, timeout=60)
    assert done.state == common_pb2.JOB_STATE_FAILED and done.attempts == 1
    assert "FAILED_PRECONDITION" in done.error and "up_proj.weight has NaN/Inf" in done.error
    with pytest.raises(errors.NotFound):
        ckpt.client.get("broken-int8")


@pytest.mark.slow
def test_cli_compress_follows_progress_prints_the_report_and_ckpt_show_shows_lineage(env, tmp_path):
    client, _, _ = env
    config_path = tmp_path / "cli.yaml"
    config_path.write_text(yaml.safe_dump(client.cli_yaml))
    runner = CliRunner()
    out = runner.invoke(
        cli, ["--config", str(config_path), "compress", "base", "--method", "int8", "--eval", "calib"]
    )
    assert out.exit_code == 0, out.output
    assert "layer 14/14" in out.output and "checkpoint base-int8:1" in out.output
    assert "perplexity (calib)" in out.output and "ratio" in out.output
    shown = runner.invoke(cli, ["--config", str(config_path), "ckpt", "show", "base-int8"])
    assert shown.exit_code == 0, shown.output
    assert (
        "lineage: base-int8:1 <- base:1" in shown.output
        and "compression report (int8 of base:1)" in shown.output
    )
    bad = runner.invoke(cli, ["--config", str(config_path), "compress", "ghost", "--method", "int8"])
    assert bad.exit_code == 1 and "NOT_FOUND: checkpoint 'ghost' not found" in bad.output
    args = ["--config", str(config_path), "compress", "base", "--method", "prune_2_4", "--score", "wanda"]
    uncalibrated = runner.invoke(cli, args)
    assert (
        uncalibrated.exit_code == 1 and "with score 'wanda' needs calibration_dataset" in uncalibrated.output
    )
    scored = runner.invoke(cli, [*args, "--calib", "calib", "--output", "base-w24"])
    assert scored.exit_code == 0, scored.output
    assert "checkpoint base-w24:1" in scored.output and "sparsity" in scored.output


def test_cancel_between_layers_stops_the_running_job_and_stores_nothing(tmp_path, ckpt, redis_client):
    """A real queue and worker running the real handler; the cancel lands right after layer 1's
    progress event (a wrapper requests it there), and the worker stops before layer 2."""
    ckpt.client.save("base", model_tensors(), config=CONFIG.to_dict())
    queue = JobQueue(redis_client, lease_seconds=30.0, max_attempts=2)
    handler = CompressJobHandler(ckpt.new_client, tmp_path)

    def cancel_after_first_layer(ctx):
        report = ctx.progress

        def progress(message="", **data):
            report(message, **data)
            if data.get("layer") == 1:
                queue.cancel(ctx.job.id, reason="enough")

        ctx.progress = progress
        return handler(ctx)

    job = queue.submit(JOB_TYPE, {"source": "base", "output_name": "base-int8", "method": "int8"})
    assert JobWorker(queue, JOB_TYPE, cancel_after_first_layer, heartbeat_seconds=5).run_once(block_seconds=2)
    final = queue.get(job.id)
    assert final.state == JobState.CANCELLED
    layers = [e.data["layer"] for e in queue.events(job.id) if e.kind == "progress"]
    assert layers == [1]
    with pytest.raises(errors.NotFound):
        ckpt.client.get("base-int8")


@pytest.mark.slow
def test_gptq_job_calibrates_on_the_dataset_and_its_output_serves_as_int4(env):
    client, ckpt, _ = env
    job = client.submit(
        "base", "base-gptq", "int4_gptq", group_size=32, calibration_dataset="calib", calibration_samples=16
    )
    done = client.wait(job.id, timeout=120)
    assert done.state == common_pb2.JOB_STATE_SUCCEEDED, done.error
    assert done.result["report"]["settings"]["group_size"] == 32
    version = ckpt.client.get("base-gptq:1")
    assert version.manifest.lineage.dataset == "calib"
    loaded = load_model(ckpt.client, "base-gptq")
    assert loaded.quantization == "int4" and loaded.config["quantization"]["algorithm"] == "gptq"
    engine = build_engine(loaded.tensors, loaded.config, EngineConfig(num_blocks=16))
    out = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))[0]
    assert len(out.output_token_ids) == 4
