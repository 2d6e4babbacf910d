"""Compression driven from outside: a retried job whose upload broke at the commit, calibration
splits just past the submit checks, `ckpt show` of a compressed transformers import, and bad
requests sent by a client that learns the API from gRPC reflection."""

from __future__ import annotations

import json

import grpc
import pytest
import torch
import yaml
from click.testing import CliRunner
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tests.fixtures.grpc import TEST_TOKEN
from tests.test_compress_job import CONFIG, VOCAB, model_tensors, write_dataset
from tests.test_compress_job import env as compress_env
from tests.test_model_families import hf_model
from tokenmill.common import errors
from tokenmill.common.cli.main import cli
from tokenmill.common.clients.checkpoint.uploads import Upload
from tokenmill.common.compress import MethodSpec, compress_model
from tokenmill.common.jobs import JobQueue, JobState, JobWorker
from tokenmill.services.compress.job import REPORT_FILE, CompressJobHandler
from tokenmill.services.compress.server import JOB_TYPE
from tokenmill.v1 import common_pb2

env = compress_env  # the compress service with its worker, a checkpoint service, a dataset


@pytest.mark.parametrize("broken", ["before commit", "after commit"])
def test_a_retry_after_the_upload_broke_finishes_the_job_once(
    tmp_path, ckpt, redis_client, monkeypatch, broken
):
    """Attempt 1 registers every entry of the new version (its report holds that attempt's
    timings) and then fails at the commit, before or after it took effect. Attempt 2 must finish
    the job with one version: not fail on the first attempt's leftover upload (its own report
    differs), and not compress again what is already stored."""
    ckpt.client.save("base", model_tensors(), config=CONFIG.to_dict())
    queue = JobQueue(redis_client, lease_seconds=30.0, max_attempts=3)
    real_commit = Upload.commit
    commits: list[str] = []

    def commit_breaks_once(self: Upload):
        commits.append(self.upload_id)
        if len(commits) == 1 and broken == "before commit":
            raise errors.Unavailable("checkpoint service restarting")
        version = real_commit(self)
        if len(commits) == 1:
            raise errors.Unavailable("connection reset before the reply")
        return version

    monkeypatch.setattr(Upload, "commit", commit_breaks_once)
    job = queue.submit(JOB_TYPE, {"source": "base", "output_name": "base-int8", "method": "int8"})
    worker = JobWorker(queue, JOB_TYPE, CompressJobHandler(ckpt.new_client, tmp_path), heartbeat_seconds=5)
    for _ in range(4):
        if queue.get(job.id).state in (JobState.SUCCEEDED, JobState.FAILED):
            break
        worker.run_once(block_seconds=2)
    final = queue.get(job.id)
    assert final.state == JobState.SUCCEEDED, final.error
    assert final.attempts == 2 and final.result["checkpoint"] == "base-int8:1"
    assert [v.ref for v in ckpt.client.list("base-int8")] == ["base-int8:1"]
    assert ckpt.client.load("base-int8:1")["model.layers.0.mlp.up_proj.qweight"].dtype == torch.int8
    stored = json.loads(ckpt.client.load_files("base-int8:1", [REPORT_FILE])[REPORT_FILE])
    if broken == "after commit":  # the stored version is the result: its report, no second run
        assert final.result["report"] == {**stored, "output": "base-int8:1"}
        assert len([e for e in queue.events(job.id) if e.kind == "progress"]) == 14
    assert [a["name"] for a in final.artifacts] == ["base-int8"]


def test_a_calibration_split_too_small_for_whole_rows_is_refused_at_submit(env):
    """A 100-token window and a 192-token train split: more than the engine's 128-token minimum,
    but only one whole 100-token row fits, so the worker would read 100 tokens and fail after
    loading and measuring. The submit must refuse it, with the count that is needed."""
    client, ckpt, data_dir = env
    ckpt.client.save("w100", model_tensors(), config=CONFIG.replace(max_seq_len=100).to_dict())
    write_dataset(data_dir, "small", tokens=192)
    with pytest.raises(errors.FailedPrecondition, match="has 192 tokens in its 'train' split; at least 200"):
        client.submit("w100", "out", "int4_gptq", group_size=32, calibration_dataset="small")


@pytest.mark.parametrize("folder", ["hf", "Qwen2 tiny (copy)"])
def test_ckpt_show_of_a_compressed_import_names_where_the_lineage_leaves_the_store(env, tmp_path, folder):
    """A transformers model imported from a folder, compressed by a job: `ckpt show` walks the
    lineage to the import's source folder and says it was imported from there (not deleted, and
    not an error when the folder's name is no valid checkpoint reference)."""
    client, ckpt, _ = env
    hf_model("Qwen2", vocab_size=VOCAB, tie_word_embeddings=True).save_pretrained(tmp_path / folder)
    ckpt.client.import_hf(tmp_path / folder, "imported")
    done = client.wait(client.submit("imported", "imported-int8", "int8").id, timeout=120)
    assert done.state == common_pb2.JOB_STATE_SUCCEEDED, done.error
    config_path = tmp_path / "cli.yaml"
    config_path.write_text(yaml.safe_dump(client.cli_yaml))
    shown = CliRunner().invoke(cli, ["--config", str(config_path), "ckpt", "show", "imported-int8"])
    assert shown.exit_code == 0, shown.output
    assert f"lineage: imported-int8:1 <- imported:1 <- hf:{folder} (imported)" in shown.output, shown.output
    assert "compression report (int8 of imported:1)" in shown.output


def test_bad_requests_over_reflection_get_precise_status_codes(env):
    """A client that knows only the server (grpcurl's way): the request type comes from reflection,
    and each bad input the issue lists is refused on the wire with its own status code."""
    client, ckpt, _ = env
    packed = compress_model(model_tensors(), MethodSpec("int4-rtn", group_size=32), config=CONFIG)
    ckpt.client.save("q4", packed.tensors, config={**CONFIG.to_dict(), **packed.manifest_meta})
    port = client.cli_yaml["services"]["compress"]["port"]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        service = pool.FindServiceByName("tokenmill.v1.CompressService")
        method = service.methods_by_name["SubmitCompress"]
        request_type = message_factory.GetMessageClass(method.input_type)
        call = channel.unary_unary(
            "/tokenmill.v1.CompressService/SubmitCompress",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=message_factory.GetMessageClass(method.output_type).FromString,
        )
        cases = [
            (dict(source="ghost", method="int8"), grpc.StatusCode.NOT_FOUND, "checkpoint 'ghost' not found"),
            (dict(source="base", method="int4_rtn"), grpc.StatusCode.INVALID_ARGUMENT, "does not divide"),
            (dict(source="q4", method="int4_rtn", group_size=32), grpc.StatusCode.FAILED_PRECONDITION,
             "already compressed with int4-rtn"),
            (dict(source="base", method="int4_gptq", group_size=32, calibration_dataset="ghost"),
             grpc.StatusCode.NOT_FOUND, "calibration_dataset 'ghost' not found"),
        ]  # fmt: skip
        for fields, code, message in cases:
            with pytest.raises(grpc.RpcError) as info:
                call(
                    request_type(output_name="out", **fields),
                    metadata=[("authorization", f"Bearer {TEST_TOKEN}")],
                    timeout=30,
                )
            assert info.value.code() == code and message in info.value.details(), info.value.details()
