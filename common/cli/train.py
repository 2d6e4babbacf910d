"""`tokenmill train NAME ...`: submit a training job, show a live progress bar, write a loss-curve PNG.

`tokenmill train --resume JOB|CHECKPOINT --workers N` continues a run on any worker count; options
left out keep the resumed run's values (so option defaults are applied by the service, not here).

The PNG goes next to the job's outputs, ``<data_dir>/trainer/<job_id>/loss_curve.png`` (or ``--plot``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from google.protobuf.json_format import MessageToDict

from tokenmill.common import errors
from tokenmill.v1 import common_pb2


def _parse_overrides(values: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: use KEY=VALUE, e.g. vocab_size=4096", param_hint="--set")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


def plot_loss_curve(history: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Train (and val, where measured) loss against step, as a PNG (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["loss"] for h in history], label="train loss", lw=1.4)
    val = [(h["step"], h["val_loss"]) for h in history if h.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val loss", lw=1.4)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _follow(client, job_id: str, steps: int | None) -> common_pb2.Job:
    """Follow WatchJob until the job is terminal: a live progress bar on a terminal, one line per
    progress event otherwise (logs, CI, `make demo` piped through tee). The server ends the stream
    at the job's terminal event."""
    live = sys.stdout.isatty()
    if not live:
        for event in client.watch_job(job_id, follow=True):
            if event.kind in ("progress", "log"):
                click.echo(event.message)
        return client.get_job(job_id)
    last_step = 0
    with click.progressbar(
        length=steps or 1, label="training", show_pos=True, item_show_func=lambda s: s
    ) as bar:
        for event in client.watch_job(job_id, follow=True):
            if event.kind == "progress":
                step = int(event.data["step"])
                bar.length = int(event.data.get("steps") or bar.length or step)
                bar.current_item = event.message
                bar.update(step - last_step)
                last_step = step
            elif event.kind == "log":
                click.echo(f"\n{event.message}", err=True)
    return client.get_job(job_id)


@click.command("train")
@click.option("--output", "output_name", default="", help="Checkpoint name the model is saved under.")
@click.option(
    "--resume",
    default="",
    metavar="JOB|CHECKPOINT",
    help="Continue a train job (its last checkpoint) or a checkpoint, on --workers workers.",
)
@click.option("--dataset", default="", help="Ingested dataset name (pretraining; also SFT tokenizer).")
@click.option("--preset", "model_preset", default="", help="Model preset [default: test-1m].")
@click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Model config override (repeatable)."
)
@click.option(
    "--mode", type=click.Choice(["pretrain", "sft", "lora", "dpo", "distill"]), help="[default: pretrain]"
)
@click.option("--sft-data", default="", help="prompt/response JSONL (sft, lora).")
@click.option("--dpo-data", default="", help="prompt/chosen/rejected JSONL (dpo).")
@click.option("--beta", "dpo_beta", type=float, help="DPO's beta, > 0 [default: 0.1].")
@click.option(
    "--reference", "reference_checkpoint", default="", help="DPO's frozen reference [default: --init]."
)
@click.option("--lora", "use_lora", is_flag=True, default=None, help="dpo: train LoRA adapters on --init.")
@click.option("--teacher", "teacher_checkpoint", default="", help="distill: the teacher checkpoint.")
@click.option("--temperature", "distill_temperature", type=float, help="distill: T, > 0 [default: 2].")
@click.option("--alpha", "distill_alpha", type=float, help="distill: hard-label CE weight [default: 0].")
@click.option("--init", "init_checkpoint", default="", help="Checkpoint to start from, name[:version|tag].")
@click.option("--backend", type=click.Choice(["local", "ray"]), help="[default: local]")
@click.option("--workers", type=click.IntRange(1), help="[default: 1; resume: the run's]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="[default: auto]")
@click.option("--steps", type=click.IntRange(1), help="Total optimizer steps [default: 100].")
@click.option("--batch", "micro_batch_size", type=click.IntRange(1), help="[default: 8]")
@click.option("--seq-len", type=click.IntRange(2), help="[default: 128]")
@click.option("--accum", "grad_accum_steps", type=click.IntRange(1), help="[default: 1]")
@click.option("--lr", type=float, help="[default: 3e-4]")
@click.option("--warmup", "warmup_steps", type=click.IntRange(0), help="[default: 10]")
@click.option("--eval-every", type=click.IntRange(0), help="Validate every N steps (0: off).")
@click.option("--checkpoint-every", type=click.IntRange(0), help="Checkpoint every N steps.")
@click.option("--seed", type=click.IntRange(0))
@click.option("--activation-checkpointing/--no-activation-checkpointing", default=None)
@click.option("--compile/--no-compile", default=None, help="torch.compile the blocks (GPU).")
@click.option("--lora-rank", default=8, show_default=True, type=click.IntRange(1))
@click.option("--lora-alpha", default=16.0, show_default=True, type=float)
@click.option("--lora-targets", default="q_proj,v_proj", show_default=True)
@click.option("--detach", is_flag=True, help="Print the job id and return without following it.")
@click.option(
    "--plot", "plot_path", type=click.Path(dir_okay=False), default=None, help="Loss-curve PNG path."
)
@click.pass_obj
def train(obj, output_name: str, overrides: tuple[str, ...], lora_rank: int, lora_alpha: float, lora_targets: str,
          detach: bool, plot_path: str | None, **fields: Any) -> None:  # fmt: skip
    """Train a model from a dataset, or fine-tune a checkpoint, saving it as --output; or continue a
    run with --resume (any --workers)."""
    from tokenmill.common.clients.trainer import TrainerClient

    if not output_name and not fields["resume"]:
        raise click.UsageError("--output is required (unless --resume continues a run)")
    config = obj.config
    request: dict[str, Any] = {k: v for k, v in fields.items() if v not in ("", None)}
    request["model_overrides"] = _parse_overrides(overrides)
    if fields["mode"] == "lora" or fields["use_lora"]:
        request["lora"] = {
            "rank": lora_rank,
            "alpha": lora_alpha,
            "target_modules": [t.strip() for t in lora_targets.split(",") if t.strip()],
        }
    try:
        with TrainerClient.from_config(config) as client:
            job = client.submit(output_name, **request)
            click.echo(f"job {job.id} queued")
            if detach:
                return
            job = _follow(client, job.id, fields["steps"])
    except errors.TokenmillError as exc:
        raise click.ClickException(f"{exc.code}: {exc.message}") from None
    state = common_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_")
    history = MessageToDict(job.result).get("history", [])
    if history:
        path = Path(plot_path) if plot_path else Path(config.data_dir) / "trainer" / job.id / "loss_curve.png"
        plot_loss_curve(history, path, title=f"{output_name or fields['resume']} ({job.id})")
        click.echo(f"loss curve: {path}")
    if job.state != common_pb2.JOB_STATE_SUCCEEDED:
        refs = ", ".join(f"{a.name}:{a.version}" for a in job.artifacts) or "none"
        raise click.ClickException(f"job {job.id} {state}: {job.error} (checkpoints: {refs})")
    r = MessageToDict(job.result)
    val = f", val loss {r['val_loss']:.4f}" if r.get("val_loss") is not None else ""
    click.echo(f"job {job.id} SUCCEEDED: checkpoint {r['checkpoint']}, final loss {r['final_loss']:.4f}{val}")
