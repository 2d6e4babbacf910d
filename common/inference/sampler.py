"""Turn one step's last-position logits into next tokens, per request.

Order (as in vLLM/HF): repetition penalty on the raw logits, then greedy argmax, or temperature,
top-k, top-p and a draw from the request's own seeded generator (so a seeded request gives the
same tokens whatever it is batched with). The logprob returned is the chosen token's under the
model's raw distribution (log-softmax of the unprocessed logits), like vLLM's default.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tokenmill.common.inference.request import Request


def apply_repetition_penalty(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    rows = [i for i, r in enumerate(requests) if r.params.repetition_penalty != 1.0]
    if not rows:
        return logits
    logits = logits.clone()
    for i in rows:
        req = requests[i]
        seen = torch.tensor(sorted(set(req.all_token_ids)), device=logits.device, dtype=torch.long)
        vals = logits[i, seen]
        p = req.params.repetition_penalty
        logits[i, seen] = torch.where(vals > 0, vals / p, vals * p)
    return logits


def _top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits [V] (already temperature-scaled) -> logits with excluded tokens at -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        cum = probs.cumsum(-1)
        remove = (cum - probs) >= top_p  # keep the smallest prefix whose mass reaches top_p
        remove[0] = False
        logits = logits.masked_fill(torch.zeros_like(remove).scatter(0, idx, remove), float("-inf"))
    return logits


class Sampler:
    def __init__(self, device: torch.device):
        self.device = device
        self.default_generator = torch.Generator(device=device)
        self.default_generator.seed()

    def generator_for(self, req: Request) -> torch.Generator:
        if req.params.seed is None:
            return self.default_generator
        if req.generator is None:
            req.generator = torch.Generator(device=self.device)
            req.generator.manual_seed(int(req.params.seed))
        return req.generator

    def __call__(
        self, logits: torch.Tensor, requests: Sequence[Request]
    ) -> tuple[list[int], list[float] | None]:
        """logits [B, V] float32 -> (token ids, chosen-token logprobs or None when nobody asked)."""
        want_logprobs = any(r.params.logprobs for r in requests)
        if not want_logprobs and all(
            r.params.greedy and r.params.repetition_penalty == 1.0 for r in requests
        ):
            return logits.argmax(dim=-1).tolist(), None  # the common serving case: one kernel, one sync
        raw = logits
        logits = apply_repetition_penalty(logits, requests)
        greedy = [i for i, r in enumerate(requests) if r.params.greedy]
        tokens = torch.empty(len(requests), dtype=torch.long, device=logits.device)
        if greedy:
            gi = torch.tensor(greedy, device=logits.device)
            tokens[gi] = logits[gi].argmax(dim=-1)
        for i, req in enumerate(requests):
            if req.params.greedy:
                continue
            p = req.params
            row = _top_k_top_p(logits[i] / p.temperature, p.top_k, p.top_p)
            probs = torch.softmax(row, dim=-1)
            tokens[i] = torch.multinomial(probs, 1, generator=self.generator_for(req))[0]
        logprobs = None
        if want_logprobs:
            lp = torch.log_softmax(raw, dim=-1).gather(1, tokens[:, None])[:, 0]
            logprobs = lp.tolist()
        return tokens.tolist(), logprobs
