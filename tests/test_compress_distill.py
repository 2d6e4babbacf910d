"""SubmitCompress(method=distill) through real services: a trainer service, a checkpoint service and
a compress service on loopback gRPC over one real Redis; the teacher is a `transformers` Llama saved
to the store. The report comes back and is recorded on the student; a cancel reaches the trainer job;
a retried attempt re-attaches to its trainer job; every bad input is refused before anything queues."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner

from tests.fixtures.grpc import TEST_TOKEN, free_port, make_test_config
from tests.test_trainer_distill import hf_model, save_hf
from tokenmill.common import errors
from tokenmill.common.cli.compress import compress
from tokenmill.common.clients import CompressClient
from tokenmill.common.clients.checkpoint import CheckpointClient
from tokenmill.common.clients.trainer import TrainerClient
from tokenmill.common.compress import tensor_bytes
from tokenmill.common.jobs import JobQueue, JobWorker
from tokenmill.common.runtime import ServiceApp
from tokenmill.common.runtime.proto_struct import struct_to_dict
from tokenmill.services.compress.server import JOB_TYPE, ModelJobs, build
from tokenmill.v1 import common_pb2

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

DISTILL = {"student_preset": "test-1m", "distill_steps": 4, "train_dataset": "stories"}


@pytest.fixture
def stack(trainer_service, redis_url, tmp_path):
    """(trainer service, `start(run_worker, trainer_port)` -> a compress app wired to it)."""
    svc = trainer_service
    apps: list[ServiceApp] = []

    def config(trainer_port: int) -> Any:
        return make_test_config(
            tmp_path,
            redis_url=redis_url,
            data_dir=svc.config.data_dir,
            jobs={"lease_seconds": 10.0, "heartbeat_seconds": 1.0, "max_attempts": 2},
            services={
                "trainer": {"host": "127.0.0.1", "port": trainer_port},
                "checkpoint": {"host": "127.0.0.1", "port": svc.ckpt.app.port},
            },
        )

    def start(run_worker: bool = True, trainer_port: int | None = None) -> ServiceApp:
        cfg = config(trainer_port or svc.app.port)
        app = ServiceApp("compress", cfg, port=0, metrics=False)
        build(cfg, app, run_worker=run_worker)
        app.start()
        app.set_serving()
        app.config = cfg  # type: ignore[attr-defined]  # the tests build clients from it
        apps.append(app)
        return app

    yield svc, start
    for app in apps:
        app.stop(0)


@contextmanager
def compress_client(app: ServiceApp) -> Iterator[CompressClient]:
    with CompressClient(f"127.0.0.1:{app.port}", token=TEST_TOKEN, timeout=120) as client:
        yield client


@pytest.fixture
def teacher(stack, train_dataset) -> str:
    svc, _ = stack
    with CheckpointClient(f"127.0.0.1:{svc.ckpt.app.port}", token=TEST_TOKEN) as client:
        from tokenmill.services.trainer.io_factory import make_checkpoint_io

        io = make_checkpoint_io({"kind": "store", "address": client.target, "token": TEST_TOKEN})
        return save_hf(io, "kd-teacher", hf_model(vocab=512), train_dataset / "tokenizer.json")


def test_distill_end_to_end_report_recorded_on_the_student(stack, teacher):
    svc, start = stack
    app = start()
    with compress_client(app) as client:
        job = client.submit("kd-teacher", "kd-student", "distill", eval_dataset="stories", eval_batches=1,
                            distill_temperature=1.0, distill_alpha=0.25, **DISTILL)  # fmt: skip
        assert job.spec["teacher"] == teacher, "the teacher is pinned to its version at submit"
        done = client.wait(job.id, timeout=400)
        assert done.state == common_pb2.JOB_STATE_SUCCEEDED, done.error
        events = list(client.watch_job(job.id, follow=False))
    result = struct_to_dict(done.result)
    report, student = result["report"], result["checkpoint"]
    assert report["source"] == teacher and report["output"] == student and report["method"] == "distill"
    ckpt = svc.ckpt.client
    version = ckpt.get(student, include_manifest=True)
    assert version.manifest.lineage.parent == teacher
    settings = struct_to_dict(version.manifest.config)["distillation"]
    assert report["settings"] == {**settings, "train_dataset": "stories"}
    assert settings["teacher"] == teacher and settings["student_preset"] == "test-1m"
    assert (settings["temperature"], settings["alpha"], settings["steps"]) == (1.0, 0.25, 4)
    teacher_tensors = ckpt.load(teacher)
    student_tensors = {
        k: v for k, v in ckpt.load(student).items() if not k.startswith(("optim.", "optimizer."))
    }
    assert report["bytes_before"] == tensor_bytes(teacher_tensors)
    assert report["bytes_after"] == tensor_bytes(student_tensors)
    assert report["ratio"] == pytest.approx(report["bytes_before"] / report["bytes_after"])
    for key in (
        "perplexity_before",
        "perplexity_after",
        "tokens_per_second_before",
        "tokens_per_second_after",
    ):
        assert math.isfinite(report[key]) and report[key] > 0, (key, report[key])
    assert report["eval_dataset"] == "stories" and report["compress_seconds"] > 0
    recorded = dict(version.recorded_metrics)
    assert recorded["compress/perplexity_after"] == pytest.approx(report["perplexity_after"])
    assert recorded["compress/bytes_before"] == report["bytes_before"]
    steps = [struct_to_dict(e.data) for e in events if e.kind == "progress"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4] and all("kl" in s and "loss" in s for s in steps)
    assert [j.idempotency_key for j in svc.client.iter_jobs()] == [f"distill-{job.id}"]


def test_cancel_reaches_the_trainer_job(stack, teacher):
    svc, start = stack
    app = start()
    with compress_client(app) as client:
        job = client.submit("kd-teacher", "kd-long", "distill", **{**DISTILL, "distill_steps": 100_000})
        deadline = time.monotonic() + 300
        while not client.get_job(job.id).progress.fields and time.monotonic() < deadline:
            time.sleep(0.5)  # the student is training: its steps come back as this job's progress
        client.cancel_job(job.id, "changed my mind")
        done = client.wait(job.id, timeout=120)
    assert done.state == common_pb2.JOB_STATE_CANCELLED
    (train_job,) = svc.client.iter_jobs()
    train_done = svc.client.wait(train_job.id, timeout=120)
    assert train_done.state == common_pb2.JOB_STATE_CANCELLED
    assert f"compress job {job.id} was cancelled" in train_done.error


class _KilledAfterSubmit(TrainerClient):
    """Stand-in for kill -9 of the compress worker right after it submitted the trainer job."""

    def get_job(self, job_id: str, **kwargs: Any) -> common_pb2.Job:
        raise RuntimeError("compress worker killed")


def test_a_retried_attempt_reattaches_to_its_trainer_job(stack, teacher, redis_client):
    svc, start = stack
    app = start(run_worker=False)
    cfg = app.config  # type: ignore[attr-defined]
    target = f"127.0.0.1:{svc.app.port}"
    queue = JobQueue.from_config(cfg, redis_client)

    def worker(trainer_client: type[TrainerClient]) -> JobWorker:
        handler = ModelJobs(
            lambda: CheckpointClient.from_config(cfg),
            lambda: trainer_client(target, token=TEST_TOKEN),
            str(cfg.data_dir),
        )
        return JobWorker(queue, JOB_TYPE, handler, heartbeat_seconds=1.0)

    with compress_client(app) as client:
        job = client.submit("kd-teacher", "kd-retried", "distill", **DISTILL)
        assert worker(_KilledAfterSubmit).run_once(block_seconds=5)
        assert client.get_job(job.id).state == common_pb2.JOB_STATE_PENDING  # queued for a retry
        assert worker(TrainerClient).run_once(block_seconds=15)
        done = client.get_job(job.id)
    assert done.state == common_pb2.JOB_STATE_SUCCEEDED, done.error
    assert done.attempts == 2
    (train_job,) = svc.client.iter_jobs()  # one trainer job for both attempts
    assert train_job.idempotency_key == f"distill-{job.id}"
    assert struct_to_dict(done.result)["checkpoint"] == struct_to_dict(train_job.result)["checkpoint"]


def test_bad_distill_requests_are_refused_before_anything_queues(
    stack, teacher, train_dataset, redis_client, tmp_path
):
    svc, start = stack
    app = start(run_worker=False)
    with CheckpointClient(f"127.0.0.1:{svc.ckpt.app.port}", token=TEST_TOKEN) as ckpt:
        from tokenmill.services.trainer.io_factory import make_checkpoint_io

        io = make_checkpoint_io({"kind": "store", "address": ckpt.target, "token": TEST_TOKEN})
        save_hf(io, "small-vocab", hf_model(vocab=256), train_dataset / "tokenizer.json")
    cases = [
        (errors.NotFound, "checkpoint 'ghost' not found", {"source": "ghost"}),
        (errors.NotFound, "train_dataset 'nope' not found", {"train_dataset": "nope"}),
        (errors.NotFound, "eval_dataset 'nope' not found", {"eval_dataset": "nope"}),
        (errors.FailedPrecondition, "train_dataset 'stories' was tokenized with a \\d+-token vocabulary but "
         "small-vocab:1 has vocab_size 256", {"source": "small-vocab"}),
        (errors.InvalidArgument, "student_preset 'gpt5' is unknown", {"student_preset": "gpt5"}),
        (errors.InvalidArgument, "needs distill_steps", {"distill_steps": 0}),
        (errors.InvalidArgument, "distill_steps=1000001 is above the limit", {"distill_steps": 1_000_001}),
        (errors.InvalidArgument, "needs train_dataset", {"train_dataset": ""}),
        (errors.InvalidArgument, "not a valid dataset name", {"train_dataset": "../x"}),
        (errors.InvalidArgument, "distill_temperature=0.0: give a temperature > 0", {"distill_temperature": 0.0}),
        (errors.InvalidArgument, "distill_temperature=nan", {"distill_temperature": float("nan")}),
        (errors.InvalidArgument, r"distill_alpha=1.5: give the hard-label weight in \[0, 1\]", {"distill_alpha": 1.5}),
        (errors.InvalidArgument, "keep_dense does not apply to method 'distill'", {"keep_dense": ["*"]}),
        (errors.InvalidArgument, "calibration_dataset does not apply", {"calibration_dataset": "stories"}),
        (errors.InvalidArgument, "eval_seq_len=128 is above 64", {"eval_dataset": "stories", "eval_seq_len": 128}),
    ]  # fmt: skip
    with compress_client(app) as client:
        for exc, message, changes in cases:
            fields = {"source": "kd-teacher", **DISTILL, **changes}
            with pytest.raises(exc, match=message):
                client.submit(fields.pop("source"), "kd-bad", "distill", **fields)
        with pytest.raises(errors.InvalidArgument, match="distill_alpha does not apply to method 'int8'"):
            client.submit("kd-teacher", "kd-bad", "int8", distill_alpha=0.5)
        with pytest.raises(errors.InvalidArgument, match="train_dataset does not apply to method 'int8'"):
            client.submit("kd-teacher", "kd-bad", "int8", train_dataset="stories")
    cli = CliRunner().invoke(
        compress,
        ["kd-teacher", "--method", "distill", "--student-preset", "test-1m", "--steps", "4", "--train", "stories",
         "--temperature", "0"],
        obj=SimpleNamespace(config=make_test_config(tmp_path, services={"compress": {"port": app.port}})),
    )  # fmt: skip
    assert (
        cli.exit_code == 1 and "INVALID_ARGUMENT: distill_temperature=0.0: give a temperature" in cli.output
    )
    dead = start(run_worker=False, trainer_port=free_port())
    unreachable = "the trainer service at 127.0.0.1:\\d+ is unreachable"
    with compress_client(dead) as client, pytest.raises(errors.Unavailable, match=unreachable):
        client.submit("kd-teacher", "kd-bad", "distill", **DISTILL)
    assert JobQueue.from_config(app.config, redis_client).list(JOB_TYPE)[0] == []  # type: ignore[attr-defined]
    assert not list(svc.client.iter_jobs())
