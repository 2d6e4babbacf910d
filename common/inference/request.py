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

    def validate(self) -> None:
        if self.max_tokens <= 0:
            raise InvalidArgument(f"max_tokens must be > 0, got {self.max_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidArgument(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidArgument(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise InvalidArgument(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        self._validate_stops()

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
    status: Status = Status.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens reused from the prefix cache (first admission)
    num_preemptions: int = 0
    finish_reason: str | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    generator: torch.Generator | None = None
    admitted: bool = False
    # Incremental detokenizer and stop-string state (owned by the engine).
    text: str = ""
    emitted_text_len: int = 0
    detok_prefix_offset: int = 0
    detok_read_offset: int = 0

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
