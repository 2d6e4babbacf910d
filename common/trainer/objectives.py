"""Training objectives: what the worker loop minimises, given the model and one batch.

An objective is called as ``objective(model, batch) -> (loss, metrics)``: ``loss`` a scalar tensor to
backpropagate, ``metrics`` detached scalars the loop averages over micro-batches and workers and puts
in the progress events. An objective that depends on a frozen model (DPO's reference) computes what
it needs from it in ``prepare`` (the worker has loaded the frozen weights into the model at that
point) and keeps it across resumes through ``state_files``/``load_state``, so a resumed run sees the
very same numbers without the frozen model.

DPO's reference is the policy's own modules before training (or with a ``reference_checkpoint``'s
weights loaded into them for the pre-pass): no second model is held in memory, sharded or not, and
full fine-tuning and LoRA work alike (LoRA's B starts at zero, so the wrapped policy *is* the base).
"""

from __future__ import annotations

import json
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tokenmill.common.errors import FailedPrecondition, NotFound
from tokenmill.common.model.transformer import IGNORE_INDEX
from tokenmill.common.trainer.config import TrainConfig
from tokenmill.common.trainer.parallel import reshard_all

REFERENCE_FILE = "dpo_reference.json"


class Objective(Protocol):
    sequences_per_sample: int  # forward sequences per sample (throughput figures)
    state_file_names: tuple[str, ...]  # checkpoint files ``load_state`` reads on resume
    eval_metric: str | None  # the metric reported as held-out loss; None: the objective's loss

    def __call__(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...
    def prepare(self, model: nn.Module, world: int) -> None: ...
    def state_files(self) -> dict[str, bytes]: ...
    def load_state(self, files: dict[str, bytes]) -> None: ...


class LanguageModeling:
    """Next-token cross-entropy over labelled positions (pretraining, SFT, LoRA)."""

    sequences_per_sample = 1
    state_file_names: tuple[str, ...] = ()
    eval_metric: str | None = None

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch
        _, loss = model(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
        return loss, {}

    def prepare(self, model: nn.Module, world: int) -> None:
        """Nothing to precompute."""

    def state_files(self) -> dict[str, bytes]:
        return {}

    def load_state(self, files: dict[str, bytes]) -> None:
        """Nothing to restore."""


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[B] summed log-probability of each row's labelled tokens (labels != -100), in fp32."""
    b, t, v = logits.shape
    nll = F.cross_entropy(
        logits.float().reshape(-1, v), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return -nll.view(b, t).sum(-1)


def dpo_loss(
    policy: torch.Tensor, reference: torch.Tensor, beta: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Rafailov et al. (2023): -log σ(β((π_c - ref_c) - (π_r - ref_r))), averaged over pairs.
    ``policy``/``reference`` are [B, 2] sequence log-probs, column 0 chosen, column 1 rejected."""
    rewards = beta * (policy - reference.to(policy.dtype))
    margin = rewards[:, 0] - rewards[:, 1]
    loss = -F.logsigmoid(margin).mean()
    metrics = {
        "reward_margin": margin.mean(),
        "reward_accuracy": (margin > 0).float().mean(),
        "chosen_logps": policy[:, 0].mean(),
        "rejected_logps": policy[:, 1].mean(),
    }
    return loss, {k: v.detach() for k, v in metrics.items()}


class DirectPreference:
    """DPO over a preference sampler's pairs; reference log-probs cached per pair index."""

    sequences_per_sample = 2
    state_file_names: tuple[str, ...] = (REFERENCE_FILE,)
    eval_metric: str | None = None

    def __init__(self, beta: float, device: torch.device, source: Any, batch_size: int, rank: int):
        self.beta, self.device, self.source = beta, device, source
        self.batch_size, self.rank = batch_size, rank
        self.reference: torch.Tensor | None = None  # [pairs, 2] float64

    def policy_logps(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """[B, 2] log-probs; chosen and rejected go through one forward (one FSDP all-gather)."""
        b = inputs.shape[0]
        flat_in = inputs.reshape(2 * b, -1).to(self.device, non_blocking=True)
        flat_tg = targets.reshape(2 * b, -1).to(self.device, non_blocking=True)
        return sequence_logps(model(flat_in), flat_tg).view(b, 2)

    def __call__(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.reference is None:
            raise FailedPrecondition("DPO reference log-probs were never computed (prepare() not called)")
        policy = self.policy_logps(model, batch.inputs, batch.targets)
        return dpo_loss(policy, self.reference[batch.index.to(self.device)], self.beta)

    @torch.no_grad()
    def prepare(self, model: nn.Module, world: int) -> None:
        """Score every pair once with the model as it is now (the reference). Each rank scores pairs
        rank, rank + world, ...; every rank runs the same number of forwards (FSDP's collectives),
        padding with its first pair; a sum all-reduce assembles the table (zeros elsewhere: exact)."""
        n = len(self.source.inputs)
        mine = list(range(self.rank, n, world))
        per_rank = -(-n // world)
        rounds = -(-per_rank // self.batch_size)
        padded = mine + [mine[0] if mine else 0] * (rounds * self.batch_size - len(mine))
        table = torch.zeros(n, 2, dtype=torch.float64, device=self.device)
        was_training = model.training
        model.eval()
        for r in range(rounds):
            idx = padded[r * self.batch_size : (r + 1) * self.batch_size]
            logps = self.policy_logps(
                model, torch.from_numpy(self.source.inputs[idx]), torch.from_numpy(self.source.targets[idx])
            ).double()
            real = max(0, min(self.batch_size, len(mine) - r * self.batch_size))  # padding comes last
            table[torch.tensor(idx[:real], dtype=torch.int64)] = logps[:real]
        if world > 1:
            dist.all_reduce(table)
        reshard_all(model)
        model.train(was_training)
        self.reference = table

    def state_files(self) -> dict[str, bytes]:
        assert self.reference is not None
        body = {"pairs": len(self.reference), "logps": self.reference.cpu().tolist()}
        return {REFERENCE_FILE: json.dumps(body).encode()}

    def load_state(self, files: dict[str, bytes]) -> None:
        body = json.loads(files[REFERENCE_FILE])
        n = len(self.source.inputs)
        if int(body["pairs"]) != n:
            raise FailedPrecondition(
                f"the checkpoint's DPO reference covers {body['pairs']} pairs but the data holds {n}; "
                "resume with the same preference data and seq_len"
            )
        self.reference = torch.tensor(np.asarray(body["logps"]), dtype=torch.float64, device=self.device)


def make_objective(
    cfg: TrainConfig, device: torch.device, source: Any, rank: int, io: Any = None
) -> Objective:
    """The run's objective; ``io`` (the run's CheckpointIO) loads a distillation teacher."""
    if cfg.mode == "dpo":
        return DirectPreference(cfg.dpo_beta, device, source, cfg.micro_batch_size, rank)
    if cfg.mode == "distill":
        from tokenmill.common.trainer.distill import Distillation, load_teacher

        teacher = load_teacher(io, cfg.teacher_checkpoint, device)
        return Distillation(teacher, cfg.distill_temperature, cfg.distill_alpha, device)
    return LanguageModeling(device)


def read_state(io: Any, ref: str, objective: Objective) -> dict[str, bytes]:
    """The objective's files from checkpoint ``ref``; FailedPrecondition when it lacks them."""
    if not objective.state_file_names:
        return {}
    try:
        return io.read_files(ref, list(objective.state_file_names))
    except NotFound:
        raise FailedPrecondition(
            f"checkpoint {ref} lacks {list(objective.state_file_names)}: it was not written by a run of "
            "this mode; start a new run with init_checkpoint instead"
        ) from None
