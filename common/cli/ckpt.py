"""`tokenmill ckpt ...`: list, inspect, tag, delete, clean up, verify, export and import checkpoints."""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import click

from tokenmill.common import errors


def human_bytes(n: int | float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@contextlib.contextmanager
def _client(ctx: click.Context) -> Iterator[Any]:
    from tokenmill.common.clients.checkpoint import CheckpointClient

    config = ctx.obj.config if ctx.obj is not None and hasattr(ctx.obj, "config") else None
    if config is None:
        from tokenmill.common.config import load_config

        config = load_config()
    client = CheckpointClient.from_config(config)
    try:
        yield client
    finally:
        client.close()


def _errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Domain errors become one readable line (and exit status 1), never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except errors.TokenmillError as exc:
            raise click.ClickException(f"{exc.code}: {exc.message}") from None

    return wrapper


@click.group("ckpt")
def ckpt() -> None:
    """Checkpoint store: versioned, content-addressed model artifacts."""


@ckpt.command("list")
@click.argument("name", required=False, default="")
@click.option(
    "--metric",
    "metrics",
    multiple=True,
    help="Add a column of this recorded metric, e.g. eval/python/python_next_line/acc (repeatable).",
)
@click.option("--sort-metric", default="", help="Sort by this recorded metric (highest first; missing last).")
@click.option("--ascending", is_flag=True, help="With --sort-metric: lowest first (perplexity, loss).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@_errors
def list_cmd(
    ctx: click.Context, name: str, metrics: tuple[str, ...], sort_metric: str, ascending: bool, as_json: bool
) -> None:
    """List checkpoints (all models, or the versions of NAME) with stored vs logical bytes, and the
    recorded metrics (`tokenmill eval` results) asked for."""
    with _client(ctx) as client:
        versions = client.list(name)
        stats = client.stats()
    rows = [
        {
            "ref": v.ref,
            "tags": list(v.tags),
            "created": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(v.created_at.seconds)),
            "logical_bytes": v.logical_bytes,
            "new_bytes": v.new_bytes,
            "metrics": {m: v.recorded_metrics[m] for m in metrics if m in v.recorded_metrics},
            "_sort": v.recorded_metrics.get(sort_metric),
        }
        for v in versions
    ]
    if sort_metric:
        present = sorted((r for r in rows if r["_sort"] is not None), key=lambda r: r["_sort"])
        rows = (present if ascending else present[::-1]) + [r for r in rows if r["_sort"] is None]
    for r in rows:
        del r["_sort"]
    if as_json:
        click.echo(
            json.dumps(
                {
                    "checkpoints": rows,
                    "stored_bytes": stats.stored_bytes,
                    "logical_bytes": stats.logical_bytes,
                },
                indent=2,
            )
        )
        return
    if not rows:
        click.echo("no checkpoints" + (f" named {name!r}" if name else ""))
    else:
        _print_rows(rows, metrics)
    ratio = stats.logical_bytes / stats.stored_bytes if stats.stored_bytes else 0.0
    click.echo(
        f"store {stats.backend}: {stats.versions} version(s) of {stats.models} model(s); "
        f"stored {human_bytes(stats.stored_bytes)} for {human_bytes(stats.logical_bytes)} logical"
        + (f" (dedup {ratio:.2f}x)" if ratio else "")
    )


def _print_rows(rows: list[dict[str, Any]], metrics: tuple[str, ...]) -> None:
    """The listing as a table: one column per asked metric ('-' where a version has none)."""
    width = max(len(r["ref"]) for r in rows)
    widths = [max(len(m), 10) for m in metrics]
    heads = "".join(f"  {m:>{w}}" for m, w in zip(metrics, widths, strict=True))
    click.echo(f"{'REF':<{width}}  {'CREATED (UTC)':<19}  {'LOGICAL':>10}  {'NEW STORED':>10}{heads}  TAGS")
    for r in rows:
        values = [f"{r['metrics'][m]:.4g}" if m in r["metrics"] else "-" for m in metrics]
        cells = "".join(f"  {value:>{w}}" for value, w in zip(values, widths, strict=True))
        click.echo(
            f"{r['ref']:<{width}}  {r['created']:<19}  {human_bytes(r['logical_bytes']):>10}  "
            f"{human_bytes(r['new_bytes']):>10}{cells}  {','.join(r['tags'])}"
        )


@ckpt.command("show")
@click.argument("ref")
@click.option("--tensors/--no-tensors", default=False, help="List every tensor.")
@click.pass_context
@_errors
def show_cmd(ctx: click.Context, ref: str, tensors: bool) -> None:
    """Describe one checkpoint (REF: name, name:version or name:tag)."""
    from tokenmill.common.runtime.proto_struct import struct_to_dict

    with _client(ctx) as client:
        v = client.get(ref, include_manifest=True)
    m = v.manifest
    click.echo(f"{v.ref}  tags: {', '.join(v.tags) or '-'}")
    click.echo(f"  logical {human_bytes(v.logical_bytes)}, new stored {human_bytes(v.new_bytes)}")
    click.echo(f"  {len(m.tensors)} tensor(s), files: {', '.join(f.name for f in m.files) or '-'}")
    lineage = {k: getattr(m.lineage, k) for k in ("parent", "dataset", "job_id") if getattr(m.lineage, k)}
    for label, value in (
        ("config", struct_to_dict(m.config)),
        ("metrics", struct_to_dict(m.metrics)),
        ("lineage", lineage),
        ("labels", dict(m.labels)),
    ):
        if value:
            click.echo(f"  {label}: {json.dumps(value, sort_keys=True)}")
    if v.recorded_metrics:
        click.echo("  recorded metrics:")
        for key in sorted(v.recorded_metrics):
            click.echo(f"    {key}  {v.recorded_metrics[key]:.6g}")
    _show_compression(ctx, v)
    if tensors:
        for t in m.tensors:
            shard = f"  shard of {t.shard.logical_name}" if t.shard.logical_name else ""
            click.echo(f"    {t.name}  {t.dtype}{list(t.shape)}  {human_bytes(t.nbytes)}{shard}")


IMPORT_PREFIX = "hf:"  # import_hf records the source folder as the parent "hf:<folder name>"


def lineage_chain(client: Any, version: Any, limit: int = 16) -> list[str]:
    """`version`'s ref and its ancestors' (at most `limit`). Where the chain leaves the store it
    says how: an HF import's source folder "(imported)", a parent no longer stored "(deleted)", and
    a parent that is no store reference at all "(not in the store)"."""
    chain, parent = [version.ref], version.manifest.lineage.parent
    while parent and len(chain) < limit:
        try:
            step = client.get(parent, include_manifest=True)
        except (errors.NotFound, errors.InvalidArgument) as exc:
            if parent.startswith(IMPORT_PREFIX):
                chain.append(f"{parent} (imported)")
            else:
                chain.append(
                    f"{parent} ({'deleted' if isinstance(exc, errors.NotFound) else 'not in the store'})"
                )
            break
        chain.append(parent)
        parent = step.manifest.lineage.parent
    return chain


def _show_compression(ctx: click.Context, version) -> None:
    """Lineage back to the first dense ancestor, and the compression report stored with the version."""
    from tokenmill.common.cli.compress import report_lines

    if "compression_report.json" not in {f.name for f in version.manifest.files}:
        return
    with _client(ctx) as client:
        chain = lineage_chain(client, version)
        report = json.loads(
            client.load_files(version.ref, ["compression_report.json"])["compression_report.json"]
        )
    click.echo(f"  lineage: {' <- '.join(chain)}")
    click.echo(f"  compression report ({report['method']} of {report['source']}):")
    for line in report_lines(report):
        click.echo(f"    {line}")


@ckpt.command("tag")
@click.argument("ref")
@click.argument("tag")
@click.option("--delete", "delete", is_flag=True, help="Remove TAG from model REF instead.")
@click.pass_context
@_errors
def tag_cmd(ctx: click.Context, ref: str, tag: str, delete: bool) -> None:
    """Point TAG at REF (or remove it with --delete; REF is then the model name)."""
    with _client(ctx) as client:
        if delete:
            deleted = client.delete_tag(ref.split(":")[0], tag)
            click.echo(f"tag {tag!r} {'removed' if deleted else 'was not set'}")
        else:
            v = client.set_tag(ref, tag)
            click.echo(f"{v.ref} tagged {tag!r}")


@ckpt.command("delete")
@click.argument("ref")
@click.option("--force", is_flag=True, help="Delete even while a job holds a read lease on it.")
@click.pass_context
@_errors
def delete_cmd(ctx: click.Context, ref: str, force: bool) -> None:
    """Delete one version (name:version or name:tag). Run `ckpt gc` to free its unshared chunks."""
    with _client(ctx) as client:
        client.delete(ref, force=force)
    click.echo(f"deleted {ref}")


@ckpt.command("retention")
@click.argument("name")
@click.option("--keep-last", type=click.IntRange(min=1), required=True, help="Versions to keep (newest).")
@click.option("--keep-tagged/--no-keep-tagged", default=True, help="Also keep tagged versions.")
@click.option("--dry-run", is_flag=True)
@click.pass_context
@_errors
def retention_cmd(ctx: click.Context, name: str, keep_last: int, keep_tagged: bool, dry_run: bool) -> None:
    """Delete old versions of NAME (versions in use are kept)."""
    with _client(ctx) as client:
        deleted = client.retention(name, keep_last, keep_tagged=keep_tagged, dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"{verb} {len(deleted)} version(s)" + (f": {', '.join(deleted)}" if deleted else ""))


@ckpt.command("gc")
@click.option("--dry-run", is_flag=True)
@click.pass_context
@_errors
def gc_cmd(ctx: click.Context, dry_run: bool) -> None:
    """Delete chunks that no version and no live upload references."""
    with _client(ctx) as client:
        r = client.gc(dry_run=dry_run)
    verb = "would free" if dry_run else "freed"
    click.echo(f"{verb} {human_bytes(r.bytes_freed)} in {r.chunks_deleted} chunk(s)")


@ckpt.command("verify")
@click.argument("ref", required=False, default="")
@click.pass_context
@_errors
def verify_cmd(ctx: click.Context, ref: str) -> None:
    """Re-hash every chunk of REF (default: the whole store); exit status 1 on any problem."""
    with _client(ctx) as client:
        r = client.verify(ref)
    for problem in r.problems:
        click.echo(f"PROBLEM {problem}")
    click.echo(f"checked {r.chunks_checked} chunk(s): {'ok' if r.ok else f'{len(r.problems)} problem(s)'}")
    if not r.ok:
        ctx.exit(1)


@ckpt.command("export")
@click.argument("ref")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.pass_context
@_errors
def export_cmd(ctx: click.Context, ref: str, out_dir: str) -> None:
    """Write REF as a Hugging Face directory (config.json, model.safetensors, tokenizer.json)."""
    with _client(ctx) as client:
        path = client.export_hf(ref, out_dir)
    click.echo(f"exported {ref} to {path}")


@ckpt.command("import")
@click.argument("in_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("name")
@click.option("--tag", "tags", multiple=True, help="Tag(s) for the new version.")
@click.pass_context
@_errors
def import_cmd(ctx: click.Context, in_dir: str, name: str, tags: tuple[str, ...]) -> None:
    """Store a Hugging Face model directory (safetensors only) as a new version of NAME."""
    with _client(ctx) as client:
        v = client.import_hf(in_dir, name, tags=tags)
    click.echo(
        f"imported {in_dir} as {v.ref} ({human_bytes(v.logical_bytes)}, new {human_bytes(v.new_bytes)})"
    )


@ckpt.command("stats")
@click.pass_context
@_errors
def stats_cmd(ctx: click.Context) -> None:
    """Store totals: models, versions, chunks, stored vs logical bytes."""
    with _client(ctx) as client:
        s = client.stats()
    click.echo(
        f"backend {s.backend}\nmodels {s.models}  versions {s.versions}  chunks {s.chunks}\n"
        f"stored {human_bytes(s.stored_bytes)}  logical {human_bytes(s.logical_bytes)}"
    )
