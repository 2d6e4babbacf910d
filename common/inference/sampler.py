"""Turn one step's last-position logits into next tokens, per request.

Order (as in vLLM/HF): token healing's first-token constraint, repetition penalty, OpenAI frequency/presence penalties
(over generated tokens), logit_bias, then greedy argmax, or temperature, top-k, top-p and a draw
from the request's own seeded generator (so a seeded request gives the same tokens whatever it is
batched with). The logprobs returned (chosen token and top alternatives) are under the model's raw
distribution (log-softmax of the unprocessed logits), like vLLM's default. Processing costs only
when a request in the batch asks for it.
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
        penalised = torch.where(vals > 0, vals / p, vals * p)
        # A penalty near 0 or huge must not make a finite logit infinite: a row holding +inf, or only
        # -inf, has no distribution to sample (NaN probabilities fail the whole step).
        finite = penalised.clamp(torch.finfo(logits.dtype).min, torch.finfo(logits.dtype).max)
        logits[i, seen] = torch.where(vals.isfinite(), finite, vals)
    return logits


def apply_penalties(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    """OpenAI's `logits - frequency_penalty * count - presence_penalty * (count > 0)` over the
    tokens generated so far, and `logit_bias` added to its tokens; rows without them are untouched."""
    rows = [
        i
        for i, r in enumerate(requests)
        if r.params.frequency_penalty or r.params.presence_penalty or r.params.logit_bias
    ]
    if not rows:
        return logits
    logits = logits.clone()
    vocab = logits.shape[-1]
    for i in rows:
        p = requests[i].params
        if (p.frequency_penalty or p.presence_penalty) and requests[i].output_token_ids:
            out = torch.tensor(requests[i].output_token_ids, device=logits.device, dtype=torch.long)
            counts = torch.bincount(out, minlength=vocab)[:vocab].to(logits.dtype)
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=logits.device, dtype=torch.long)
            bias = torch.tensor(list(p.logit_bias.values()), device=logits.device, dtype=logits.dtype)
            logits[i].index_add_(0, ids, bias)
    return logits


def apply_token_healing(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    """A healing request's first token may only be one that extends the prompt's removed last token
    (common/inference/healing.py); every other token is masked out of that row."""
    rows = [i for i, r in enumerate(requests) if r.heal_token_ids and not r.output_token_ids]
    if not rows:
        return logits
    logits = logits.clone()
    for i in rows:
        allowed = torch.tensor(requests[i].heal_token_ids, device=logits.device, dtype=torch.long)
        kept = logits[i, allowed]
        logits[i] = float("-inf")
        logits[i, allowed] = kept
    return logits


TopLogprobs = list[tuple[int, float]]


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, top: int
) -> tuple[list[float], list[TopLogprobs] | None]:
    """Raw-distribution logprobs of `tokens` [R] under `logits` [R, V], and the `top` most likely
    (token, logprob) per row (None when `top` is 0)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, tokens[:, None].to(lp.device))[:, 0].tolist()
    if not top:
        return chosen, None
    values, ids = torch.topk(lp, min(top, lp.shape[-1]), dim=-1)
    alts = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    return chosen, alts


def _scale(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits [V] / temperature, shifted so that the largest is 0 (the distribution is the same):
    a tiny temperature then sends the others to -inf instead of overflowing them to +inf, whose
    NaN probabilities would fail the whole step."""
    return (logits - logits.max()) / temperature


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

    def generator_for(self, req: Request, vocab: int) -> torch.Generator:
        if req.params.seed is None:
            return self.default_generator
        if req.generator is None:
            req.generator = torch.Generator(device=self.device)
            req.generator.manual_seed(int(req.params.seed))
            _skip_draws(req.generator, req.resumed_tokens, vocab, self.device)
        return req.generator

    def __call__(
        self, logits: torch.Tensor, requests: Sequence[Request]
    ) -> tuple[list[int], list[float] | None, list[TopLogprobs] | None]:
        """logits [B, V] float32 -> (token ids, chosen-token logprobs or None when nobody asked, the
        top alternatives per row or None when nobody asked)."""
        if all(r.plain_greedy for r in requests):
            return logits.argmax(dim=-1).tolist(), None, None  # the common case: one kernel, one sync
        want_logprobs = any(r.params.wants_logprobs for r in requests)
        raw = logits
        logits = apply_token_healing(logits, requests)
        logits = apply_penalties(apply_repetition_penalty(logits, requests), requests)
        greedy = [i for i, r in enumerate(requests) if r.params.greedy]
        tokens = torch.empty(len(requests), dtype=torch.long, device=logits.device)
        if greedy:
            gi = torch.tensor(greedy, device=logits.device)
            tokens[gi] = logits[gi].argmax(dim=-1)
        for i, req in enumerate(requests):
            if req.params.greedy:
                continue
            p = req.params
            row = _top_k_top_p(_scale(logits[i], p.temperature), p.top_k, p.top_p)
            probs = torch.softmax(row, dim=-1)
            tokens[i] = torch.multinomial(probs, 1, generator=self.generator_for(req, probs.shape[-1]))[0]
        if not want_logprobs:
            return tokens.tolist(), None, None
        top = max(r.params.top_logprobs for r in requests)
        logprobs, alts = token_logprobs(raw, tokens, top)
        return tokens.tolist(), logprobs, alts


def _skip_draws(gen: torch.Generator, draws: int, vocab: int, device: torch.device) -> None:
    """Advance `gen` past the `draws` tokens an earlier attempt of the request sampled (a failover
    continuation), so a seeded request goes on with the tokens it would have drawn. A draw consumes
    the same randomness whatever the probabilities, so uniform ones stand in for the real ones."""
    if draws <= 0:
        return
    uniform = torch.full((vocab,), 1.0 / vocab, device=device)
    for _ in range(draws):
        torch.multinomial(uniform, 1, generator=gen)
