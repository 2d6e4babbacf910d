"""`tokenmill train`: submits through the real service, follows WatchJob, writes the loss-curve PNG."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from tokenmill.common.cli.train import train
from tokenmill.v1 import common_pb2

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # the CLI driving real training


def test_train_command_shows_progress_and_writes_png(trainer_service, tmp_path):
    png = tmp_path / "curve.png"
    args = ["--output", "cli-model", "--dataset", "stories", "--workers", "2", "--steps", "6", "--batch", "4"]
    args += ["--seq-len", "32", "--lr", "3e-3", "--warmup", "1", "--eval-every", "3", "--plot", str(png)]
    result = CliRunner().invoke(train, args, obj=trainer_service.cli_obj(tmp_path), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "queued" in result.output and "SUCCEEDED: checkpoint cli-model:" in result.output
    # not a terminal here: one line per progress event (a live bar on a TTY)
    assert "step 3/6 loss" in result.output and "step 6/6 loss" in result.output and " val " in result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_train_command_reports_bad_input(trainer_service, tmp_path):
    result = CliRunner().invoke(
        train, ["--output", "x", "--dataset", "missing"], obj=trainer_service.cli_obj(tmp_path)
    )
    assert result.exit_code == 1
    assert "NOT_FOUND: dataset 'missing' not found" in result.output
    result = CliRunner().invoke(
        train,
        ["--output", "x", "--dataset", "stories", "--set", "num_heads=5"],
        obj=trainer_service.cli_obj(tmp_path),
    )
    assert result.exit_code == 1 and "INVALID_ARGUMENT" in result.output
    result = CliRunner().invoke(
        train, ["--output", "x", "--set", "oops"], obj=trainer_service.cli_obj(tmp_path)
    )
    assert result.exit_code == 2 and "KEY=VALUE" in result.output


def test_train_resume_continues_a_run_on_another_worker_count(trainer_service, tmp_path):
    svc = trainer_service
    job = svc.client.submit(
        "cli-resume", dataset="stories", workers=2, steps=3, micro_batch_size=4, seq_len=32
    )
    assert svc.client.wait(job.id, timeout=300).state == common_pb2.JOB_STATE_SUCCEEDED
    args = ["--resume", job.id, "--workers", "1", "--steps", "5", "--plot", str(tmp_path / "c.png")]
    result = CliRunner().invoke(train, args, obj=svc.cli_obj(tmp_path), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "step 5/5 loss" in result.output and "SUCCEEDED: checkpoint cli-resume:" in result.output
    resumed = svc.queue.get(result.output.split()[1])
    # the global batch (2 workers x 4 sequences) is kept: 2 micro-batches of 4 on the one worker
    assert (resumed.spec["workers"], resumed.spec["micro_batch_size"], resumed.spec["grad_accum_steps"]) == (
        1,
        4,
        2,
    )
    result = CliRunner().invoke(train, ["--dataset", "stories"], obj=svc.cli_obj(tmp_path))
    assert result.exit_code == 2 and "--output is required (unless --resume" in result.output
    result = CliRunner().invoke(train, ["--resume", "nope", "--workers", "2"], obj=svc.cli_obj(tmp_path))
    assert result.exit_code == 1 and "NOT_FOUND: resume 'nope': no train job or checkpoint" in result.output
