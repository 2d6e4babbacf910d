"""LLMEngine: requests in, token deltas out, one scheduler step at a time.

Single-threaded by design (like vLLM's EngineCore); `AsyncEngine` runs it on a thread and fans
out per-request streams. `add_request` validates everything a client can get wrong and raises
tokenmill.common.errors (INVALID_ARGUMENT / NOT_FOUND / RESOURCE_EXHAUSTED) before anything is queued.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch

from tokenmill.common.errors import InvalidArgument, NotFound, ResourceExhausted
from tokenmill.common.inference.block_manager import BlockManager
from tokenmill.common.inference.config import EngineConfig, ModelSpec
from tokenmill.common.inference.lora import LoraAdapter
from tokenmill.common.inference.model import PagedLlama
from tokenmill.common.inference.request import DETOKENIZE_CONTEXT, Request, SamplingParams, Status
from tokenmill.common.inference.runner import ModelRunner
from tokenmill.common.inference.sampler import Sampler, TopLogprobs, token_logprobs
from tokenmill.common.inference.scheduler import Scheduler
from tokenmill.common.inference.stats import EngineStats
from tokenmill.common.inference.tokenizer import Tokenizer, detokenize_incrementally

log = logging.getLogger(__name__)


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    time_to_first_token_s: float
    total_time_s: float


# A position's most likely tokens: (token id, logprob, token text), most likely first.
NamedLogprobs = list[tuple[int, float, str]]


@dataclass
class PromptScores:
    """The prompt as the model saw it (echo): its tokens and, when logprobs were asked for, each
    token's logprob given the ones before (None for the first, as in OpenAI) and alternatives."""

    token_ids: list[int]
    tokens: list[str]
    text: str
    logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[NamedLogprobs | None] = field(default_factory=list)


@dataclass
class RequestOutput:
    """What one step produced for one request (a delta; `usage` only on the final output)."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    finished: bool = False
    finish_reason: str = ""  # "stop" | "length" | "abort"
    usage: Usage | None = None
    top_logprobs: list[NamedLogprobs] = field(default_factory=list)  # per token, when asked for
    tokens: list[str] = field(default_factory=list)  # each token's text, when logprobs are asked for
    prompt: PromptScores | None = None  # on the first output, when echo is set


@dataclass
class HeldToken:
    """One generated token on its way out: its id and, when logprobs are asked for, its logprob,
    text and alternatives."""

    token_id: int
    logprob: float | None = None
    text: str = ""
    top: NamedLogprobs | None = None


class EngineObserver(Protocol):
    """Hook for metrics; the replica service exports these to Prometheus with vLLM names."""

    def on_first_token(self, ttft_s: float) -> None: ...
    def on_token(self, inter_token_s: float) -> None: ...
    def on_finish(self, e2e_s: float, prompt_tokens: int, completion_tokens: int) -> None: ...


@dataclass(frozen=True)
class Continued:
    """A request resumed on this replica after the one serving it died: the last `tokens` of its
    prompt were generated there, and `text_chars` characters of their text reached the client."""

    tokens: int
    text_chars: int = 0


def continue_request(req: Request, continued: Continued) -> Request:
    """`req` with the last `continued.tokens` prompt tokens moved back to its output, so that they
    count as generated (frequency/presence penalties, max_tokens, usage) and their text is decoded
    with what comes next: text another replica held back (a stop string's possible start, an
    incomplete UTF-8 character) still reaches the client, and a stop string spanning the two
    attempts still stops. Only the characters past `text_chars` are emitted."""
    k = continued.tokens
    if not 0 <= k < len(req.prompt_token_ids) or continued.text_chars < 0:
        raise InvalidArgument(
            f"a continuation of {k} generated tokens ({continued.text_chars} characters sent) does not fit "
            f"its {len(req.prompt_token_ids)}-token prompt"
        )
    if k == 0:
        return req
    out = Request(
        req.request_id,
        req.prompt_token_ids[:-k],
        dataclasses.replace(req.params, max_tokens=req.params.max_tokens + k),
        adapter=req.adapter,
        eos_token_ids=req.eos_token_ids,
        output_token_ids=req.prompt_token_ids[-k:],
    )
    out.emitted_text_len = continued.text_chars
    out.resumed_tokens = k
    return out


def kv_tokens(prompt_len: int, max_tokens: int) -> int:
    """The most tokens a request ever holds in the KV cache: its prompt and every new token but the
    last, which is sampled and returned without being fed back through the model."""
    return prompt_len + max(max_tokens - 1, 0)


class LLMEngine:
    def __init__(
        self,
        model: PagedLlama,
        config: EngineConfig,
        tokenizer: Tokenizer | None = None,
        observer: EngineObserver | None = None,
    ):
        self.model = model
        self.spec: ModelSpec = model.spec
        self.config = config
        self.tokenizer = tokenizer
        self.observer = observer
        self.max_model_len = config.resolve_max_model_len(self.spec)
        num_blocks = config.resolve_num_blocks(self.spec)
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.blocks,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=max(config.max_num_batched_tokens, 1),
        )
        self.runner = ModelRunner(
            model,
            self.blocks,
            use_cuda_graphs=config.use_cuda_graphs,
            cuda_graph_max_batch=config.cuda_graph_max_batch,
            max_blocks_per_seq=config.max_blocks_per_seq(self.spec),
        )
        self.sampler = Sampler(model.device)
        self.adapters: dict[str, LoraAdapter] = {}
        self.requests: dict[str, Request] = {}
        # Per request with stop strings, the tokens whose text the detokenizer still holds back (an
        # incomplete UTF-8 sequence): they go out with their text, so a stop string completed inside
        # them cuts the ones after it.
        self._held: dict[str, list[HeldToken]] = {}
        self._ids = itertools.count()
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.steps = 0

    # ------------------------------------------------------------------ adapters

    def add_adapter(self, adapter: LoraAdapter) -> None:
        """Register an adapter (engine thread only: moving its weights to the GPU here keeps all
        device work on one thread, which CUDA-graph capture requires)."""
        if adapter.weights and max(layer for layer, _ in adapter.weights) >= self.spec.num_layers:
            raise InvalidArgument(f"adapter {adapter.name!r} has more layers than the base model")
        dev, dt = self.model.device, self.model.dtype
        adapter.weights = {k: (a.to(dev, dt), b.to(dev, dt)) for k, (a, b) in adapter.weights.items()}
        self.adapters[adapter.name] = adapter

    # ------------------------------------------------------------------ requests

    def make_request(
        self,
        *,
        prompt: str | None = None,
        prompt_token_ids: Iterable[int] | None = None,
        params: SamplingParams | None = None,
        request_id: str = "",
        adapter: str = "",
        messages: list[dict[str, str]] | None = None,
        continued: Continued | None = None,
    ) -> Request:
        """Validate and build a Request without touching engine state (safe from any thread).
        `messages` (a chat) are rendered with the model's chat template and tokenized as HF's
        `apply_chat_template` does (no special tokens added beyond the template's own).
        `continued`: the prompt ends with tokens another replica already generated (failover)."""
        # A copy: resolving max_tokens below must not change the caller's object (one SamplingParams
        # shared by several requests would carry the first prompt's resolved max_tokens to the rest).
        params = dataclasses.replace(params) if params is not None else SamplingParams()
        if continued is not None:
            params.echo = params.token_healing = False  # the prompt went out with the first attempt
        ids = list(prompt_token_ids or [])
        if messages:
            if self.tokenizer is None:
                raise InvalidArgument("this model has no tokenizer, so it cannot render a chat")
            text = self.tokenizer.render_chat(messages)
            ids = self.tokenizer.encode(text, max_tokens=self.max_model_len, add_special_tokens=False)
        if not ids:
            if not prompt:
                raise InvalidArgument("the prompt is empty: give prompt text or prompt_token_ids")
            if self.tokenizer is None:
                raise InvalidArgument("this model has no tokenizer; send prompt_token_ids instead of text")
            ids = self.tokenizer.encode(
                prompt, max_tokens=self.max_model_len
            )  # refused before tokenizing when too long
            if not ids:
                raise InvalidArgument("the prompt tokenizes to zero tokens")
        bad = [t for t in ids if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise InvalidArgument(
                f"prompt token id {bad[0]} is outside the vocabulary [0, {self.spec.vocab_size})"
            )
        if params.prompt_only and len(ids) <= self.max_model_len:
            pass  # scoring only: the whole context may be prompt
        elif len(ids) >= self.max_model_len:
            raise InvalidArgument(
                f"the prompt has {len(ids)} tokens but the context is {self.max_model_len}; "
                "shorten it to leave room for at least one new token"
            )
        room = self.max_model_len - len(ids)
        if params.prompt_only:
            params.max_tokens = 0
        elif params.max_tokens == 0:  # not asked for: as many as the context and the KV pool hold
            params.max_tokens = self._fit_pool(len(ids), min(self.config.default_max_tokens, room))
        elif params.clamp_max_tokens:
            params.max_tokens = self._fit_pool(len(ids), min(params.max_tokens, room))
        params.validate()
        params.check_vocab(self.spec.vocab_size)
        if params.max_tokens > room:
            raise InvalidArgument(
                f"max_tokens={params.max_tokens} plus the {len(ids)}-token prompt exceeds the context of "
                f"{self.max_model_len}; use max_tokens <= {room}"
            )
        if adapter and adapter not in self.adapters:
            raise NotFound(
                f"LoRA adapter {adapter!r} is not loaded on this replica; loaded: {sorted(self.adapters)}"
            )
        # With a sliding window on every layer, blocks behind the window are released as it moves on.
        chunk = self.scheduler.max_num_batched_tokens
        need = self.blocks.peak_blocks(kv_tokens(len(ids), params.max_tokens), chunk)
        if self.blocks.peak_blocks(len(ids), chunk) > self.blocks.usable_blocks:
            raise ResourceExhausted(
                f"the {len(ids)}-token prompt alone needs more KV blocks than the replica's pool of "
                f"{self.blocks.usable_blocks} ({self.blocks.block_size} tokens each) holds; shorten the prompt or "
                "give the replica more KV memory"
            )
        if need > self.blocks.usable_blocks:
            raise ResourceExhausted(
                f"the request needs {need} KV blocks at once ({len(ids)} prompt + {params.max_tokens} new tokens) but the "
                f"replica's pool has {self.blocks.usable_blocks}; lower max_tokens or give the replica more KV memory"
            )
        rid = request_id or f"req-{next(self._ids)}-{time.monotonic_ns()}"
        eos = () if params.ignore_eos else self.spec.eos_token_ids
        ids, allowed, dropped = self._heal(ids) if params.token_healing else (ids, (), "")
        req = Request(
            rid, ids, params, adapter=adapter, eos_token_ids=eos, heal_token_ids=allowed, heal_text=dropped
        )
        return continue_request(req, continued) if continued is not None else req

    def _fit_pool(self, prompt_len: int, max_tokens: int) -> int:
        """`max_tokens` lowered to what the KV pool can hold beside the prompt (a default the client
        did not ask for must not turn into RESOURCE_EXHAUSTED); at least 1, so that a prompt the pool
        cannot hold at all is still refused with the reason."""
        chunk, usable = self.scheduler.max_num_batched_tokens, self.blocks.usable_blocks
        lo, hi = 1, max(max_tokens, 1)
        while lo < hi:  # peak_blocks grows with the length: the largest count that fits
            mid = (lo + hi + 1) // 2
            if self.blocks.peak_blocks(kv_tokens(prompt_len, mid), chunk) <= usable:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _heal(self, ids: list[int]) -> tuple[list[int], tuple[int, ...], str]:
        """Token healing (common/inference/healing.py): the prompt without its last token, the tokens
        the first new one may be, and the dropped text to cut from the output (the prompt unchanged
        when healing would change nothing)."""
        if self.tokenizer is None:
            raise InvalidArgument("token_healing needs the model's tokenizer, and this model has none")
        healing = self.tokenizer.healer.heal(ids)
        if healing is None:
            return ids, (), ""
        tail = healing.prompt_token_ids[-DETOKENIZE_CONTEXT:]
        dropped = self.tokenizer.decode([*tail, ids[-1]])[len(self.tokenizer.decode(tail)) :]
        return healing.prompt_token_ids, healing.allowed_token_ids, dropped

    def add(self, req: Request) -> None:
        """Queue a validated request (engine thread only)."""
        if req.request_id in self.requests:
            raise InvalidArgument(f"request id {req.request_id!r} is already in use")
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise ResourceExhausted(
                f"{len(self.scheduler.waiting)} requests are already waiting on this replica; retry later"
            )
        self.requests[req.request_id] = req
        self.scheduler.add(req)

    def add_request(self, **kwargs) -> Request:
        req = self.make_request(**kwargs)
        self.add(req)
        return req

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        self._held.pop(request_id, None)
        if req is None:
            return None
        self.scheduler.remove(req)
        req.status = Status.FINISHED
        req.finish_reason = "abort"
        return RequestOutput(request_id, finished=True, finish_reason="abort", usage=self._usage(req))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ------------------------------------------------------------------ step

    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if not sched.items:
            return []
        logits, sample_idx, prompt_rows = self.runner.execute(sched.items, self.adapters)
        self.steps += 1
        for it in sched.items:
            req = it.request
            req.num_computed_tokens += it.num_tokens
            self.blocks.commit(req.request_id, req.all_token_ids, req.num_computed_tokens, req.adapter)
        if prompt_rows:
            self._score_prompt(
                logits[len(sample_idx) :], [sched.items[i].request for i, _, _ in prompt_rows], prompt_rows
            )
        if not sample_idx:
            return []
        now = time.monotonic()
        outputs: list[RequestOutput] = []
        sampling_reqs: list[Request] = []
        rows: list[int] = []
        for j, i in enumerate(sample_idx):
            req = sched.items[i].request
            if req.params.prompt_only:
                outputs.append(self._finish_scored(req, now))
            else:
                sampling_reqs.append(req)
                rows.append(j)
        if not sampling_reqs:
            return outputs
        sample_logits = logits[: len(sample_idx)]
        if len(rows) != len(sample_idx):
            sample_logits = sample_logits[torch.tensor(rows, device=sample_logits.device)]
        tokens, logprobs, alts = self.sampler(sample_logits, sampling_reqs)
        for j, (req, tok) in enumerate(zip(sampling_reqs, tokens, strict=True)):
            lp = None if logprobs is None else logprobs[j]
            outputs.append(self._append_token(req, tok, lp, None if alts is None else alts[j], now))
        return outputs

    def _score_prompt(
        self, logits: torch.Tensor, reqs: list[Request], spans: list[tuple[int, int, int]]
    ) -> None:
        """Record prompt-token logprobs: row k of a span starting at position p scores token p+k+1."""
        targets = [
            t
            for req, (_, first, n) in zip(reqs, spans, strict=True)
            for t in req.prompt_token_ids[first + 1 : first + 1 + n]
        ]
        top = max(r.params.top_logprobs for r in reqs)
        chosen, alts = token_logprobs(logits, torch.tensor(targets, dtype=torch.long), top)
        row = 0
        # The runner's spans start where scoring stopped (a recompute after preemption scores
        # nothing twice) and scored requests never start from a prefix hit: rows append in order.
        for req, (_, _, n) in zip(reqs, spans, strict=True):
            req.prompt_logprobs.extend(chosen[row : row + n])
            if req.params.top_logprobs:
                k = req.params.top_logprobs
                req.prompt_top_logprobs.extend(a[:k] for a in (alts or [])[row : row + n])
            row += n

    def _prompt_scores(self, req: Request) -> PromptScores:
        ids = req.prompt_token_ids
        tok = self.tokenizer
        scores = PromptScores(list(ids), self._token_texts(ids), tok.decode(ids) if tok else "")
        if req.params.scores_prompt:
            scores.logprobs = [None, *req.prompt_logprobs]
            if req.params.top_logprobs:
                scores.top_logprobs = [None, *(self._named(a) for a in req.prompt_top_logprobs)]
        return scores

    def _token_texts(self, ids: list[int]) -> list[str]:
        """Each token's text; "" per token for a model without a tokenizer (one entry per logprob)."""
        return self.tokenizer.token_texts(ids) if self.tokenizer else [""] * len(ids)

    def _named(self, alts: TopLogprobs) -> NamedLogprobs:
        texts = self._token_texts([t for t, _ in alts])
        return [(t, lp, s) for (t, lp), s in zip(alts, texts, strict=True)]

    def _finish_scored(self, req: Request, now: float) -> RequestOutput:
        """A prompt-only request (echo, max_tokens 0): its prompt is scored, nothing is generated."""
        req.first_token_time = req.last_token_time = now
        self.prompt_tokens_total += len(req.prompt_token_ids)
        out = RequestOutput(req.request_id, prompt=self._prompt_scores(req))
        self._finish(req, "length", out)
        return out

    def _append_token(
        self, req: Request, tok: int, logprob: float | None, alts: TopLogprobs | None, now: float
    ) -> RequestOutput:
        req.output_token_ids.append(tok)
        self.generation_tokens_total += 1
        if self.observer is not None:
            if req.last_token_time is None:  # no token yet: set with first_token_time below
                self.observer.on_first_token(now - req.arrival_time)
            else:
                self.observer.on_token(now - req.last_token_time)
        out = RequestOutput(req.request_id)
        if req.first_token_time is None:
            req.first_token_time = now
            self.prompt_tokens_total += len(req.prompt_token_ids)
            if req.params.echo:
                out.prompt = self._prompt_scores(req)
        req.last_token_time = now
        held = HeldToken(tok)
        if req.params.wants_logprobs and logprob is not None:
            req.output_logprobs.append(logprob)
            held.logprob, held.text = logprob, self._token_texts([tok])[0]
            if req.params.top_logprobs and alts is not None:
                held.top = self._named(alts[: req.params.top_logprobs])
        pending = [held]
        p = req.params
        reason = ""
        if tok in p.stop_token_ids or tok in req.eos_token_ids:
            reason = "stop"
        elif len(req.output_token_ids) >= p.max_tokens or req.num_tokens >= self.max_model_len:
            reason = "length"
        if req.heal_token_ids and len(req.output_token_ids) == 1:
            req.refresh_fast_path()  # healing constrained only this first token
        if self.tokenizer is not None:
            pending = self._held.pop(req.request_id, []) + pending
            read, prefix, before, healing = (
                req.detok_read_offset,
                req.detok_prefix_offset,
                len(req.text),
                bool(req.heal_text),
            )
            detokenize_incrementally(self.tokenizer, req, final=bool(reason))
            if p.stop and req.detok_read_offset == read:
                # nothing released: with stop strings the tokens wait for their text, which may
                # complete a stop string before the newest of them
                self._held[req.request_id], pending = pending, []
            if req.heal_text and (reason or len(req.text) >= len(req.heal_text)):
                req.text = req.text.removeprefix(req.heal_text)  # the prompt's own text, generated again
                req.heal_text = ""
            if p.stop:
                found = self._find_stop(req)
                if found is not None:
                    req.text = req.text[: found[0]]
                    reason = "stop"
                    if len(pending) > 1 and not healing:
                        keep = self._tokens_through(req, len(pending), read, prefix, found[1] - before)
                        pending = self._drop_tokens(req, pending, keep)
            hold = 0 if reason else (max(len(s) for s in p.stop) - 1 if p.stop else 0)
            if req.heal_text:  # not yet past the healed prompt text: nothing is the caller's yet
                hold = len(req.text)
            end = max(req.emitted_text_len, len(req.text) - hold)
            out.text = req.text[req.emitted_text_len : end]
            req.emitted_text_len = end
        for h in pending:
            out.token_ids.append(h.token_id)
            if h.logprob is not None:
                out.logprobs.append(h.logprob)
                out.tokens.append(h.text)
                if h.top is not None:
                    out.top_logprobs.append(h.top)
        if reason:
            self._finish(req, reason, out)
        return out

    def _tokens_through(self, req: Request, n: int, read: int, prefix: int, end: int) -> int:
        """How many of the `n` tokens just released (their text starting at detokenizer offsets
        `read`/`prefix`) it takes to produce `end` new characters: the stop string ends there."""
        assert self.tokenizer is not None
        ids = req.prompt_token_ids + req.output_token_ids
        base = self.tokenizer.decode(ids[prefix:read])
        for j in range(1, n):
            new = self.tokenizer.decode(ids[prefix : read + j])[len(base) :]
            if len(new.rstrip("\ufffd")) >= end:  # a trailing U+FFFD: a character still incomplete
                return j
        return n

    def _drop_tokens(self, req: Request, pending: list[HeldToken], keep: int) -> list[HeldToken]:
        """`pending` (the request's newest tokens) cut to its first `keep`: the rest came after the
        stop string completed, so they leave the output, its logprobs and the usage count."""
        drop = pending[keep:]
        if drop:
            del req.output_token_ids[-len(drop) :]
            scored = sum(h.logprob is not None for h in drop)
            if scored:
                del req.output_logprobs[-scored:]
        return pending[:keep]

    def _find_stop(self, req: Request) -> tuple[int, int] | None:
        """(start, end) of the earliest stop string in the text not yet emitted, or None."""
        longest = max(len(s) for s in req.params.stop)
        # Only the tail that changed can contain a new match.
        start = max(0, req.emitted_text_len - longest)
        best = None
        for s in req.params.stop:
            i = req.text.find(s, start)
            if i != -1 and (best is None or i < best[0]):
                best = (i, i + len(s))
        return best

    def _finish(self, req: Request, reason: str, out: RequestOutput) -> None:
        req.status = Status.FINISHED
        req.finish_reason = reason
        self.scheduler.remove(req)
        self.requests.pop(req.request_id, None)
        self._held.pop(req.request_id, None)
        out.finished = True
        out.finish_reason = reason
        out.usage = self._usage(req)
        if self.observer is not None:
            self.observer.on_finish(
                out.usage.total_time_s, len(req.prompt_token_ids), len(req.output_token_ids)
            )

    def _usage(self, req: Request) -> Usage:
        now = time.monotonic()
        return Usage(
            prompt_tokens=len(req.prompt_token_ids),
            completion_tokens=len(req.output_token_ids),
            cached_prompt_tokens=req.num_cached_tokens,
            time_to_first_token_s=(req.first_token_time - req.arrival_time) if req.first_token_time else 0.0,
            total_time_s=now - req.arrival_time,
        )

    # ------------------------------------------------------------------ convenience

    def generate(
        self, prompts: Iterable[list[int] | str], params: SamplingParams | Iterable[SamplingParams]
    ) -> list[Request]:
        """Run a batch to completion (tests, benchmarks); returns the finished Requests in order."""
        prompts = list(prompts)
        plist = list(params) if not isinstance(params, SamplingParams) else [params] * len(prompts)
        reqs = []
        for p, sp in zip(prompts, plist, strict=True):
            sp = SamplingParams(**vars(sp))
            kw = {"prompt": p} if isinstance(p, str) else {"prompt_token_ids": p}
            reqs.append(self.add_request(params=sp, **kw))
        while self.has_unfinished():
            self.step()
        return reqs

    # ------------------------------------------------------------------ stats

    def stats(self) -> EngineStats:
        return EngineStats(
            requests_running=len(self.scheduler.running),
            requests_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.blocks.usage(),
            kv_blocks_total=self.blocks.usable_blocks,
            kv_blocks_free=self.blocks.num_free(),
            prefix_cache_queries=self.blocks.prefix_queries,
            prefix_cache_hits=self.blocks.prefix_hits,
            preemptions=self.scheduler.num_preemptions,
            prompt_tokens=self.prompt_tokens_total,
            generation_tokens=self.generation_tokens_total,
        )


def build_engine(
    tensors: Mapping[str, torch.Tensor],
    model_config: dict,
    config: EngineConfig | None = None,
    tokenizer: Tokenizer | None = None,
    observer: EngineObserver | None = None,
) -> LLMEngine:
    """Checkpoint tensors + config dict -> a ready engine (dense or quantized weights)."""
    config = config or EngineConfig()
    spec = ModelSpec.from_dict(model_config)
    if tokenizer is not None and tokenizer.vocab_size > spec.vocab_size:
        raise InvalidArgument(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {spec.vocab_size}"
        )
    model = PagedLlama(spec, dict(tensors), dtype=config.dtype, device=config.device)
    if config.gpu_memory_utilization > 0 and model.device.type == "cuda" and config.num_blocks is None:
        config.kv_cache_memory_bytes = kv_budget_from_gpu(config, model)
    return LLMEngine(model, config, tokenizer, observer)


def kv_budget_from_gpu(config: EngineConfig, model: PagedLlama) -> int:
    """Bytes for the KV pool: the utilisation target minus what is already used, minus activations."""
    free, total = torch.cuda.mem_get_info(model.device)
    used = total - free
    budget = int(config.gpu_memory_utilization * total) - used - config.activation_reserve_bytes
    per_block = model.spec.kv_bytes_per_token(config.dtype) * config.block_size
    need = per_block * config.max_blocks_per_seq(model.spec)
    if budget < need:
        raise ResourceExhausted(
            f"after loading the weights only {max(budget, 0) / 2**30:.2f} GiB are left for the KV cache at "
            f"gpu_memory_utilization={config.gpu_memory_utilization}, but one full-length sequence needs "
            f"{need / 2**30:.2f} GiB; raise the utilisation, lower max_model_len, or quantize the weights"
        )
    return budget
