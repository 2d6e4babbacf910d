"""Eval jobs end to end: a real checkpoint service, real Redis, the compress service with its worker,
a tiny model with its tokenizer saved to the store, packed datasets on disk. The job's numbers must
equal the in-process engine's on the same tokens and documents, land with the checkpoint version
(`ckpt show`, `ckpt list --metric`), survive a checkpoint-service restart, and every bad input is
refused at submit with a precise status, queueing nothing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from tests.fixtures.grpc import TEST_TOKEN, make_test_config
from tests.fixtures.inference import TinyCheckpoint
from tests.test_compress_job import write_dataset
from tokenmill.common import errors
from tokenmill.common.cli.main import cli
from tokenmill.common.clients import CompressClient
from tokenmill.common.compress import MethodSpec, compress_model
from tokenmill.common.eval.harness import evaluate_task
from tokenmill.common.eval.lm import LocalLM
from tokenmill.common.eval.perplexity import perplexity
from tokenmill.common.eval.tasks import SUITES, load_task
from tokenmill.common.jobs import JobQueue
from tokenmill.common.runtime import ServiceApp
from tokenmill.services.compress.model_job import eval_stream
from tokenmill.services.compress.server import build
from tokenmill.v1 import common_pb2, compress_pb2

ACC = "eval/python/python_next_line/acc"


@pytest.fixture
def env(tmp_path, ckpt, redis_url, redis_client, tiny_ckpt: TinyCheckpoint):
    config = make_test_config(tmp_path, redis_url=redis_url, services={"checkpoint": {"port": ckpt.app.port}})
    app = ServiceApp("compress", config, port=0, metrics=False)
    build(config, app)
    app.start()
    app.set_serving()
    ckpt.client.save(
        "tiny",
        tiny_ckpt.tensors,
        files={"tokenizer.json": tiny_ckpt.tokenizer_json.encode()},
        config=tiny_ckpt.config_dict,
    )
    write_dataset(tmp_path, "text", vocab=tiny_ckpt.config.vocab_size)
    cli_yaml = tmp_path / "cli.yaml"
    cli_yaml.write_text(
        yaml.safe_dump(
            {
                "data_dir": str(tmp_path),
                "redis_url": redis_url,
                "auth": {"tokens": [TEST_TOKEN]},
                "services": {"checkpoint": {"port": ckpt.app.port}, "compress": {"port": app.port}},
            }
        )
    )
    with CompressClient(f"127.0.0.1:{app.port}", token=TEST_TOKEN, timeout=30) as client:
        yield client, ckpt, tmp_path, cli_yaml
    app.stop(0)


def run_cli(cli_yaml: Path, *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(cli, ["--config", str(cli_yaml), *args])
    assert result.exit_code == code, result.output
    return result.output


@pytest.mark.slow
def test_eval_job_equals_the_in_process_engine_and_is_recorded_with_the_version(env, tiny_ckpt):
    client, ckpt, data_dir, cli_yaml = env
    job = client.submit_eval(
        "tiny",
        suite="python",
        limit=6,
        perplexity_dataset="text",
        perplexity_batches=1,
        perplexity_seq_len=64,
    )
    done = client.wait(job.id, timeout=300)
    assert done.state == common_pb2.JOB_STATE_SUCCEEDED, done.error
    report = done.result

    # Perplexity: the one implementation, over the tokens compression's report would read.
    stream = eval_stream(data_dir / "datasets" / "text", split="val", max_tokens=8 * 64 + 1)
    want = perplexity(tiny_ckpt.model, stream, seq_len=64, decode=tiny_ckpt.hf_tokenizer.decode)
    ppl = report["perplexity"]
    assert ppl["tokens"] == want.tokens == 8 * 64
    assert ppl["perplexity"] == pytest.approx(want.perplexity, rel=1e-5)
    assert ppl["bits_per_byte"] == pytest.approx(want.bits_per_byte, rel=1e-5)

    # Tasks: the same numbers as the harness run in process on the same documents.
    lm = LocalLM.from_checkpoint(tiny_ckpt.tensors, tiny_ckpt.config_dict, tiny_ckpt.tokenizer_json)
    by_task = {t["task"]: t for t in report["tasks"]}
    assert sorted(by_task) == ["python_functions", "python_next_line"]
    for name, file in (("python_next_line", "next_line.yaml"), ("python_functions", "functions.yaml")):
        local = evaluate_task(load_task(SUITES / "python" / file), lm, limit=6)
        assert by_task[name]["documents"] == 6
        assert dict(by_task[name]["metrics"]) == pytest.approx(local.metrics), name

    # Progress: task i of n with instances done; the last event of each task is n/n.
    events = [e for e in client.watch_job(job.id, follow=False) if e.kind == "progress" and "task" in e.data]
    assert {(int(e.data["index"]), int(e.data["tasks"])) for e in events} == {(1, 2), (2, 2)}
    assert all(e.data["done"] <= e.data["total"] == 6 for e in events)
    assert [e.data["done"] for e in events if e.data["index"] == 2][-1] == 6

    # Recorded with the version; shown by ckpt show and ckpt list --metric.
    recorded = ckpt.client.get("tiny:1").recorded_metrics
    assert recorded[ACC] == pytest.approx(by_task["python_next_line"]["metrics"]["acc"])
    assert recorded["eval/python/python_functions/pass@1"] == by_task["python_functions"]["metrics"]["pass@1"]
    assert recorded["eval/perplexity/text/perplexity"] == pytest.approx(ppl["perplexity"])
    shown = run_cli(cli_yaml, "ckpt", "show", "tiny")
    assert f"{ACC}  {recorded[ACC]:.6g}" in shown
    listed = run_cli(cli_yaml, "ckpt", "list", "--metric", ACC)
    row = next(line for line in listed.splitlines() if line.startswith("tiny:1"))
    assert f"{recorded[ACC]:.4g}" in row.split()


@pytest.mark.slow
def test_cli_eval_prints_the_table_and_list_sorts_versions_by_a_recorded_metric(env, tiny_ckpt):
    client, ckpt, _, cli_yaml = env
    scaled = {k: v * 0.5 if k.endswith("embed_tokens.weight") else v for k, v in tiny_ckpt.tensors.items()}
    ckpt.client.save(
        "tiny",
        scaled,
        files={"tokenizer.json": tiny_ckpt.tokenizer_json.encode()},
        config=tiny_ckpt.config_dict,
    )
    key = "eval/perplexity/text/perplexity"
    for ref in ("tiny:1", "tiny:2"):
        out = run_cli(cli_yaml, "eval", ref, "--perplexity", "text", "--batches", "1", "--seq-len", "32")
        assert "SUCCEEDED" in out and "perplexity (text)" in out and "bits_per_byte" in out
    values = {ref: ckpt.client.get(ref).recorded_metrics[key] for ref in ("tiny:1", "tiny:2")}
    assert values["tiny:1"] != values["tiny:2"]
    listed = run_cli(cli_yaml, "ckpt", "list", "tiny", "--metric", key, "--sort-metric", key, "--ascending")
    order = [line.split()[0] for line in listed.splitlines() if line.startswith("tiny:")]
    assert order == sorted(values, key=values.__getitem__)
    failed = run_cli(cli_yaml, "eval", "ghost", "--suite", "python", code=1)
    assert "NOT_FOUND" in failed and "ghost" in failed


def test_submit_eval_refuses_bad_input_with_precise_statuses_and_queues_nothing(env, redis_client, tiny_ckpt):
    client, ckpt, data_dir, _ = env
    ckpt.client.save("bare", tiny_ckpt.tensors, config=tiny_ckpt.config_dict)  # no tokenizer.json
    write_dataset(data_dir, "empty", vocab=64, tokens=0)
    write_dataset(data_dir, "wide", vocab=100_000)
    bad_suite = data_dir / "eval" / "broken"
    bad_suite.mkdir(parents=True)
    (bad_suite / "t.yaml").write_text("task: t\ndataset_path: hf\ndoc_to_text: q\ndoc_to_target: a\n")
    cases = [
        ({"source": "ghost", "suite": "python"}, errors.NotFound, "checkpoint 'ghost' not found"),
        ({"source": "tiny:7", "suite": "python"}, errors.NotFound, "not found"),
        ({"source": "tiny"}, errors.InvalidArgument, "nothing to evaluate"),
        (
            {"source": "tiny", "suite": "nope"},
            errors.NotFound,
            r"suite 'nope' not found: use one of \['broken', 'python'\]",
        ),
        (
            {"source": "tiny", "suite": "../python"},
            errors.InvalidArgument,
            "suite '../python' is not a valid",
        ),
        ({"source": "tiny", "suite": "broken"}, errors.InvalidArgument, "only dataset_path: json"),
        (
            {"source": "tiny", "suite": "python", "tasks": ["nope"]},
            errors.NotFound,
            r"has no task \['nope'\]",
        ),
        ({"source": "tiny", "tasks": ["python_next_line"]}, errors.InvalidArgument, "suite is not set"),
        ({"source": "tiny", "suite": "python", "limit": 0}, errors.InvalidArgument, "limit=0"),
        ({"source": "tiny", "suite": "python", "limit": 100_001}, errors.InvalidArgument, "limit=100001"),
        ({"source": "tiny", "suite": "python", "pass_k": [0]}, errors.InvalidArgument, r"pass_k=\[0\]"),
        (
            {"source": "tiny", "suite": "python", "tasks": ["python_next_line"], "pass_k": [2]},
            errors.InvalidArgument,
            "pass_k applies to code tasks",
        ),
        ({"source": "bare", "suite": "python"}, errors.FailedPrecondition, "has no tokenizer.json"),
        ({"source": "tiny", "perplexity_dataset": "ghost"}, errors.NotFound, "perplexity_dataset 'ghost'"),
        ({"source": "tiny", "perplexity_dataset": "empty"}, errors.FailedPrecondition, "has 0 tokens"),
        (
            {"source": "tiny", "perplexity_dataset": "wide"},
            errors.FailedPrecondition,
            "100000-token vocabulary",
        ),
        (
            {"source": "tiny", "suite": "python", "perplexity_batches": 2},
            errors.InvalidArgument,
            "perplexity_dataset is not",
        ),
        (
            {"source": "tiny", "perplexity_dataset": "text", "perplexity_seq_len": 257},
            errors.InvalidArgument,
            "perplexity_seq_len=257 is above 256",
        ),
    ]
    for fields, status, message in cases:
        source = fields.pop("source")
        with pytest.raises(status, match=message):
            client.submit_eval(source, **fields)
    assert JobQueue(redis_client).list("compress")[0] == []


def test_limit_unset_means_every_instance_and_is_not_zero(env):
    from tokenmill.services.compress.eval_plan import validate_eval
    from tokenmill.services.compress.server import _check_source

    unset = compress_pb2.SubmitEvalRequest(source="tiny", suite="python")
    assert "limit" not in validate_eval(unset, _check_source)
    zero = compress_pb2.SubmitEvalRequest(source="tiny", suite="python", limit=0)
    assert zero.HasField("limit")
    with pytest.raises(errors.InvalidArgument, match="leave it unset for all"):
        validate_eval(zero, _check_source)


def test_record_metrics_merges_idempotently_and_survives_a_checkpoint_service_restart(
    start_checkpoint_service,
):
    first = start_checkpoint_service()
    first.client.save("m", {"w": torch.ones(4)}, config={})
    root = first.root
    v = first.client.record_metrics("m:1", "eval", {"s/t/acc": 0.5, "s/t/acc_norm": 0.25})
    assert dict(v.recorded_metrics) == {"eval/s/t/acc": 0.5, "eval/s/t/acc_norm": 0.25}
    again = first.client.record_metrics("m", "eval", {"s/t/acc": 0.5})  # same value: nothing changes
    assert dict(again.recorded_metrics) == dict(v.recorded_metrics)
    merged = first.client.record_metrics("m:1", "eval", {"s/t/acc": 0.75, "s/u/pass@1": 1.0})
    assert dict(merged.recorded_metrics) == {
        "eval/s/t/acc": 0.75,
        "eval/s/t/acc_norm": 0.25,
        "eval/s/u/pass@1": 1.0,
    }
    assert dict(first.client.list("m")[0].recorded_metrics) == dict(merged.recorded_metrics)
    with pytest.raises(errors.NotFound, match="'m:9' not found"):
        first.client.record_metrics("m:9", "eval", {"a": 1.0})
    for values, message in (
        ({"a": math.nan}, "finite"),
        ({"a": math.inf}, "finite"),
        ({}, "metrics is empty"),
        ({"a b": 1.0}, "metric key 'a b'"),
    ):
        with pytest.raises(errors.InvalidArgument, match=message):
            first.client.record_metrics("m:1", "eval", values)
    with pytest.raises(errors.InvalidArgument, match="namespace"):
        first.client.record_metrics("m:1", "", {"a": 1.0})
    first.app.stop(0)  # the restart: a new service reads the same store directory

    second = start_checkpoint_service(f"file://{root}")
    assert dict(second.client.get("m:1").recorded_metrics) == dict(merged.recorded_metrics)
    second.client.save("m", {"w": torch.zeros(4)}, config={})
    assert dict(second.client.get("m:2").recorded_metrics) == {}


@pytest.mark.slow
def test_a_compressed_checkpoint_evaluates_as_stored(env, tiny_ckpt):
    """An int8 version's config carries `quantization`; the scorer reads it as any stored config."""
    client, ckpt, _, _ = env
    packed = compress_model(tiny_ckpt.tensors, MethodSpec("int8"), config=tiny_ckpt.config)
    config = {**tiny_ckpt.config_dict, **packed.manifest_meta}
    files = {"tokenizer.json": tiny_ckpt.tokenizer_json.encode()}
    ckpt.client.save("tiny-int8", packed.tensors, files=files, config=config)
    job = client.submit_eval("tiny-int8", suite="python", tasks=["python_next_line"], limit=4)
    done = client.wait(job.id, timeout=300)
    assert done.state == common_pb2.JOB_STATE_SUCCEEDED, done.error
    lm = LocalLM.from_checkpoint(packed.tensors, config, tiny_ckpt.tokenizer_json)
    local = evaluate_task(load_task(SUITES / "python" / "next_line.yaml"), lm, limit=4)
    assert dict(done.result["tasks"][0]["metrics"]) == pytest.approx(local.metrics)


def test_a_damaged_metrics_document_is_set_aside_and_versions_still_serve(start_checkpoint_service):
    svc = start_checkpoint_service()
    svc.client.save("m", {"w": torch.ones(4)}, config={})
    svc.client.record_metrics("m:1", "eval", {"a": 1.0})
    (svc.root / "metrics" / "m.json").write_bytes(b'{"versions": {"1": {"eval/a": "x"')
    assert dict(svc.client.get("m:1").recorded_metrics) == {}
    assert list(svc.root.glob("quarantine/metrics/m.json.*"))
    assert dict(svc.client.record_metrics("m:1", "eval", {"a": 2.0}).recorded_metrics) == {"eval/a": 2.0}
    svc.client.delete("m:1")
    assert "1" not in (svc.root / "metrics" / "m.json").read_text()
