"""The training loop every worker process runs, whatever launched it (local processes or Ray Train).

One call of :func:`train` = one attempt of a job on one rank. It resumes from the run's last checkpoint
when there is one (any world size), trains with FSDP2, reports progress through a :class:`Channel`
(rank 0 only), checkpoints on a schedule, on cancel and at the end, and returns a result dict on rank 0.
Per step, one small all-reduce carries the loss sum, a non-finite flag and the stop flag, so every rank
takes the same decision at the same step (no rank can leave a collective hanging).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from tokenmill.common import failpoints
from tokenmill.common.checkpoint.format import piece_name
from tokenmill.common.checkpoint.manifest import ShardInfo
from tokenmill.common.errors import FailedPrecondition, InvalidArgument, NotFound
from tokenmill.common.model.lora import adapter_config, apply_lora
from tokenmill.common.model.transformer import ModelConfig, Transformer, count_parameters
from tokenmill.common.trainer import sharded_state as ss
from tokenmill.common.trainer.checkpoint_io import CheckpointIO, read_tensor
from tokenmill.common.trainer.config import TrainConfig, run_tag
from tokenmill.common.trainer.data import make_sources
from tokenmill.common.trainer.distill import manifest_extra, student_config
from tokenmill.common.trainer.metrics import mfu, peak_flops
from tokenmill.common.trainer.objectives import make_objective, read_state
from tokenmill.common.trainer.parallel import (
    Dist,
    broadcast_str,
    init_distributed,
    memory_bytes,
    reshard_all,
    set_grad_sync,
    shard_model,
)
from tokenmill.common.trainer.preference import check_reference
from tokenmill.common.trainer.schedule import lr_at

TRAIN_STATE = "train_state.json"
# files of an init checkpoint that a run carries forward (HF layout side files)
INIT_TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
INIT_MODEL_FILES = ("generation_config.json",)


class Channel(Protocol):
    """How rank 0 talks to whoever launched it."""

    def report(self, kind: str, data: dict[str, Any]) -> None: ...
    def stop_requested(self) -> bool: ...


class NullChannel:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def report(self, kind: str, data: dict[str, Any]) -> None:
        self.events.append((kind, data))

    def stop_requested(self) -> bool:
        return False


def resolve_model_config(cfg: TrainConfig, io: CheckpointIO | None) -> ModelConfig:
    """The preset (+ overrides), or, when starting from a checkpoint, that checkpoint's own config."""
    model = cfg.validate()
    if cfg.mode == "distill":
        return student_config(cfg, io)
    if cfg.init_checkpoint:
        if io is None or io.resolve(cfg.init_checkpoint) is None:
            raise NotFound(
                f"checkpoint {cfg.init_checkpoint!r} not found; list them with 'tokenmill ckpt list'"
            )
        hf = json.loads(io.read_files(cfg.init_checkpoint, ["config.json"])["config.json"])
        model = ModelConfig.from_hf_config(hf)
        fixed = sorted(set(cfg.model_overrides) - {"max_seq_len"})
        if fixed:
            raise InvalidArgument(
                f"model_overrides {fixed} cannot change a model started from {cfg.init_checkpoint!r}: its "
                "shapes and settings are the checkpoint's (only max_seq_len may be overridden); drop them"
            )
        if cfg.model_overrides:
            model = model.replace(max_seq_len=cfg.model_overrides["max_seq_len"])
    return model


def resolve_hf_config(
    cfg: TrainConfig, io: CheckpointIO | None, model: ModelConfig
) -> tuple[dict[str, Any], bytes]:
    """(config.json, its bytes) for the run's checkpoints: the init checkpoint's own, unchanged
    when it describes this model (its other fields, e.g. pad_token_id, and its exact bytes survive
    fine-tuning and an HF export; only a dtype other than the float32 the run saves is corrected),
    else the one the model config writes."""
    if cfg.init_checkpoint and cfg.mode != "distill" and io is not None:
        with contextlib.suppress(NotFound):
            raw = io.read_files(cfg.init_checkpoint, ["config.json"])["config.json"]
            hf = json.loads(raw)
            if ModelConfig.from_hf_config(hf) == model:
                return _saved_dtype(hf, raw)
    hf = model.to_hf_config()
    return hf, json.dumps(hf, indent=2).encode()


def _saved_dtype(hf: dict[str, Any], raw: bytes) -> tuple[dict[str, Any], bytes]:
    """`hf` declaring the float32 the trainer's checkpoints hold (transformers loads weights in
    the dtype config.json names)."""
    wrong = [k for k in ("dtype", "torch_dtype") if k in hf and hf[k] != "float32"]
    if not wrong:
        return hf, raw
    hf = {**hf, **dict.fromkeys(wrong, "float32")}
    return hf, (json.dumps(hf, indent=2, sort_keys=True) + "\n").encode()


class _Run:
    def __init__(self, cfg: TrainConfig, io: CheckpointIO, channel: Channel, d: Dist):
        self.cfg, self.io, self.channel, self.d = cfg, io, channel, d
        self.model_cfg = resolve_model_config(cfg, io)
        self.hf_config, self.hf_config_bytes = resolve_hf_config(cfg, io, self.model_cfg)
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and d.device.type == "cuda")
        self.history: list[dict[str, Any]] = []
        self.last_ckpt = ""
        self.run_tag = run_tag(cfg.run_id) if cfg.run_id else ""

    # ------------------------------------------------------------------------------------ build
    def build(self) -> None:
        cfg, d = self.cfg, self.d
        self.train_src, self.val_src, data_vocab = make_sources(cfg, d.rank, d.world, self.io)
        self.objective = make_objective(cfg, d.device, self.train_src, d.rank, self.io)
        if data_vocab and data_vocab > self.model_cfg.vocab_size:
            raise InvalidArgument(
                f"the tokenizer has {data_vocab} tokens but the model's vocab_size is {self.model_cfg.vocab_size}; "
                f"set model_overrides vocab_size >= {data_vocab}"
            )
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank and every world size
        model = Transformer(self.model_cfg)
        if cfg.lora_active:
            apply_lora(
                model,
                rank=cfg.lora.rank,
                alpha=cfg.lora.alpha,
                target_modules=cfg.lora.target_modules,
                dropout=cfg.lora.dropout,
            )
        model.activation_checkpointing = cfg.activation_checkpointing
        model.to(d.device)
        # FSDP2 shards across workers. A single CPU worker has nothing to shard and no mixed precision
        # to manage, so it trains the plain module (FSDP's DTensor bookkeeping would only cost time;
        # checkpoints are the same pieces either way). On GPU, FSDP2 also applies the bf16 policy.
        if d.world > 1 or d.device.type == "cuda" or self.bf16:
            # With one worker nothing needs freeing between forward and backward: keep blocks gathered.
            shard_model(
                model,
                bf16=self.bf16,
                compile_blocks=cfg.compile and d.device.type == "cuda",
                reshard_after_forward=d.world > 1,
            )
        self.model = model
        self.params_total = count_parameters(model)
        self.params_trainable = count_parameters(model, trainable_only=True)
        decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        extra = {"fused": True} if d.device.type == "cuda" else {}
        self.opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, **extra)
        self.step = 0
        self.finished = ""  # the run's committed final checkpoint, when an earlier attempt got that far
        resume = self.io.resolve(f"{cfg.output_name}:{self.run_tag}") if self.run_tag else None
        resume = resume or cfg.resume_from  # a retried attempt prefers its own, later checkpoint
        if resume:
            self._resume(resume)
        elif cfg.init_checkpoint:
            self._start(cfg.init_checkpoint, cfg.reference_checkpoint or cfg.init_checkpoint)

    def _start(self, init: str, reference: str) -> None:
        """Load the frozen reference's weights, let the objective score with them (DPO caches its
        reference log-probs; others do nothing), then the init weights when they differ."""
        if reference != init:
            check_reference(self.io, reference, self.model_cfg)
        self._load_init(reference)
        self.objective.prepare(self.model, self.d.world)
        if reference != init:
            self._load_init(init)

    def _load_init(self, ref: str) -> None:
        layout = self.io.layout(ref)
        targets = {n: p for n, p in ss.model_tensors(self.model).items() if ".lora_" not in n}
        missing = sorted(set(targets) - set(layout))
        if missing:
            raise FailedPrecondition(f"checkpoint {ref} lacks {missing[:3]}; is it a model of this family?")
        ss.load_into(self.io, ref, layout, targets, self.d.rank, self.d.world)

    def _resume(self, ref: str) -> None:
        """Continue the run from its last checkpoint, whatever it holds: full training state
        (periodic, cancel), or weights only (the final one). A final checkpoint at the run's last
        step means an earlier attempt finished: the run ends with it and trains no further."""
        layout = self.io.layout(ref)
        state = json.loads(self.io.read_files(ref, [TRAIN_STATE])[TRAIN_STATE])
        self.step = int(state["step"])
        self.history = list(state.get("history", []))
        self.last_ckpt = ref
        if state.get("final") and self.step >= self.cfg.steps:
            self.finished = ref
            self._log(
                f"the run's final checkpoint {ref} (step {self.step}) is already committed: finishing with it"
            )
            return
        targets = ss.model_tensors(self.model)
        if state.get("final") and self.cfg.lora_active:  # a final adapter holds no base weights
            self._load_init(self.cfg.init_checkpoint)
            targets = ss.model_tensors(self.model, only="lora")
        ss.load_into(self.io, ref, layout, targets, self.d.rank, self.d.world)
        fresh = not ss.has_optimizer_state(layout, self.model)
        if not fresh:
            ss.load_optimizer(
                self.io, ref, layout, self.model, self.opt, self.step, self.d.rank, self.d.world
            )
        self.train_src.load_state_dict(state["sampler"])
        self.objective.load_state(read_state(self.io, ref, self.objective))
        rng_key = f"rng.cpu.rank{self.d.rank}"
        if state["world_size"] == self.d.world and rng_key in layout:
            torch.set_rng_state(read_tensor(self.io, ref, layout, rng_key))
        note = "; it holds no optimizer state (weights only): AdamW moments start fresh" if fresh else ""
        self._log(f"resumed from {ref} at step {self.step} (saved by {state['world_size']} workers){note}")

    def _log(self, message: str) -> None:
        if self.d.is_main:
            self.channel.report("log", {"message": message})

    # ------------------------------------------------------------------------------- checkpoints
    def save(self, *, final: bool, reason: str) -> str:
        cfg, d = self.cfg, self.d
        reshard_all(self.model)
        upload_id = ""
        if d.is_main:
            tags = [self.run_tag] if self.run_tag else []
            lineage = {
                "parent": cfg.init_checkpoint or cfg.teacher_checkpoint,
                "dataset": cfg.dataset_name or cfg.dataset_path,
                "job_id": cfg.run_id,
            }
            metrics = {k: v for k, v in (self.history[-1] if self.history else {}).items() if v is not None}
            metrics["reason"] = reason
            upload_id = self.io.begin(
                cfg.output_name,
                config={**self.hf_config, **manifest_extra(cfg)},
                tags=tags,
                metrics=metrics,
                lineage=lineage,
            )
        upload_id = broadcast_str(upload_id, d)
        only = "lora" if (final and cfg.lora_active) else None
        named = ss.model_tensors(self.model, only=only)
        if not final:
            moments, _ = ss.optimizer_tensors(self.model, self.opt)
            named.update(moments)
        tensors, shards = ss.collect_pieces(named, d.rank, d.world)
        # Own copies: storage exporters (numpy views) must never pin FSDP-managed parameter memory.
        tensors = {k: v.to("cpu", copy=True) for k, v in tensors.items()}
        if not final:  # per-rank RNG, exact on same-world-size resume
            key = f"rng.cpu.rank{d.rank}"
            rng = torch.get_rng_state()
            tensors[piece_name(key, [0])] = rng
            shards[piece_name(key, [0])] = ShardInfo(key, [rng.numel()], [0]).to_json()
        files: dict[str, bytes] = {}
        if d.is_main:
            files = self._files(final)
        self.io.write(upload_id, d.rank, tensors, shards, files)
        dist.barrier()
        ref = ""
        if d.is_main:
            ref = self.io.commit(upload_id)
            self.channel.report(
                "checkpoint", {"ref": ref, "step": self.step, "final": final, "reason": reason}
            )
        self.last_ckpt = broadcast_str(ref, d)
        return self.last_ckpt

    def _files(self, final: bool) -> dict[str, bytes]:
        cfg = self.cfg
        state = {
            "step": self.step,
            "world_size": self.d.world,
            "sampler": self.train_src.state_dict(),
            "history": self.history,
            "config": cfg.to_dict(),
            "final": final,
        }
        files = {
            TRAIN_STATE: json.dumps(state).encode(),
            "config.json": self.hf_config_bytes,
        }
        files.update(self._model_files())
        files.update(self.objective.state_files())
        if cfg.lora_active:
            lo = cfg.lora
            body = adapter_config(lo.rank, lo.alpha, lo.target_modules, lo.dropout)
            body["base_model_name_or_path"] = cfg.init_checkpoint
            files["adapter_config.json"] = json.dumps(body).encode()
        return files

    def _model_files(self) -> dict[str, bytes]:
        """tokenizer.json (the run's, else the init checkpoint's), and the init checkpoint's files
        that belong with it: its tokenizer/chat files when the run uses its tokenizer, and its
        generation config. A fine-tuned import so keeps its chat template, special tokens and
        every EOS id through the trainer and an HF export."""
        cfg = self.cfg
        init = cfg.init_checkpoint if cfg.mode != "distill" else ""
        inherited = self._init_files(init, ("tokenizer.json", *INIT_TOKENIZER_FILES, *INIT_MODEL_FILES))
        files = {k: v for k, v in inherited.items() if k in INIT_MODEL_FILES}
        tok = cfg.tokenizer_path or (
            str(Path(cfg.dataset_path) / "tokenizer.json") if cfg.dataset_path else ""
        )
        own = Path(tok).read_bytes() if tok and Path(tok).is_file() else None
        if own is not None:
            files["tokenizer.json"] = own
        if "tokenizer.json" in inherited and own in (None, inherited["tokenizer.json"]):
            files.update({k: v for k, v in inherited.items() if k not in INIT_MODEL_FILES})
        return files

    def _init_files(self, ref: str, names: Sequence[str]) -> dict[str, bytes]:
        """Those of `names` that checkpoint `ref` holds ({} without a ref)."""
        out: dict[str, bytes] = {}
        for name in names if ref else ():
            with contextlib.suppress(NotFound):
                out.update(self.io.read_files(ref, [name]))
        return out

    # ------------------------------------------------------------------------------------ steps
    def _mean(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.d.device)
        dist.all_reduce(t)
        return float(t[0]) / self.d.world

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.val_src is None:
            return None
        self.model.eval()
        saved = self.val_src.consumed
        self.val_src.consumed = 0  # the same held-out batches every time
        total = 0.0
        key = self.objective.eval_metric
        for _ in range(self.cfg.eval_batches):
            loss, metrics = self.objective(self.model, self.val_src.next_batch())
            total += float(metrics[key] if key else loss)
        self.val_src.consumed = saved
        reshard_all(self.model)
        self.model.train()
        return self._mean(total / self.cfg.eval_batches)

    def _report_start(self) -> None:
        if self.d.is_main:
            self.channel.report(
                "start",
                {
                    "parameters": self.params_total,
                    "trainable_parameters": self.params_trainable,
                    "workers": self.d.world,
                    "device": str(self.d.device),
                    "bf16": self.bf16,
                    "start_step": self.step,
                    "steps": self.cfg.steps,
                    "flops_per_token": self.model_cfg.flops_per_token(self.cfg.seq_len),
                },
            )

    def _gradients(self, params: Sequence[torch.Tensor]) -> _StepOutput:
        """Forward and backward over the step's micro-batches at this step's lr (not applied yet)."""
        cfg, d = self.cfg, self.d
        lr = lr_at(
            self.step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps
        )
        for g in self.opt.param_groups:
            g["lr"] = lr
        loss_sum = torch.zeros((), dtype=torch.float32, device=d.device)
        metric_sums: dict[str, torch.Tensor] = {}
        for micro in range(cfg.grad_accum_steps):
            set_grad_sync(self.model, micro == cfg.grad_accum_steps - 1)
            loss, metrics = self.objective(self.model, self.train_src.next_batch())
            if failpoints.hit(
                "trainer.loss", step=self.step + 1, rank=d.rank, attempt=cfg.attempt, workers=d.world
            ):
                loss = loss * float("nan")
            (loss / cfg.grad_accum_steps).backward()
            loss_sum += loss.detach()
            for k, v in metrics.items():
                metric_sums[k] = metric_sums.get(k, 0) + v.float()
        norm = None
        if cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            norm = norm.to_local() if hasattr(norm, "to_local") else norm
        metrics = {k: v / cfg.grad_accum_steps for k, v in sorted(metric_sums.items())}
        return _StepOutput(loss_sum / cfg.grad_accum_steps, lr, norm, metrics)

    def _apply(self) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1

    def _end_window(
        self, window: list[_StepOutput], bad: torch.Tensor, pace: _Pace, *, do_eval: bool, do_ckpt: bool
    ) -> tuple[str, str] | None:
        """The host-device sync closing a window of steps: one all-reduce of the window's losses, the
        non-finite flag and the stop flag; then progress, eval and checkpoints. Returns (status,
        reason) when the run must end here."""
        cfg, d = self.cfg, self.d
        stop_local = d.is_main and self.channel.stop_requested()
        flags = [bad.float(), torch.tensor(float(stop_local), device=d.device)]
        per_step = [torch.stack([w.loss, *w.metrics.values()]) for w in window]
        packed = torch.cat([*per_step, torch.stack(flags)]).to(torch.float64)
        dist.all_reduce(packed)
        rows = (packed[:-2] / d.world).view(len(window), -1).tolist()
        if bool(packed[-2] > 0):
            self.opt.zero_grad(set_to_none=True)
            return "failed", self._diverged(len(window))
        self._apply()
        now = time.perf_counter()
        dt = (now - pace.t_window) / len(window)
        first = self.step - len(window) + 1
        for i, (row, w) in enumerate(zip(rows, window, strict=True)):
            self.history.append(
                {"step": first + i, "loss": row[0], "lr": w.lr, **dict(zip(w.metrics, row[1:], strict=True))}
            )
        tps = pace.tokens_per_step / dt
        norm = window[-1].norm
        record: dict[str, Any] = {
            "step": self.step,
            "steps": cfg.steps,
            **{k: v for k, v in self.history[-1].items() if k not in ("step", "lr")},
            "lr": window[-1].lr,
            "tokens_per_s": tps,
            "step_time_s": dt,
            "mfu": mfu(self.model_cfg, cfg.seq_len, tps / d.world, pace.peak),
            "memory_bytes": memory_bytes(d.device),
            "grad_norm": float(norm) if norm is not None else None,
            "eta_s": (now - pace.t_run) / (self.step - pace.start_step) * (cfg.steps - self.step),
        }
        if do_eval:
            val = self.evaluate()
            if val is not None:
                record["val_loss"], record["val_ppl"] = val, math.exp(min(val, 50.0))
                self.history[-1]["val_loss"] = val
        if d.is_main:
            self.channel.report("progress", record)
        if bool(packed[-1] > 0):
            self.save(final=False, reason="cancel")
            return "cancelled", f"cancelled at step {self.step}"
        if do_ckpt:
            self.save(final=False, reason="periodic")
        pace.t_window = time.perf_counter()
        return None

    def _diverged(self, window_len: int) -> str:
        nxt = self.step + 1
        first = nxt - window_len + 1
        where = f"step {nxt}" if first == nxt else f"steps {first}-{nxt}"
        kept = self.last_ckpt or "none (no checkpoint was written before it)"
        return (
            f"loss became non-finite (NaN/Inf) at {where}; the run stopped without applying it; "
            f"last good checkpoint: {kept}. Lower lr or raise warmup_steps"
        )

    def run(self) -> dict[str, Any]:
        cfg, d = self.cfg, self.d
        if self.finished:
            return self._result("completed", "", self.finished)
        self.model.train()
        self._report_start()
        status, reason = "completed", ""
        sequences = (
            d.world * cfg.micro_batch_size * cfg.grad_accum_steps * self.objective.sequences_per_sample
        )
        pace = _Pace(
            tokens_per_step=sequences * cfg.seq_len,
            peak=peak_flops(torch.cuda.get_device_name(d.device)) if d.device.type == "cuda" else None,
            start_step=self.step,
        )
        # Host-device syncs only every `log_every` steps (and before evals/checkpoints/the end): on GPU
        # the CPU keeps queueing work ahead. Per-step losses stay on device until the window's sync.
        sync_every = max(1, cfg.log_every)
        window: list[_StepOutput] = []
        bad = torch.zeros((), dtype=torch.bool, device=d.device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        while self.step < cfg.steps:
            out = self._gradients(params)
            if out.norm is not None:
                bad |= ~torch.isfinite(out.norm)
            bad |= ~torch.isfinite(out.loss)
            window.append(out)
            nxt = self.step + 1
            do_eval = bool(cfg.eval_every) and (nxt % cfg.eval_every == 0 or nxt == cfg.steps)
            do_ckpt = bool(cfg.checkpoint_every) and nxt % cfg.checkpoint_every == 0 and nxt < cfg.steps
            if nxt % sync_every == 0 or nxt == cfg.steps or do_eval or do_ckpt:
                ended = self._end_window(window, bad, pace, do_eval=do_eval, do_ckpt=do_ckpt)
                window.clear()
                if ended is not None:
                    status, reason = ended
                    break
            else:
                self._apply()
            failpoints.hit(
                "trainer.after_step", step=self.step, rank=d.rank, attempt=cfg.attempt, workers=d.world
            )
        final_ref = ""
        if status == "completed" and cfg.save_final:
            final_ref = self.save(final=True, reason="final")
        return self._result(status, reason, final_ref)

    def _result(self, status: str, reason: str, final_ref: str) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        return {
            "status": status,
            "reason": reason,
            "step": self.step,
            "checkpoint": final_ref or self.last_ckpt,
            "final_loss": last.get("loss"),
            "val_loss": next((h["val_loss"] for h in reversed(self.history) if "val_loss" in h), None),
            "history": self.history,
            "parameters": self.params_total,
            "trainable_parameters": self.params_trainable,
            "workers": self.d.world,
        }


@dataclass
class _StepOutput:
    """One step's loss (on device until the window's sync), lr and gradient norm (None: no clipping)."""

    loss: torch.Tensor
    lr: float
    norm: torch.Tensor | None
    metrics: dict[str, torch.Tensor]  # the objective's, averaged over micro-batches


@dataclass
class _Pace:
    """What throughput and ETA figures are computed from."""

    tokens_per_step: int
    peak: float | None
    start_step: int
    t_run: float = field(default_factory=time.perf_counter)
    t_window: float = field(default_factory=time.perf_counter)


def train(cfg: TrainConfig, io: CheckpointIO, channel: Channel | None = None) -> dict[str, Any]:
    """Run one attempt on this rank (process group from the torchrun environment or already set up)."""
    channel = channel or NullChannel()
    d = init_distributed(cfg.device)
    try:
        run = _Run(cfg, io, channel, d)
        run.build()
        result = run.run()
        dist.barrier()
        return result
    finally:
        if d.owns_group and dist.is_initialized():
            dist.destroy_process_group()
