"""Knowledge distillation (Hinton et al., 2015): a student trained on a frozen teacher's logits.

The loss per labelled token is ``alpha * CE(student, label) + (1 - alpha) * T² * KL(p_T || q_T)``,
where ``p_T``/``q_T`` are the teacher's and student's softmax at temperature ``T``; the T² keeps the
soft term's gradients on the scale of the hard one as T grows. The teacher is any stored checkpoint
of the model family (dense, int8/int4, pruned or SVD: every format is dequantized to plain weights),
held whole on every worker in eval mode (it is never sharded, never trained, never checkpointed: a
resumed run reloads it from the store). The student is any preset sized to the teacher's vocabulary.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.common.errors import FailedPrecondition, NotFound
from tokenmill.common.model.quant import dequantize_state_dict
from tokenmill.common.model.transformer import IGNORE_INDEX, ModelConfig, Transformer
from tokenmill.common.trainer.checkpoint_io import CheckpointIO, read_full
from tokenmill.common.trainer.config import TrainConfig

# Checkpoint tensors that are training state, not weights (AdamW moments, RNG states).
_STATE_PREFIXES = ("optim.", "rng.")


def teacher_config(io: CheckpointIO | None, ref: str) -> ModelConfig:
    """The stored teacher's model config; NotFound when the store has no such checkpoint."""
    if io is None or io.resolve(ref) is None:
        raise NotFound(f"teacher checkpoint {ref!r} not found; list them with 'tokenmill ckpt list'")
    return ModelConfig.from_hf_config(json.loads(io.read_files(ref, ["config.json"])["config.json"]))


def student_config(cfg: TrainConfig, io: CheckpointIO | None) -> ModelConfig:
    """The student preset (+ overrides) with the teacher's vocabulary: KL compares distributions over
    the same tokens, so an explicit vocab_size override must equal the teacher's."""
    teacher = teacher_config(io, cfg.teacher_checkpoint)
    asked = cfg.model_overrides.get("vocab_size")
    if asked is not None and int(asked) != teacher.vocab_size:
        raise FailedPrecondition(
            f"the student's vocab_size {asked} differs from teacher {cfg.teacher_checkpoint}'s vocab_size "
            f"{teacher.vocab_size}; distillation compares logits over the same vocabulary: drop the "
            "vocab_size override (the student takes the teacher's)"
        )
    student = cfg.model_config().replace(vocab_size=teacher.vocab_size)
    if cfg.seq_len > teacher.max_seq_len:
        raise FailedPrecondition(
            f"seq_len={cfg.seq_len} exceeds teacher {cfg.teacher_checkpoint}'s max_seq_len="
            f"{teacher.max_seq_len}; lower seq_len"
        )
    return student


def load_teacher(io: CheckpointIO, ref: str, device: torch.device) -> Transformer:
    """The teacher as a frozen module on ``device``, from whatever format it is stored in."""
    model = Transformer(teacher_config(io, ref))
    names = [n for n in io.layout(ref) if not n.startswith(_STATE_PREFIXES)]
    weights = dequantize_state_dict(read_full(io, ref, names))
    missing, _ = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_embeddings else set()
    if set(missing) - tied:
        raise FailedPrecondition(
            f"teacher checkpoint {ref} lacks {sorted(missing)[:3]}: a LoRA adapter or another model "
            "family cannot teach; give a full model checkpoint"
        )
    model.requires_grad_(False)
    return model.to(device).eval()


def distill_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    alpha: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean over labelled tokens of ``alpha * CE + (1 - alpha) * T² * KL(teacher_T || student_T)``.
    ``student``/``teacher`` are [B, T, V] logits, ``targets`` [B, T] (IGNORE_INDEX: unlabelled)."""
    v = student.shape[-1]
    mask = targets.reshape(-1) != IGNORE_INDEX
    s = student.float().reshape(-1, v)[mask]
    t = teacher.float().reshape(-1, v)[mask]
    labels = targets.reshape(-1)[mask]
    log_q = F.log_softmax(s / temperature, dim=-1)
    log_p = F.log_softmax(t / temperature, dim=-1)
    kl = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
    ce = F.cross_entropy(s, labels)
    loss = alpha * ce + (1.0 - alpha) * temperature**2 * kl
    with torch.no_grad():
        teacher_ce = F.cross_entropy(t, labels)
    return loss, {"kl": kl.detach(), "ce": ce.detach(), "teacher_ce": teacher_ce}


class Distillation:
    """The objective of mode "distill" over packed-data batches ``(inputs, targets)``."""

    sequences_per_sample = 1
    state_file_names: tuple[str, ...] = ()  # the teacher lives in the store, not in the run's state
    eval_metric: str | None = "ce"  # held-out loss: the student's own cross-entropy (its perplexity)

    def __init__(self, teacher: nn.Module, temperature: float, alpha: float, device: torch.device):
        self.teacher, self.temperature, self.alpha, self.device = teacher, temperature, alpha, device

    def __call__(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        logits = model(x)
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        return distill_loss(logits, teacher_logits, y, self.temperature, self.alpha)

    def prepare(self, model: nn.Module, world: int) -> None:
        """Nothing to precompute: teacher logits come fresh with every batch."""

    def state_files(self) -> dict[str, bytes]:
        return {}

    def load_state(self, files: dict[str, bytes]) -> None:
        """Nothing to restore."""


def manifest_extra(cfg: TrainConfig) -> dict[str, Any]:
    """What a checkpoint's manifest config records beyond the model: for a distilled student, the
    teacher and the settings it was taught with (``{}`` for every other mode)."""
    if cfg.mode != "distill":
        return {}
    settings = {
        "teacher": cfg.teacher_checkpoint,
        "student_preset": cfg.model_preset,
        "temperature": cfg.distill_temperature,
        "alpha": cfg.distill_alpha,
        "steps": cfg.steps,
    }
    return {"distillation": settings}
