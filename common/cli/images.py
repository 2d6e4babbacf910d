"""`tokenmill images build|push`: the service images from this repository's Dockerfile (Docker SDK).

One plan drives both verbs: the build args and tag each service's image gets from services/Dockerfile
(one file for every service: SERVICE picks its final stage). The tags
are the Helm chart's (`<registry>/tokenmill-<service>:<tag>`, the router runs the inference image), so a
build + push is what `helm install --set image.registry=... --set image.tag=...` pulls. Without `--gpu`
every image gets PyTorch's CPU wheel; with it, trainer, inference and compress get its CUDA wheel (the
same torch version either way: the Dockerfile's TORCH_VERSION).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("ingest", "checkpoint", "compress", "trainer", "inference")
DOCKERFILE = "services/Dockerfile"  # every service's image: --build-arg SERVICE=<service>
GPU_CAPABLE = frozenset({"trainer", "inference", "compress"})
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CUDA_INDEX = "https://download.pytorch.org/whl/cu128"


REGISTRY_REQUIRED = "--registry is required to push (e.g. ghcr.io/acme); a bare name would go to Docker Hub"


@dataclass(frozen=True)
class ImageBuild:
    """One `docker build` of one service image."""

    service: str
    dockerfile: str  # relative to the build context (the repository root)
    buildargs: dict[str, str] = field(default_factory=dict)
    tag: str = ""


def default_tag() -> str:
    """The installed tokenmill version: the chart's appVersion, so default tags match."""
    try:
        return importlib.metadata.version("tokenmill")
    except importlib.metadata.PackageNotFoundError:
        return "latest"


def image_ref(service: str, registry: str, tag: str) -> str:
    """`<registry>/tokenmill-<service>:<tag>` (no registry: a local name), as the chart's image helper."""
    name = f"tokenmill-{service}:{tag}"
    return f"{registry.rstrip('/')}/{name}" if registry else name


def build_plan(services: Iterable[str], registry: str, tag: str, gpu: bool) -> list[ImageBuild]:
    """The build args and tag of each service's image (one Dockerfile; SERVICE selects the image)."""
    plan = []
    for service in services:
        index = CUDA_INDEX if gpu and service in GPU_CAPABLE else CPU_INDEX
        args = {"SERVICE": service, "TORCH_INDEX_URL": index}
        plan.append(ImageBuild(service, DOCKERFILE, args, image_ref(service, registry, tag)))
    return plan


def docker_client() -> Any:
    """A Docker SDK client for the engine of DOCKER_HOST (or the default socket); one clear line if none."""
    import docker

    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise click.ClickException(
            f"no Docker engine reachable ({reason}); start Docker or point DOCKER_HOST at one"
        ) from None
    return client


def _stream_errors(chunks: Iterable[dict[str, Any]]) -> Iterator[str]:
    """Error messages in a decoded build/push progress stream (the engine reports failures in-band)."""
    for chunk in chunks:
        if "error" in chunk:
            yield str(chunk.get("errorDetail", {}).get("message") or chunk["error"]).strip()


def run_build(client: Any, item: ImageBuild, context: Path) -> None:
    """Build one image; a failed step (reported in the stream or as an API error) is one clear line."""
    import docker

    try:
        stream = client.api.build(
            path=str(context),
            dockerfile=item.dockerfile,
            buildargs=item.buildargs,
            tag=item.tag,
            rm=True,
            decode=True,
        )
        error = next(_stream_errors(stream), None)
    except docker.errors.APIError as exc:
        error = exc.explanation or str(exc)
    if error:
        raise click.ClickException(f"building {item.tag} from {item.dockerfile} failed: {error}")


def run_push(client: Any, ref: str) -> None:
    """Push one image (credentials: `docker login`, which the engine's config holds)."""
    import docker

    repository, _, tag = ref.rpartition(":")
    try:
        error = next(_stream_errors(client.api.push(repository, tag=tag, stream=True, decode=True)), None)
    except docker.errors.APIError as exc:
        error = exc.explanation or str(exc)
    if error:
        raise click.ClickException(f"pushing {ref} failed: {error}")


def _selected(services: tuple[str, ...]) -> tuple[str, ...]:
    return services or SERVICES


service_argument = click.argument("services", nargs=-1, type=click.Choice(SERVICES))
registry_option = click.option("--registry", default="", help="Registry/path prefix, e.g. ghcr.io/acme.")
tag_option = click.option("--tag", default=None, help="Image tag [default: the tokenmill version].")


@click.group("images")
def images() -> None:
    """Build and push the service images (the Helm chart's image names)."""


@images.command("build")
@service_argument
@registry_option
@tag_option
@click.option("--gpu", is_flag=True, help="CUDA torch in trainer, inference and compress.")
@click.option(
    "--context",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=REPO_ROOT,
    show_default="the repository",
    help="Build context: a tokenmill source tree.",
)
@click.option("--push", "push_after", is_flag=True, help="Push each image after building it.")
@click.option("--dry-run", is_flag=True, help="Print the plan; needs no Docker engine.")
def build_cmd(
    services: tuple[str, ...],
    registry: str,
    tag: str | None,
    gpu: bool,
    context: Path,
    push_after: bool,
    dry_run: bool,
) -> None:
    """Build SERVICES (default: all) from the repository's Dockerfile."""
    if push_after and not registry:
        raise click.ClickException(REGISTRY_REQUIRED)
    plan = build_plan(_selected(services), registry, tag or default_tag(), gpu)
    missing = [item.dockerfile for item in plan if not (context / item.dockerfile).is_file()]
    if missing:
        raise click.ClickException(f"{context} is not a tokenmill source tree: no {missing[0]}")
    if dry_run:
        for item in plan:
            args = " ".join(f"--build-arg {k}={v}" for k, v in item.buildargs.items())
            click.echo(f"{item.service}: docker build -f {item.dockerfile} {args} -t {item.tag} {context}")
        return
    client = docker_client()
    for item in plan:
        run_build(client, item, context)
        click.echo(f"built {item.tag}")
        if push_after:
            run_push(client, item.tag)
            click.echo(f"pushed {item.tag}")


@images.command("push")
@service_argument
@registry_option
@tag_option
def push_cmd(services: tuple[str, ...], registry: str, tag: str | None) -> None:
    """Push the built images of SERVICES (default: all) to --registry."""
    if not registry:
        raise click.ClickException(REGISTRY_REQUIRED)
    client = docker_client()
    for service in _selected(services):
        ref = image_ref(service, registry, tag or default_tag())
        run_push(client, ref)
        click.echo(f"pushed {ref}")
