"""What a task needs from a model: tokenization, log-likelihoods of continuations, and samples.

``LocalLM`` answers in-process: log-likelihoods from one batched forward of the training model
(``Transformer``, the same maths as HF), generations from the inference engine (paged KV cache,
continuous batching). Anything with these methods (e.g. a client of the served engine) can stand in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from tokenmill.common.inference.config import EngineConfig, model_config_from_dict
from tokenmill.common.inference.llm_engine import LLMEngine, build_engine
from tokenmill.common.inference.request import SamplingParams
from tokenmill.common.inference.tokenizer import Tokenizer
from tokenmill.common.model.quant import dequantize_state_dict
from tokenmill.common.model.transformer import Transformer

Pair = tuple[list[int], list[int]]  # (context ids, continuation ids)


class LanguageModel(Protocol):
    max_length: int
    prefix_token_id: int  # stands in for an empty context, as lm-eval does

    def encode(self, text: str) -> list[int]: ...

    def loglikelihood(self, pairs: Sequence[Pair]) -> list[tuple[float, bool]]: ...

    def generate(self, contexts: Sequence[list[int]], options: GenerationOptions) -> list[list[str]]: ...


@dataclass(frozen=True)
class GenerationOptions:
    max_tokens: int = 256
    until: tuple[str, ...] = ()
    temperature: float = 0.0
    samples: int = 1  # completions per context (pass@k)
    seed: int = 1234


class LocalLM:
    """An in-process model: the training model scores, the inference engine generates."""

    def __init__(self, model: Transformer, engine: LLMEngine, *, batch_size: int = 16, add_bos: bool = False):
        if engine.tokenizer is None:
            raise ValueError("evaluation needs the model's tokenizer")
        self.model = model.eval()
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.batch_size = batch_size
        self.add_bos = add_bos
        self.max_length = model.config.max_seq_len
        eos = model.config.eos_token_ids
        self.prefix_token_id = eos[0] if eos else 0
        self.tokens_scored = 0

    @classmethod
    def from_checkpoint(
        cls,
        tensors: Mapping[str, torch.Tensor],
        model_config: dict,
        tokenizer_json: str | bytes,
        *,
        batch_size: int = 16,
        engine_config: EngineConfig | None = None,
    ) -> LocalLM:
        """Any stored format: the engine serves it as stored, the scorer reads its dequantized weights."""
        model = Transformer(model_config_from_dict(model_config))  # native, HF or compressed config
        dense = dequantize_state_dict(tensors)
        if model.config.tie_embeddings:
            dense.pop("lm_head.weight", None)
            dense["lm_head.weight"] = dense["model.embed_tokens.weight"]
        model.load_state_dict(dense, strict=True)
        tokenizer = Tokenizer.from_json(tokenizer_json)
        engine = build_engine(tensors, model_config, engine_config or EngineConfig(), tokenizer)
        return cls(model, engine, batch_size=batch_size)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=self.add_bos)

    @torch.no_grad()
    def loglikelihood(self, pairs: Sequence[Pair]) -> list[tuple[float, bool]]:
        """Sum of log p(continuation | context) and whether greedy decoding would produce it.

        Continuations of one context share a sequence: the context once, then each continuation
        attending to the context and to itself only (a tree mask), so a 4-way multiple-choice
        question costs one context, not four; the vocabulary projection runs only on scored rows.
        """
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, cont) in enumerate(pairs):
            if not ctx or not cont:
                raise ValueError("context and continuation need at least one token each")
            groups.setdefault(tuple(ctx), []).append(i)
        packs = [p for ctx, members in groups.items() for p in self._packs(list(ctx), members, pairs)]
        packs.sort(key=lambda p: -len(p.tokens))  # similar lengths pad least
        results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        for start in range(0, len(packs), self.batch_size):
            for index, scored in self._score(packs[start : start + self.batch_size]):
                results[index] = scored
        return results

    def _packs(self, ctx: list[int], members: list[int], pairs: Sequence[Pair]) -> list[_Pack]:
        """One pack per context, or one per pair when the context must be cut (lm-eval's left cut)."""
        longest = max(len(pairs[i][1]) for i in members)
        if len(ctx) + longest <= self.max_length + 1:
            return [_Pack.build(ctx, [(i, pairs[i][1]) for i in members])]
        out = []
        for i in members:
            cont = pairs[i][1]
            whole = (ctx + cont)[-(self.max_length + 1) :]
            out.append(_Pack.build(whole[: len(whole) - len(cont)], [(i, cont)]))
        return out

    def _score(self, packs: list[_Pack]) -> list[tuple[int, tuple[float, bool]]]:
        device = next(self.model.parameters()).device
        width = max(len(p.tokens) for p in packs)
        tokens = torch.zeros(len(packs), width, dtype=torch.long)
        positions = torch.zeros(len(packs), width, dtype=torch.long)
        segments = torch.full((len(packs), width), -1, dtype=torch.long)
        for b, pack in enumerate(packs):
            n = len(pack.tokens)
            tokens[b, :n], positions[b, :n], segments[b, :n] = (
                torch.tensor(pack.tokens),
                torch.tensor(pack.positions),
                torch.tensor(pack.segments),
            )
        hidden = self.model.hidden_states(
            tokens.to(device), positions.to(device), _tree_mask(positions, segments).to(device)
        )
        # One vocabulary projection for every scored row of the batch, then split per pair.
        rows, targets, owners = [], [], []
        for b, pack in enumerate(packs):
            self.tokens_scored += len(pack.tokens)
            for index, pack_rows, target in pack.scored:
                rows += [b * width + r for r in pack_rows]
                targets += target
                owners.append((index, len(target)))
        flat = hidden.reshape(-1, hidden.size(-1))[torch.tensor(rows, device=device)]
        logits = self.model.lm_head(flat).float()
        want = torch.tensor(targets, device=device)
        logp = (logits.gather(1, want[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)).tolist()
        hits = (logits.argmax(-1) == want).tolist()
        out, at = [], 0
        for index, n in owners:
            out.append((index, (float(sum(logp[at : at + n])), all(hits[at : at + n]))))
            at += n
        return out

    def generate(self, contexts: Sequence[list[int]], options: GenerationOptions) -> list[list[str]]:
        params = SamplingParams(
            max_tokens=options.max_tokens,
            temperature=options.temperature,
            stop=options.until,
            seed=options.seed,
        )
        prompts = [ctx for ctx in contexts for _ in range(options.samples)]
        seeded = [SamplingParams(**{**vars(params), "seed": options.seed + i}) for i in range(len(prompts))]
        done = self.engine.generate(prompts, seeded)
        texts = [self.tokenizer.decode(list(req.output_token_ids)) for req in done]
        texts = [_cut(t, options.until) for t in texts]
        return [texts[i : i + options.samples] for i in range(0, len(texts), options.samples)]


@dataclass
class _Pack:
    """A context followed by its continuations, laid out for one tree-masked forward."""

    tokens: list[int]
    positions: list[int]
    segments: list[int]  # 0: context; k: the k-th continuation
    scored: list[tuple[int, list[int], list[int]]]  # (pair index, rows predicting it, its tokens)

    @classmethod
    def build(cls, ctx: list[int], continuations: list[tuple[int, list[int]]]) -> _Pack:
        n = len(ctx)
        pack = cls(list(ctx), list(range(n)), [0] * n, [])
        for k, (index, cont) in enumerate(continuations, start=1):
            start = len(pack.tokens)
            # token j of the continuation is predicted by the row before it: the context's last
            # token for j = 0, else the continuation's token j - 1 (laid out from `start`).
            rows = [n - 1] + list(range(start, start + len(cont) - 1))
            body = cont[:-1]  # the last token is only predicted, never an input
            pack.tokens += body
            pack.positions += range(n, n + len(body))
            pack.segments += [k] * len(body)
            pack.scored.append((index, rows, list(cont)))
        return pack


def _tree_mask(positions: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T]: a query sees earlier positions of the context and of its own continuation."""
    earlier = positions[:, None, :] <= positions[:, :, None]
    visible = (segments[:, None, :] == 0) | (segments[:, None, :] == segments[:, :, None])
    real = (segments[:, :, None] >= 0) & (segments[:, None, :] >= 0)
    eye = torch.eye(positions.size(1), dtype=torch.bool)[None]  # padding rows see themselves
    return ((earlier & visible & real) | eye)[:, None]


def _cut(text: str, until: Sequence[str]) -> str:
    """lm-eval cuts each generation at the first stop string."""
    for stop in until:
        if stop and stop in text:
            text = text.split(stop, 1)[0]
    return text
