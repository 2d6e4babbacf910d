"""`tokenmill eval MODEL[:VERSION|TAG] --suite python [--perplexity DATASET]`: queue an eval job on the
compress service, follow its progress (task i of n, instances done), print the results as a table.
The numbers are also recorded with the version: compare versions with `tokenmill ckpt list --metric`."""

from __future__ import annotations

from typing import Any

import click

from tokenmill.common.cli.compress import run_job


def result_lines(report: dict[str, Any]) -> list[str]:
    """One row per task metric, then perplexity and bits per byte."""
    lines = [f"{'TASK':28}{'METRIC':16}{'VALUE':>10}{'DOCS':>8}"]
    for task in report.get("tasks", []):
        for metric, value in sorted(task["metrics"].items()):
            lines.append(f"{task['task']:28}{metric:16}{value:>10.4g}{int(task['documents']):>8}")
    ppl = report.get("perplexity")
    if ppl:
        label = f"perplexity ({ppl['dataset']})"
        lines.append(f"{label:28}{'perplexity':16}{ppl['perplexity']:>10.4g}{int(ppl['tokens']):>8}")
        if ppl.get("bits_per_byte"):
            lines.append(f"{'':28}{'bits_per_byte':16}{ppl['bits_per_byte']:>10.4g}")
    return lines


@click.command("eval")
@click.argument("source")
@click.option("--suite", default="", help="A shipped suite (python) or a folder name under <data_dir>/eval/.")
@click.option("--task", "tasks", multiple=True, help="Only this task of the suite (repeatable).")
@click.option("--perplexity", "perplexity_dataset", default="", help="Dataset whose val split is scored.")
@click.option("--batches", "perplexity_batches", type=click.IntRange(1), default=None,
              help="Perplexity: batches of 8 windows [default: 8].")  # fmt: skip
@click.option("--seq-len", "perplexity_seq_len", type=click.IntRange(1), default=None,
              help="Perplexity window [default: the model's context, at most 512].")  # fmt: skip
@click.option("--limit", type=click.IntRange(1), default=None, help="Instances per task [default: all].")
@click.option("--pass-k", "pass_k", type=click.IntRange(1), multiple=True, help="Code tasks: k of pass@k.")
@click.option("--detach", is_flag=True, help="Print the job id and return without following it.")
@click.pass_obj
def eval_cmd(obj, source: str, detach: bool, **fields: Any) -> None:
    """Evaluate a stored checkpoint: task accuracy, pass@k and perplexity, stored with the version."""
    options = {k: v for k, v in fields.items() if v not in ("", None, ())}
    report = run_job(
        obj.config, lambda client: client.submit_eval(source, **options), f"eval of {source}", detach
    )
    if report is None:
        return
    click.echo(f"job {report['job']} SUCCEEDED: {report['source']} in {float(report['wall_seconds']):.1f} s")
    for line in result_lines(report):
        click.echo(line)
    click.echo(f"recorded with {report['source']}: see 'tokenmill ckpt show {report['source']}'")
