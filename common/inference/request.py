"""A request's sampling parameters and live state inside the engine."""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field

import torch

from tokenmill.common.errors import InvalidArgument

# The engine's own ceilings on per-step work a request can ask for (stop strings are searched in the
# output at every step); the platform's configurable limits (config.inference_limits) are tighter.
MAX_STOP_SEQUENCES = 64
MAX_STOP_BYTES = 4096
MAX_STOP_TOKEN_IDS = 4096
MAX_TOP_LOGPROBS = 20  # OpenAI's ceiling
MAX_LOGIT_BIAS = 1024  # entries; each costs a scatter per step
# Prompt tokens decoded together with the output (vLLM's choice): a SentencePiece (Metaspace) decoder
# drops the leading space of the first token it sees, so output decoded on its own would lose the
# space between the prompt and the completion.
DETOKENIZE_CONTEXT = 5


@dataclass
class SamplingParams:
    """Per-request decoding controls (vLLM semantics; temperature 0 means greedy)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    ignore_eos: bool = False
    top_logprobs: int = 0  # alternatives returned per token (implies logprobs)
    frequency_penalty: float = 0.0  # OpenAI semantics: over generated tokens, times their count
    presence_penalty: float = 0.0  # ... once per distinct generated token
    logit_bias: dict[int, float] = field(default_factory=dict)
    echo: bool = False  # return the prompt's tokens, scored when logprobs are asked for
    prompt_only: bool = False  # with echo: score the prompt and generate nothing (OpenAI max_tokens=0)
    token_healing: bool = False  # back up over the prompt's last token (common/inference/healing.py)
    clamp_max_tokens: bool = False  # max_tokens is a default, not asked for: fit it to the context

    def validate(self) -> None:
        if self.prompt_only and not self.echo:
            raise InvalidArgument("max_tokens=0 only makes sense with echo=true (scoring the prompt)")
        if self.token_healing and self.echo:
            raise InvalidArgument(
                "token_healing and echo cannot be combined: healing rewrites the prompt's last token, "
                "so the echoed prompt would not be the one sent"
            )
        if self.max_tokens <= 0 and not self.prompt_only:
            raise InvalidArgument(f"max_tokens must be > 0, got {self.max_tokens}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidArgument(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not (math.isfinite(value) and -2.0 <= value <= 2.0):
                raise InvalidArgument(f"{name} must be in [-2, 2], got {value}")
        self._validate_logit_bias()
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidArgument(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidArgument(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise InvalidArgument(f"seed must be a 64-bit integer, got {self.seed}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise InvalidArgument(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        self._validate_stops()

    def _validate_logit_bias(self) -> None:
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidArgument(
                f"logit_bias has {len(self.logit_bias)} entries; at most {MAX_LOGIT_BIAS} are allowed"
            )
        for token, bias in self.logit_bias.items():
            if not (math.isfinite(bias) and -100.0 <= bias <= 100.0):
                raise InvalidArgument(f"logit_bias[{token}] must be in [-100, 100], got {bias}")

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids the request names (stop ids, logit_bias keys) must be in [0, vocab_size)."""
        for what, ids in (("stop token id", self.stop_token_ids), ("logit_bias token id", self.logit_bias)):
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise InvalidArgument(f"{what} {bad[0]} is outside the vocabulary [0, {vocab_size})")

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs or self.top_logprobs > 0

    @property
    def scores_prompt(self) -> bool:
        """The prompt's own logprobs are computed (echo with logprobs: lm-eval's loglikelihood)."""
        return self.echo and self.wants_logprobs

    @property
    def plain(self) -> bool:
        """No logits processing (penalties, bias): the sampler's fast path applies."""
        return (
            self.repetition_penalty == 1.0
            and self.frequency_penalty == 0.0
            and self.presence_penalty == 0.0
            and not self.logit_bias
        )

    def _validate_stops(self) -> None:
        if len(self.stop) > MAX_STOP_SEQUENCES:
            raise InvalidArgument(f"{len(self.stop)} stop strings; at most {MAX_STOP_SEQUENCES} are allowed")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidArgument(
                f"{len(self.stop_token_ids)} stop token ids; at most {MAX_STOP_TOKEN_IDS} are allowed"
            )
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidArgument("stop strings must be non-empty text")
            try:
                size = len(s.encode("utf-8"))
            except UnicodeEncodeError:
                raise InvalidArgument(
                    f"stop string {s[:40]!r} is not valid UTF-8 (lone surrogate?)"
                ) from None
            if size > MAX_STOP_BYTES:
                raise InvalidArgument(f"a stop string is {size} bytes; at most {MAX_STOP_BYTES} are allowed")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: str = ""
    eos_token_ids: tuple[int, ...] = ()
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    # Logprob of prompt token i+1 at index i, and its alternatives (echo with logprobs).
    prompt_logprobs: list[float] = field(default_factory=list)
    prompt_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens reused from the prefix cache (first admission)
    num_preemptions: int = 0
    finish_reason: str | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    generator: torch.Generator | None = None
    # Output tokens an earlier attempt generated (a failover continuation; the seeded sampler
    # skips the draws they took).
    resumed_tokens: int = 0
    plain_greedy: bool = field(init=False, default=False)  # set from params in __post_init__
    admitted: bool = False
    # Token healing: the first token must be one of these; its first `heal_text` characters
    # repeat the prompt's removed last token and are cut from `text`.
    heal_token_ids: tuple[int, ...] = ()
    heal_text: str = ""
    # Incremental detokenizer and stop-string state (owned by the engine); offsets index prompt +
    # output, starting DETOKENIZE_CONTEXT tokens before the prompt's end.
    text: str = ""
    emitted_text_len: int = 0
    detok_prefix_offset: int = field(init=False, default=0)
    detok_read_offset: int = field(init=False, default=0)
    healed_chars: int = field(init=False, default=0)  # len(heal_text) as made (heal_text is cut later)

    def __post_init__(self) -> None:
        self.healed_chars = len(self.heal_text)
        self.detok_read_offset = len(self.prompt_token_ids)
        self.detok_prefix_offset = max(0, self.detok_read_offset - DETOKENIZE_CONTEXT)
        self.refresh_fast_path()

    def refresh_fast_path(self) -> None:
        """Greedy, unprocessed, no logprobs, nothing to heal: the sampler's one-kernel fast path
        (checked every step; healing constrains only the first token)."""
        p = self.params
        healing = bool(self.heal_token_ids) and not self.output_token_ids
        self.plain_greedy = p.greedy and p.plain and not p.wants_logprobs and not healing

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
