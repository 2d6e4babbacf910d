"""`tokenmill images build|push`: the build plan checked against the real Dockerfiles, and the one-line
failure when no Docker engine is reachable. No Docker engine is involved (none is assumed here)."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from tokenmill.common.cli.images import CPU_INDEX, CUDA_INDEX, SERVICES, build_plan, default_tag
from tokenmill.common.cli.main import cli
from tokenmill.common.config import SERVICE_NAMES

ROOT = Path(__file__).resolve().parents[1]
CHART_VALUES = ROOT / "helm" / "tokenmill" / "values.yaml"


def declared_args(dockerfile: Path) -> set[str]:
    return set(re.findall(r"^ARG (\w+)", dockerfile.read_text(), re.M))


def stages(dockerfile: Path) -> set[str]:
    return set(re.findall(r"^FROM \S+ AS (\w+)$", dockerfile.read_text(), re.M))


def test_plan_covers_every_service_with_its_dockerfile_args_and_chart_tag():
    assert sorted(SERVICES) == sorted(SERVICE_NAMES)
    plan = {item.service: item for item in build_plan(SERVICES, "ghcr.io/acme/", "1.2.3", gpu=False)}
    for service, item in plan.items():
        dockerfile = ROOT / item.dockerfile
        assert dockerfile.is_file(), item
        # every build arg is one the Dockerfile declares (an unknown one is silently ignored by Docker)
        assert set(item.buildargs) <= declared_args(dockerfile), item
        assert item.tag == f"ghcr.io/acme/tokenmill-{service}:1.2.3"
        assert item.buildargs["TORCH_INDEX_URL"] == CPU_INDEX  # no --gpu: CPU torch everywhere
        # one Dockerfile: SERVICE names the service's own final stage
        assert item.dockerfile == "services/Dockerfile"
        assert item.buildargs["SERVICE"] == service and service in stages(dockerfile)
    # the chart pulls <registry>/<namePrefix>-<service>:<tag>: the same names
    values = yaml.safe_load(CHART_VALUES.read_text())
    assert values["image"]["namePrefix"] == "tokenmill"


def test_gpu_plan_gives_cuda_torch_to_gpu_services_only():
    plan = {item.service: item for item in build_plan(SERVICES, "", "t", gpu=True)}
    assert {s for s, item in plan.items() if item.buildargs["TORCH_INDEX_URL"] == CUDA_INDEX} == {
        "trainer",
        "inference",
        "compress",
    }
    assert plan["ingest"].tag == "tokenmill-ingest:t"  # no registry: a local name


def test_build_dry_run_prints_the_plan_without_an_engine(monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    result = CliRunner().invoke(cli, ["images", "build", "--dry-run", "--gpu", "inference", "ingest"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines == [
        f"inference: docker build -f services/Dockerfile --build-arg SERVICE=inference --build-arg "
        f"TORCH_INDEX_URL={CUDA_INDEX} -t tokenmill-inference:{default_tag()} {ROOT}",
        f"ingest: docker build -f services/Dockerfile --build-arg SERVICE=ingest --build-arg "
        f"TORCH_INDEX_URL={CPU_INDEX} -t tokenmill-ingest:{default_tag()} {ROOT}",
    ]


def test_build_rejects_a_context_without_the_dockerfiles(tmp_path):
    result = CliRunner().invoke(cli, ["images", "build", "--dry-run", "--context", str(tmp_path)])
    assert result.exit_code != 0
    assert f"{tmp_path} is not a tokenmill source tree: no services/Dockerfile" in result.output


@pytest.fixture()
def dead_docker_host(tmp_path) -> str:
    """A unix socket path nothing listens on: connections to it are refused."""
    path = tmp_path / "docker.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))  # bound, never listening
    return f"unix://{path}"


@pytest.mark.slow  # spawns the CLI as a process, as a user runs it
@pytest.mark.parametrize("argv", [["build", "ingest"], ["push", "--registry", "r.example/x", "ingest"]])
def test_no_engine_is_one_clear_line_and_a_failure(dead_docker_host, argv):
    env = {"DOCKER_HOST": dead_docker_host, "PATH": "/usr/bin:/bin", "HOME": "/tmp"}
    out = subprocess.run(
        [sys.executable, "-m", "tokenmill.common.cli.main", "images", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 1 and out.stdout == ""
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("Error: no Docker engine reachable (") and "DOCKER_HOST" in line, line
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("argv", [["push"], ["build", "--push", "ingest"]])
def test_push_needs_a_registry(argv):
    result = CliRunner().invoke(cli, ["images", *argv])
    assert result.exit_code != 0 and "--registry is required" in result.output
