"""OpenAI response bodies (completions and chat, whole and streamed) from the router's chunks.

Logprobs follow OpenAI: completions give `tokens`, `token_logprobs`, `top_logprobs` (a dict per
token holding the chosen token and the `logprobs` most likely) and `text_offset`; with `echo` the
prompt's tokens come first, the first of them with a null logprob. Chat gives `logprobs.content`,
one entry per token with its bytes and `top_logprobs`.
"""

from __future__ import annotations

import codecs
import math
from collections.abc import Sequence
from typing import Any

from tokenmill.v1 import inference_pb2

Json = dict[str, Any]


def usage(u: inference_pb2.Usage) -> dict[str, int]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    }


def _logprob(value: float) -> float | None:
    return None if math.isnan(value) else value


class Scored:
    """Tokens with their logprobs and alternatives, in the order they are reported."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.tokens: list[str] = []
        self.logprobs: list[float | None] = []
        self.tops: list[Sequence[inference_pb2.TokenLogprob] | None] = []

    def add(
        self,
        ids: Sequence[int],
        tokens: Sequence[str],
        logprobs: Sequence[float],
        tops: Sequence[inference_pb2.TokenLogprobs],
    ) -> None:
        self.ids.extend(ids)
        self.tokens.extend(tokens)
        self.logprobs.extend(_logprob(lp) for lp in logprobs)
        self.tops.extend(t.entries if t.entries else None for t in tops)
        self.tops.extend([None] * (len(self.tokens) - len(self.tops)))

    @classmethod
    def of(cls, source: inference_pb2.GenerateChunk | inference_pb2.GenerateResponse, echo: bool) -> Scored:
        """The echoed prompt (when asked) followed by the generated tokens of `source`."""
        scored = cls()
        if echo and source.HasField("prompt"):
            p = source.prompt
            scored.add(p.token_ids, p.tokens, p.logprobs or [math.nan] * len(p.tokens), p.top_logprobs)
        scored.add(source.token_ids, source.tokens, source.logprobs, source.top_logprobs)
        return scored


BYTES_PREFIX = "bytes:"  # OpenAI's text for a token whose bytes are not valid UTF-8 on their own


def token_bytes(token: str) -> bytes:
    """The bytes a logprobs token text stands for: "bytes:\\xNN..." parsed, else its UTF-8.
    (The replica writes that form: common.inference.tokenizer.token_text; kept here so the HTTP
    front imports no torch.)"""
    if token.startswith(BYTES_PREFIX):
        hexes = token[len(BYTES_PREFIX) :].split("\\x")[1:]
        try:
            return bytes(int(h, 16) for h in hexes)
        except ValueError:
            pass
    return token.encode("utf-8", "surrogatepass")


class CompletionLogprobs:
    """The legacy `logprobs` object; `text_offset` runs on across the chunks of one stream.

    An offset indexes the returned `text`: each token's bytes are read as text (the pieces of a split
    character count once, where the character completes) and matched against the text; a token whose
    text is not there (BOS, EOS: special tokens the text skips) stands at the current offset and adds
    nothing. SentencePiece's leading space, dropped from the start of a decode, is allowed for."""

    def __init__(self) -> None:
        self.offset = 0
        self.text = ""
        # the tokens' bytes as text, as the detokenizer reads them: a split character completes with
        # its last piece, an invalid sequence is one U+FFFD
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def _place(self, token: str) -> int:
        """The offset of `token`, moving past its text. Bytes an earlier token left incomplete that
        this one shows invalid (one U+FFFD) stand before it."""
        piece = self.decoder.decode(token_bytes(token))
        start = self.offset
        own = "" if token.startswith(BYTES_PREFIX) else token
        if own and piece.endswith(own):
            start += len(piece) - len(own)
        rest = self.text[self.offset :]
        if not piece:
            pass
        elif rest.startswith(piece) or piece.startswith(rest):  # the text may not have arrived yet
            self.offset += len(piece)
        elif piece[:1] == " " and (rest.startswith(piece[1:]) or piece[1:].startswith(rest)):
            self.offset += len(piece) - 1
        else:
            start = self.offset  # not in the text: a special token the text skips
        return start

    def block(self, scored: Scored, text: str = "") -> Json:
        self.text += text
        offsets = [self._place(token) for token in scored.tokens]
        tops = [_top_dict(*row) for row in zip(scored.tokens, scored.logprobs, scored.tops, strict=True)]
        return {
            "tokens": scored.tokens,
            "token_logprobs": scored.logprobs,
            "top_logprobs": tops,
            "text_offset": offsets,
            "token_ids": scored.ids,  # an extension (vLLM has one too): ids the tokens' text can hide
        }


def _top_dict(
    token: str, logprob: float | None, top: Sequence[inference_pb2.TokenLogprob] | None
) -> Json | None:
    """The alternatives keyed by token text (unique per id: see common.inference.tokenizer); were two
    ids to share a text, the likelier keeps it. The chosen token's entry is its own logprob, added
    when it is not among the top ones (OpenAI's logprobs+1)."""
    if logprob is None:
        return None  # the first prompt token has no distribution to draw alternatives from
    out: Json = {}
    for e in top or ():
        if e.token not in out or e.logprob > out[e.token]:
            out[e.token] = e.logprob
    out[token] = logprob
    return out


def chat_logprobs(scored: Scored) -> Json:
    def entry(token: str, logprob: float | None) -> Json:
        return {"token": token, "logprob": logprob, "bytes": list(token_bytes(token))}

    content = []
    for token, lp, top in zip(scored.tokens, scored.logprobs, scored.tops, strict=True):
        item = entry(token, lp)
        item["top_logprobs"] = [entry(e.token, e.logprob) for e in top or ()]
        content.append(item)
    return {"content": content}


class CompletionFormat:
    """`/v1/completions` bodies for one request."""

    object = chunk_object = "text_completion"

    def __init__(self, req: inference_pb2.GenerateRequest):
        self.sampling = req.sampling
        self.prompt_text = req.prompt
        self.logprobs = CompletionLogprobs() if req.sampling.logprobs else None

    def _text(self, source: inference_pb2.GenerateChunk | inference_pb2.GenerateResponse) -> str:
        if self.sampling.echo and source.HasField("prompt"):
            return (self.prompt_text or source.prompt.text) + source.text
        return source.text

    def choice(self, source: inference_pb2.GenerateChunk | inference_pb2.GenerateResponse) -> Json:
        block = None
        if self.logprobs is not None:
            block = self.logprobs.block(Scored.of(source, self.sampling.echo), self._text(source))
        return {
            "index": 0,
            "text": self._text(source),
            "finish_reason": source.finish_reason or None,
            "logprobs": block,
        }

    stream_choice = choice


class ChatFormat:
    """`/v1/chat/completions` bodies for one request."""

    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, req: inference_pb2.GenerateRequest):
        self.want_logprobs = req.sampling.logprobs
        self.started = False

    def _logprobs(self, source: inference_pb2.GenerateChunk | inference_pb2.GenerateResponse) -> Json | None:
        return chat_logprobs(Scored.of(source, False)) if self.want_logprobs else None

    def choice(self, resp: inference_pb2.GenerateResponse) -> Json:
        return {
            "index": 0,
            "message": {"role": "assistant", "content": resp.text},
            "finish_reason": resp.finish_reason or None,
            "logprobs": self._logprobs(resp),
        }

    def stream_choice(self, chunk: inference_pb2.GenerateChunk) -> Json:
        delta: Json = {"content": chunk.text}
        if not self.started:  # the first delta names the role, as OpenAI's do
            delta["role"] = "assistant"
            self.started = True
        return {
            "index": 0,
            "delta": delta,
            "finish_reason": chunk.finish_reason or None,
            "logprobs": self._logprobs(chunk),
        }
