"""`tokenmill data ...`: ingest corpora into packed token datasets, list, show and delete them."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import click
from google.protobuf.json_format import MessageToDict

from tokenmill.common import errors
from tokenmill.v1 import common_pb2


def _client(obj):
    from tokenmill.common.clients.ingest import IngestClient

    return IngestClient.from_config(obj.config)


def _fail(exc: errors.TokenmillError) -> click.ClickException:
    return click.ClickException(f"{exc.code}: {exc.message}")


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f}"


def _reasons(reasons: dict[str, Any], limit: int = 4) -> str:
    items = sorted(((k, int(v)) for k, v in reasons.items() if int(v)), key=lambda kv: -kv[1])
    shown = ", ".join(f"{k}={v:,}" for k, v in items[:limit])
    return shown + (f", +{len(items) - limit} more" if len(items) > limit else "")


def stage_table(stages: list[dict[str, Any]]) -> str:
    """The per-stage report: documents and bytes in/out, kept fraction, and why documents went."""
    header = f"{'stage':<18} {'docs in':>10} {'docs out':>10} {'kept':>7} {'MB in':>9} {'MB out':>9}  reasons"
    lines = [header, "-" * len(header)]
    for s in stages:
        din, dout = int(s.get("docs_in", 0)), int(s.get("docs_out", 0))
        kept = f"{100 * dout / din:.1f}%" if din else "-"
        lines.append(
            f"{s.get('stage', ''):<18} {din:>10,} {dout:>10,} {kept:>7} {_mb(float(s.get('bytes_in', 0))):>9} "
            f"{_mb(float(s.get('bytes_out', 0))):>9}  {_reasons(s.get('reasons', {}))}"
        )
    return "\n".join(lines)


def _status_line(data: dict[str, Any]) -> str:
    phase = data.get("phase", "")
    if phase == "filter":
        kept = data.get("kept", {})
        worst = sorted(kept.items(), key=lambda kv: kv[1])[:3]
        kept_s = " ".join(f"{k}={100 * v:.0f}%" for k, v in worst)
        return (
            f"[filter] {int(data.get('docs', 0)):,} docs  {data.get('docs_per_s', 0):,.0f} docs/s  "
            f"{float(data.get('bytes_per_s', 0)) / 1e6:,.2f} MB/s  kept {int(data.get('kept_docs', 0)):,}  {kept_s}"
        )
    if phase == "pack":
        return f"[pack] {int(data.get('docs', 0)):,}/{int(data.get('of', 0)):,} docs  {int(data.get('tokens', 0)):,} tokens"
    if phase == "near_dedup":
        return f"[near-dedup] removed {int(data.get('removed', 0)):,}, kept {int(data.get('kept_docs', 0)):,}"
    if phase == "tokenizer":
        return f"[tokenizer] training BPE on {int(data.get('docs', 0)):,} docs"
    return f"[{phase}]"


def follow(client, job_id: str) -> common_pb2.Job:
    """Live progress on a terminal (one rewritten line), one line per event otherwise."""
    live = sys.stdout.isatty()
    last_plain = 0.0
    width = 0
    for event in client.watch_job(job_id, follow=True):
        if event.kind == "progress":
            line = _status_line(MessageToDict(event.data))
            if live:
                width = max(width, len(line))
                click.echo("\r" + line.ljust(width), nl=False)
            elif time.monotonic() - last_plain > 2.0 or MessageToDict(event.data).get("phase") != "filter":
                click.echo(line)
                last_plain = time.monotonic()
        elif event.kind == "log":
            click.echo(("\n" if live else "") + event.message, err=True)
    if live:
        click.echo()
    return client.get_job(job_id)


def _parse_set(values: tuple[str, ...], disabled: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        name, dot, param = key.partition(".")
        if not sep or not dot or not name or not param:
            raise click.BadParameter(
                f"{item!r}: use FILTER.PARAM=VALUE, e.g. gopher_quality.min_doc_words=20", param_hint="--set"
            )
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        entry = out.setdefault(name, {})
        if entry is False:
            raise click.BadParameter(f"filter {name!r} is both disabled and configured", param_hint="--set")
        entry[param] = value
    for name in disabled:
        out[name] = False
    return out


@click.group("data")
def data() -> None:
    """Ingest corpora into packed token datasets; list, show and delete datasets."""


@data.command("ingest")
@click.argument("sources", nargs=-1, required=True)
@click.option("--name", required=True, help="Dataset name.")
@click.option("--preset", type=click.Choice(["web", "code"]), default="web", show_default=True)
@click.option("--text-field", default="text", show_default=True, help="JSONL/Parquet field holding the text.")
@click.option(
    "--include", "include_globs", multiple=True, help="Glob of files to read in trees (repeatable)."
)
@click.option(
    "--exclude", "exclude_globs", multiple=True, help="Glob of files to skip in trees (repeatable)."
)
@click.option("--vocab-size", default=8192, show_default=True, type=click.IntRange(264))
@click.option("--tokenizer", default="", help="Reuse a tokenizer: a tokenizer.json path or 'dataset:NAME'.")
@click.option("--val-fraction", default=0.01, show_default=True, type=click.FloatRange(0, 1, max_open=True))
@click.option("--seed", default=0, type=click.IntRange(0))
@click.option(
    "--set", "overrides", multiple=True, metavar="FILTER.PARAM=VALUE", help="Filter parameter (repeatable)."
)
@click.option(
    "--disable-filter", "disabled", multiple=True, metavar="FILTER", help="Switch a filter off (repeatable)."
)
@click.option("--skip-near-dedup", is_flag=True, help="Exact dedup only.")
@click.option(
    "--near-dup-threshold", default=0.8, show_default=True, type=click.FloatRange(0, 1, min_open=True)
)
@click.option(
    "--workers", "num_workers", default=0, type=click.IntRange(0), help="Worker processes (0: all cores)."
)
@click.option(
    "--language-threshold", default=0.0, type=click.FloatRange(0, 1), help="web: min language score."
)
@click.option("--max-documents", default=0, type=click.IntRange(0), help="Stop after N documents (0: all).")
@click.option("--minhash-bands", type=click.IntRange(1), help="Near-dedup LSH bands (default 20).")
@click.option("--minhash-rows", type=click.IntRange(1), help="Rows per band (default 13).")
@click.option(
    "--shingle-size",
    "minhash_ngram",
    type=click.IntRange(1),
    help="MinHash shingle size in words (default 5).",
)
@click.option(
    "--hash-family",
    "minhash_hash_family",
    type=click.Choice(["crc-ms", "datatrove-sha1"]),
    help="MinHash hashing; datatrove-sha1 gives datatrove's signatures bit for bit (default crc-ms).",
)
@click.option(
    "--word-split",
    "minhash_word_split",
    type=click.Choice(["whitespace", "spacy-like"]),
    help="Words for shingles; spacy-like approximates datatrove's spaCy split (default whitespace).",
)
@click.option(
    "--dedup-backend", type=click.Choice(["local", "ray"]), help="Where near-dedup runs (default local)."
)
@click.option("--no-pii", "skip_pii", is_flag=True, default=None, help="Keep PII (default: scrub it).")
@click.option("--batch-size", type=click.IntRange(1), help="Documents per worker batch (default 256).")
@click.option("--max-doc-bytes", type=click.IntRange(1), help="Skip larger documents (default 32 MiB).")
@click.option("--max-tokens-per-shard", type=click.IntRange(1), help="Tokens per shard (default 128 Mi).")
@click.option("--detach", is_flag=True, help="Print the job id and return without following it.")
@click.pass_obj
def ingest(obj, sources: tuple[str, ...], name: str, overrides: tuple[str, ...], disabled: tuple[str, ...],
           include_globs: tuple[str, ...], exclude_globs: tuple[str, ...], detach: bool, **fields: Any) -> None:  # fmt: skip
    """Ingest SOURCES (files, directories or s3:// URLs) into dataset --name."""
    resolved = [s if "://" in s else os.path.abspath(s) for s in sources]
    filter_overrides = _parse_set(overrides, disabled)
    fields = {k: v for k, v in fields.items() if v is not None}  # unset engine options: its defaults
    try:
        with _client(obj) as client:
            job = client.submit(
                name,
                resolved,
                filter_overrides=filter_overrides,
                include_globs=list(include_globs),
                exclude_globs=list(exclude_globs),
                **fields,
            )
            click.echo(
                f"job {job.id} queued: ingest {', '.join(resolved)} -> dataset {name!r} ({fields['preset']})"
            )
            if detach:
                return
            job = follow(client, job.id)
    except errors.TokenmillError as exc:
        raise _fail(exc) from None
    state = common_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_")
    if job.state != common_pb2.JOB_STATE_SUCCEEDED:
        raise click.ClickException(f"job {job.id} {state}: {job.error}")
    r = MessageToDict(job.result)
    click.echo(stage_table(r.get("stages", [])))
    click.echo(
        f"dataset {name!r}: {int(r.get('documents', 0)):,} documents, {int(r.get('train_tokens', 0)):,} train + "
        f"{int(r.get('val_tokens', 0)):,} val tokens, vocab {int(r.get('vocab_size', 0)):,}, "
        f"{float(r.get('seconds', 0)):.1f} s  ({r.get('uri', '')})"
    )


@data.command("list")
@click.pass_obj
def list_(obj) -> None:
    """List datasets."""
    try:
        with _client(obj) as client:
            datasets = list(client.iter_datasets())
    except errors.TokenmillError as exc:
        raise _fail(exc) from None
    if not datasets:
        click.echo("no datasets; create one with 'tokenmill data ingest SOURCE --name NAME'")
        return
    click.echo(
        f"{'name':<24} {'documents':>10} {'train tokens':>14} {'val tokens':>11} {'vocab':>7}  {'created (UTC)'}"
    )
    for d in datasets:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(d.created_at.seconds))
        click.echo(
            f"{d.name:<24} {d.documents:>10,} {d.train_tokens:>14,} {d.val_tokens:>11,} {d.vocab_size:>7,}  {created}"
        )


@data.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
@click.pass_obj
def show(obj, name: str, as_json: bool) -> None:
    """Describe dataset NAME and print its per-stage table."""
    try:
        with _client(obj) as client:
            d = client.get_dataset(name)
    except errors.TokenmillError as exc:
        raise _fail(exc) from None
    manifest = MessageToDict(d.manifest)
    if as_json:
        click.echo(json.dumps(manifest, indent=2, sort_keys=True))
        return
    click.echo(f"dataset {d.name}  ({d.uri})")
    click.echo(
        f"  {d.documents:,} documents; {d.train_tokens:,} train + {d.val_tokens:,} val tokens; "
        f"vocab {d.vocab_size:,} ({d.token_dtype}); job {d.job_id or '-'}"
    )
    dedup = manifest.get("dedup", {})
    if dedup.get("enabled"):
        click.echo(
            f"  near-dedup: {dedup.get('shingles')}, {int(dedup.get('bands', 0))} bands x {int(dedup.get('rows', 0))} rows, "
            f"P(candidate | J=0.8) = {dedup.get('candidate_probability', {}).get('0.8')}"
        )
    click.echo(stage_table([MessageToDict(s, always_print_fields_with_no_presence=True) for s in d.stages]))


@data.command("delete")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def delete(obj, name: str, yes: bool) -> None:
    """Delete dataset NAME."""
    if not yes:
        click.confirm(f"delete dataset {name!r}?", abort=True)
    try:
        with _client(obj) as client:
            client.delete_dataset(name)
    except errors.TokenmillError as exc:
        raise _fail(exc) from None
    click.echo(f"deleted dataset {name!r}")
