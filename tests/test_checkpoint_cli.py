"""`tokenmill ckpt ...` against a real service, plus the service on the S3 backend."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from tests.fixtures.checkpoint import TEST_TOKEN, tiny_state_dict
from tokenmill.common.checkpoint.chunks import chunk_key
from tokenmill.common.cli.main import cli


@pytest.fixture
def run_cli(ckpt, tmp_path):
    cfg = tmp_path / "cli.yaml"
    cfg.write_text(
        f"data_dir: {tmp_path}\nauth:\n  tokens: ['{TEST_TOKEN}']\n"
        f"services:\n  checkpoint:\n    port: {ckpt.app.port}\n"
    )

    def run(*args: str, code: int = 0) -> str:
        result = CliRunner().invoke(cli, ["--config", str(cfg), "ckpt", *args])
        assert result.exit_code == code, result.output
        return result.output

    return run


def test_cli_list_show_tag_verify_retention_gc(ckpt, run_cli, tmp_path):
    sd = tiny_state_dict()
    ckpt.client.save("demo", sd, config={"hidden_size": 64}, metrics={"loss": 1.5})
    key = "model.layers.0.mlp.up_proj.weight"
    changed = {**sd, key: sd[key] + 1}
    ckpt.client.save("demo", changed)
    out = run_cli("list")
    assert "demo:1" in out and "demo:2" in out and "latest" in out
    assert "stored" in out and "logical" in out and "dedup" in out
    data = json.loads(run_cli("list", "demo", "--json"))
    assert [r["ref"] for r in data["checkpoints"]] == ["demo:1", "demo:2"]
    assert data["stored_bytes"] < data["logical_bytes"]
    assert data["checkpoints"][1]["new_bytes"] == 32768  # only the changed tensor's chunk
    show = run_cli("show", "demo:1", "--tensors")
    assert '"loss": 1.5' in show and "model.embed_tokens.weight  F32[512, 64]" in show
    assert "demo:1 tagged 'best'" in run_cli("tag", "demo:1", "best")
    assert "removed" in run_cli("tag", "demo", "best", "--delete")
    assert "ok" in run_cli("verify")
    assert "would delete 1 version(s): demo:1" in run_cli(
        "retention", "demo", "--keep-last", "1", "--dry-run"
    )
    assert "deleted 1 version(s)" in run_cli("retention", "demo", "--keep-last", "1")
    assert "freed 32.0 KiB in 1 chunk(s)" in run_cli("gc")
    assert "stored" in run_cli("stats")


def test_cli_errors_are_one_line(ckpt, run_cli, tmp_path):
    out = run_cli("show", "../../etc/passwd", code=1)
    assert "INVALID_ARGUMENT" in out and "Traceback" not in out
    assert "NOT_FOUND" in run_cli("show", "nobody", code=1)
    ckpt.client.save("demo", {"w": torch.zeros(4)})
    with ckpt.client.lease("demo:1", holder="job-9"):
        assert "FAILED_PRECONDITION" in run_cli("delete", "demo:1", code=1)
    assert "deleted demo:1" in run_cli("delete", "demo:1")


def test_cli_verify_reports_corruption(ckpt, run_cli):
    ckpt.client.save("demo", {"w": torch.randn(100)})
    digest = ckpt.client.get("demo").manifest.tensors[0].chunks[0]
    path = ckpt.root / chunk_key(digest)
    path.write_bytes(b"\0" + path.read_bytes()[1:])
    out = run_cli("verify", code=1)
    assert "PROBLEM demo:1 tensor w chunk 0" in out and "1 problem(s)" in out


def test_cli_export_import(ckpt, run_cli, tmp_path):
    from tokenmill.common.model.transformer import ModelConfig, Transformer

    cfg = ModelConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1
    )
    ckpt.client.save("small", Transformer(cfg).state_dict(), config=cfg.to_dict())
    assert "exported small" in run_cli("export", "small", str(tmp_path / "hf"))
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    out = run_cli("import", str(tmp_path / "hf"), "small-copy", "--tag", "from-hf")
    assert "imported" in out and "small-copy:1" in out
    assert "from-hf" in ckpt.client.get("small-copy:1").tags


def test_service_on_s3_backend(start_checkpoint_service, s3_env):
    svc = start_checkpoint_service(f"s3://{s3_env.bucket}/service-test")
    sd = tiny_state_dict()
    v = svc.client.save("on-s3", sd, files={"tokenizer.json": b"{}"}, tags=["best"])
    assert v.ref == "on-s3:1"
    out = svc.client.load("on-s3:best")
    assert all(torch.equal(out[k], sd[k]) for k in sd)
    changed = {**sd, "step": torch.tensor(8)}
    assert svc.client.save("on-s3", changed).new_bytes == 8
    assert svc.client.verify().ok
    stats = svc.client.stats()
    assert stats.backend == f"s3://{s3_env.bucket}/service-test/" and stats.versions == 2
