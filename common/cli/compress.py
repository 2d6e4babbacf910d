"""`tokenmill compress MODEL[:VERSION|TAG] --method ...`: queue a compress job, follow its layer by
layer progress, print the report as a table. `report_lines` also renders the report `ckpt show` finds."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click
from google.protobuf.json_format import MessageToDict

from tokenmill.common import errors
from tokenmill.v1 import common_pb2

METHODS = (
    "int8", "int4_rtn", "int4_gptq", "int4_awq", "prune_magnitude", "prune_wanda", "prune_sparsegpt",
    "prune_2_4", "svd", "distill",
)  # fmt: skip


def _fmt(value: Any, unit: str = "") -> str:
    if isinstance(value, float):
        return f"{value:,.4g}{unit}"
    return f"{value:,}{unit}" if isinstance(value, int) else str(value)


def report_lines(report: dict[str, Any]) -> list[str]:
    """The report as aligned before/after rows, then the worst per-layer errors."""
    rows = [("bytes", int(report["bytes_before"]), int(report["bytes_after"]))]
    if report.get("eval_dataset"):
        rows.append(
            (
                f"perplexity ({report['eval_dataset']})",
                report["perplexity_before"],
                report["perplexity_after"],
            )
        )
    rows.append(("decode tok/s", report["tokens_per_second_before"], report["tokens_per_second_after"]))
    lines = [f"{'':24}{'before':>14}{'after':>14}"]
    lines += [f"{name:24}{_fmt(b):>14}{_fmt(a):>14}" for name, b, a in rows]
    lines.append(f"{'ratio':24}{_fmt(float(report['ratio']), 'x'):>28}")
    if report.get("sparsity"):
        lines.append(f"{'sparsity':24}{_fmt(float(report['sparsity'])):>28}")
    lines.append(f"{'compress / wall time':24}{_fmt(float(report['compress_seconds']), 's'):>14}"
                 f"{_fmt(float(report.get('wall_seconds', 0.0)), 's'):>14}")  # fmt: skip
    worst = sorted(report.get("per_layer_errors", []), key=lambda e: -float(e["error"]))[:5]
    if worst:
        lines.append("largest per-layer errors:")
        lines += [f"  {e['layer']:40} {e['method']:16} {float(e['error']):.4g}" for e in worst]
    notes = report.get("notes", [])
    if notes:
        lines.append("notes:")
        lines += [f"  {note}" for note in notes]
    return lines


def follow_job(client, job_id: str) -> common_pb2.Job:
    """Print a job's progress and log events until it ends; the final Job."""
    for event in client.watch_job(job_id, follow=True):  # the server ends it at the terminal event
        if event.kind in ("progress", "log"):
            click.echo(event.message)
    return client.get_job(job_id)


def run_job(config: Any, submit: Callable[[Any], common_pb2.Job], what: str, detach: bool) -> dict | None:
    """Queue a compress-service job with ``submit(client)`` and follow it to its end: its result, or
    None when detached; a failed, cancelled or refused job is a ClickException saying why."""
    from tokenmill.common.clients.compress import CompressClient

    try:
        with CompressClient.from_config(config) as client:
            job = submit(client)
            click.echo(f"job {job.id} queued: {what}")
            if detach:
                return None
            job = follow_job(client, job.id)
    except errors.TokenmillError as exc:
        raise click.ClickException(f"{exc.code}: {exc.message}") from None
    if job.state != common_pb2.JOB_STATE_SUCCEEDED:
        state = common_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_")
        raise click.ClickException(f"job {job.id} {state}: {job.error}")
    return {"job": job.id, **MessageToDict(job.result)}


@click.command("compress")
@click.argument("source")
@click.option("--method", required=True, type=click.Choice(METHODS))
@click.option(
    "--calib",
    "calibration_dataset",
    default="",
    help="Calibration dataset (gptq, awq, wanda, sparsegpt, prune_2_4 --score wanda|sparsegpt).",
)
@click.option("--eval", "eval_dataset", default="", help="Dataset whose val split measures perplexity.")
@click.option("--output", "output_name", default="", help="Checkpoint name [default: SOURCE-METHOD].")
@click.option("--group-size", type=click.IntRange(1), help="int4 group size [default: 128].")
@click.option("--sparsity", type=float, help="Pruning: fraction of weights set to zero.")
@click.option("--rank-fraction", type=float, help="svd: kept rank / full rank.")
@click.option(
    "--energy", type=float, help="svd, instead of --rank-fraction: squared singular values kept (0-1]."
)
@click.option(
    "--score",
    type=click.Choice(("magnitude", "wanda", "sparsegpt")),
    help="prune_2_4: what picks the 2 kept of every 4 [default: magnitude]; wanda/sparsegpt need --calib.",
)
@click.option("--student-preset", "student_preset", default="", help="distill: the student's model preset.")
@click.option("--steps", "distill_steps", type=click.IntRange(1), help="distill: student training steps.")
@click.option(
    "--train", "train_dataset", default="", help="distill: dataset the student learns the teacher on."
)
@click.option(
    "--temperature", "distill_temperature", type=float, help="distill: softmax temperature [default: 2]."
)
@click.option("--alpha", "distill_alpha", type=float, help="distill: hard-label CE weight [default: 0].")
@click.option("--act-order", is_flag=True, default=False, help="int4_gptq: act-order.")
@click.option("--keep-dense", multiple=True, help="fnmatch pattern of linears left dense (repeatable).")
@click.option("--detach", is_flag=True, help="Print the job id and return without following it.")
@click.pass_obj
def compress(obj, source: str, method: str, output_name: str, detach: bool, keep_dense: tuple[str, ...],
             **fields: Any) -> None:  # fmt: skip
    """Compress a stored checkpoint into a new version with a quality/size/speed report (distill: a
    student trained on SOURCE's logits by the trainer service; the report compares it to SOURCE)."""
    options = {k: v for k, v in fields.items() if v is not None and v != "" and v is not False}
    if keep_dense:
        options["keep_dense"] = list(keep_dense)
    output_name = output_name or f"{source.partition(':')[0]}-{method.replace('_', '-')}"
    result = run_job(
        obj.config,
        lambda client: client.submit(source, output_name, method, **options),
        f"{method} of {source} -> {output_name}",
        detach,
    )
    if result is None:
        return
    click.echo(f"job {result['job']} SUCCEEDED: checkpoint {result['checkpoint']}")
    for line in report_lines(result["report"]):
        click.echo(line)
