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
import torch.nn.functional as F

from tokenmill.common.inference.config import EngineConfig
from tokenmill.common.inference.llm_engine import LLMEngine, build_engine
from tokenmill.common.inference.request import SamplingParams
from tokenmill.common.inference.tokenizer import Tokenizer
from tokenmill.common.model.quant import dequantize_state_dict
from tokenmill.common.model.transformer import ModelConfig, Transformer

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
        model = Transformer(ModelConfig.from_dict(model_config))
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
        """Sum of log p(continuation | context) and whether greedy decoding would produce it."""
        rows = [self._row(ctx, cont) for ctx, cont in pairs]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths pad least
        results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            for i, scored in zip(chunk, self._score([rows[i] for i in chunk]), strict=True):
                results[i] = scored
        return results

    def _row(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        if not continuation:
            raise ValueError("a continuation must have at least one token")
        whole = (context + continuation)[-(self.max_length + 1) :]
        return whole[:-1], continuation

    def _score(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        width = max(len(inp) for inp, _ in rows)
        device = next(self.model.parameters()).device
        batch = torch.zeros(len(rows), width, dtype=torch.long, device=device)
        for r, (inp, _) in enumerate(rows):
            batch[r, : len(inp)] = torch.tensor(inp)
        logits = self.model(batch)
        out = []
        for r, (inp, cont) in enumerate(rows):
            self.tokens_scored += len(inp)
            span = logits[r, len(inp) - len(cont) : len(inp)].float()
            target = torch.tensor(cont, device=device)
            logp = F.log_softmax(span, dim=-1).gather(1, target[:, None]).squeeze(1)
            out.append((float(logp.sum()), bool(torch.equal(span.argmax(-1), target))))
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


def _cut(text: str, until: Sequence[str]) -> str:
    """lm-eval cuts each generation at the first stop string."""
    for stop in until:
        if stop and stop in text:
            text = text.split(stop, 1)[0]
    return text
