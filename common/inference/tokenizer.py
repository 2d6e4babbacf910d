"""Tokenizer wrapper and incremental, UTF-8 safe detokenization.

Byte-level BPE splits a multi-byte character across tokens; decoding a partial sequence then
yields U+FFFD. The incremental decoder (TGI/vLLM's prefix/read offsets) only releases text once
the newest tokens decode to complete characters, and decodes a short window, not the whole output.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime
from functools import cached_property
from typing import Any

from tokenmill.common.errors import InvalidArgument
from tokenmill.common.inference.healing import TokenHealer
from tokenmill.common.inference.request import Request

log = logging.getLogger(__name__)

MIN_TOKEN_BYTES = 4  # one UTF-8 character: no token bound is tighter than this
# The named special tokens HF passes to a chat template (PreTrainedTokenizerBase.special_tokens_map).
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)

PYTHON_TEMPLATE_ERRORS = (TypeError, ValueError, ArithmeticError, LookupError)


class ChatTemplate:
    """A model's chat template (tokenizer_config.json `chat_template`, or chat_template.jinja),
    rendered as transformers' `apply_chat_template` renders it: jinja2's immutable sandbox with
    trim_blocks/lstrip_blocks, loop controls, HF's `{% generation %}` tag, `tojson`,
    `raise_exception` and `strftime_now`, and the named special tokens as variables. jinja2 is
    imported here, not by the engine. A template that does not compile refuses only chats (as HF's
    tokenizer loads and encodes without compiling it): the model still serves completions."""

    def __init__(self, source: str, special_tokens: dict[str, str]):
        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class Generation(Extension):
            """`{% generation %}...{% endgeneration %}` (HF's AssistantTracker, which marks the
            assistant's tokens for training masks): renders its body unchanged."""

            tags = {"generation"}

            def parse(self, parser: Any) -> Any:
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                call = self.call_method("_body")
                return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

            def _body(self, caller: Any) -> str:
                return caller()

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
            return json.dumps(
                x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
            )

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols]
        )
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        # What a template may raise on the messages it is given: its own raise_exception and jinja's
        # errors, and Python's from the expressions it evaluates (`content + 1`, a sandbox range cap).
        self.errors = (jinja2.exceptions.TemplateError, *PYTHON_TEMPLATE_ERRORS)
        self.template: Any = None
        self.compile_error = ""
        try:
            self.template = env.from_string(source)
        except jinja2.exceptions.TemplateError as exc:
            self.compile_error = f"the model's chat template does not compile: {exc}"
            log.warning("%s; chat requests will be refused", self.compile_error)
        self.special_tokens = special_tokens

    @classmethod
    def from_files(
        cls,
        tokenizer_config: bytes | None,
        template_file: bytes | None,
        special_tokens_map: bytes | None = None,
    ) -> ChatTemplate | None:
        """The template from chat_template.jinja or tokenizer_config.json; None when neither has one.
        Its special tokens come from tokenizer_config.json, else special_tokens_map.json (older HF
        saves name them only there; HF's tokenizer reads both)."""
        config = json.loads(tokenizer_config) if tokenizer_config else {}
        source = template_file.decode("utf-8") if template_file else config.get("chat_template")
        if isinstance(source, list):  # named templates: HF uses "default"
            source = next((t.get("template") for t in source if t.get("name") == "default"), None)
        if not isinstance(source, str) or not source:
            return None
        special = json.loads(special_tokens_map) if special_tokens_map else {}
        tokens = special_token_strings(special if isinstance(special, dict) else {})
        tokens.update(special_token_strings(config))
        return cls(source, tokens)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation as the prompt text; a template's own refusal is INVALID_ARGUMENT."""
        if self.template is None:
            raise InvalidArgument(self.compile_error)
        try:
            return self.template.render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except self.errors as exc:
            why = f"{type(exc).__name__}: {exc}" if isinstance(exc, PYTHON_TEMPLATE_ERRORS) else str(exc)
            raise InvalidArgument(f"the model's chat template refused these messages: {why}") from None


def special_token_strings(config: dict[str, Any]) -> dict[str, str]:
    """tokenizer_config.json's named special tokens as strings (AddedToken dicts give `content`)."""
    out = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[name] = value
    return out


class Tokenizer:
    """Wraps a `tokenizers.Tokenizer` (imported lazily: the engine itself needs only torch).

    `max_input_bytes` (None = no fixed cap) bounds every text `encode` accepts, checked before any
    tokenization so an oversized prompt costs microseconds, not seconds and gigabytes."""

    def __init__(self, tok, max_input_bytes: int | None = None, chat_template: ChatTemplate | None = None):
        self.tok = tok
        self.chat_template = chat_template
        self.vocab_size = tok.get_vocab_size()
        self.max_input_bytes = max_input_bytes
        self.max_token_bytes = longest_token_bytes(tok)

    @classmethod
    def from_json(cls, data: bytes | str, max_input_bytes: int | None = None) -> Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        text = data.decode("utf-8") if isinstance(data, bytes) else data
        try:
            return cls(HFTokenizer.from_str(text), max_input_bytes)
        except Exception as exc:  # tokenizers raises plain Exception subclasses
            raise InvalidArgument(f"tokenizer.json could not be parsed: {exc}") from None

    @classmethod
    def from_files(cls, files: dict[str, bytes], max_input_bytes: int | None = None) -> Tokenizer:
        """From a checkpoint's files: tokenizer.json, and the chat template HF saves beside it
        (tokenizer_config.json's `chat_template`, or chat_template.jinja), rendered with the special
        tokens of tokenizer_config.json and special_tokens_map.json."""
        tok = cls.from_json(files["tokenizer.json"], max_input_bytes)
        try:
            tok.chat_template = ChatTemplate.from_files(
                files.get("tokenizer_config.json"),
                files.get("chat_template.jinja"),
                files.get("special_tokens_map.json"),
            )
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidArgument(
                f"tokenizer_config.json / special_tokens_map.json / chat_template.jinja cannot be read: {exc}"
            ) from None
        return tok

    @cached_property
    def healer(self) -> TokenHealer:
        """Built on the first token_healing request (it sorts the vocabulary once)."""
        return TokenHealer(self.tok)

    def prompt_byte_limit(self, max_tokens: int | None = None) -> int | None:
        """The most UTF-8 bytes a text may have: `max_input_bytes`, and, given `max_tokens`, the
        bytes that many of the longest tokens cover (any longer text has more tokens than that)."""
        limits = [] if self.max_input_bytes is None else [self.max_input_bytes]
        if max_tokens is not None:
            limits.append(max_tokens * self.max_token_bytes)
        return min(limits, default=None)

    def encode(
        self, text: str, max_tokens: int | None = None, *, add_special_tokens: bool = True
    ) -> list[int]:
        """Token ids of `text` as HF's tokenizer gives them by default: the tokenizer.json's
        post-processor adds its special tokens (Llama's BOS; a plain byte-level BPE adds none), so the
        model sees what it was trained on and outputs match HF and vLLM. Pass
        `add_special_tokens=False` for text that already carries them (a rendered chat template).
        INVALID_ARGUMENT, before tokenizing, when `text` is over `prompt_byte_limit(max_tokens)`
        (pass the context length as `max_tokens`)."""
        limit = self.prompt_byte_limit(max_tokens)
        if limit is not None and len(text) * 4 > limit:  # a character is at most 4 bytes
            size = len(text.encode("utf-8", "surrogatepass"))
            if size > limit:
                context = f", {max_tokens} tokens of context" if max_tokens is not None else ""
                raise InvalidArgument(
                    f"the prompt is {size} bytes; this model accepts at most {limit} bytes{context} "
                    f"(its longest token is {self.max_token_bytes} bytes): shorten the prompt"
                )
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def tokens(self, ids: list[int]) -> list[str]:
        return [self.tok.id_to_token(i) or "" for i in ids]

    def token_texts(self, ids: list[int]) -> list[str]:
        """Each token's own text, special tokens kept (OpenAI logprobs' `tokens`): its bytes as UTF-8,
        or, when they are not valid UTF-8 (a piece of a character), OpenAI's "bytes:\\xNN..." form,
        so that distinct ids never share the U+FFFD a lone decode would give them."""
        return [token_text(b) for b in self.token_bytes(ids)]

    def token_bytes(self, ids: list[int]) -> list[bytes]:
        """Each token's own bytes: byte-level BPE through the byte decoder, SentencePiece's byte
        fallback `<0xNN>` as that byte and its '\u2581' as a space, an added token as its content;
        any other model as its lone decode in UTF-8."""
        added, byte_level, metaspace = self._token_kinds
        out = []
        for i in ids:
            if i in added:
                out.append(added[i].encode("utf-8"))
                continue
            piece = self.tok.id_to_token(i)
            if piece is None:
                out.append(b"")
            elif byte_level and all(c in BYTE_DECODER for c in piece):
                out.append(bytes(BYTE_DECODER[c] for c in piece))
            elif metaspace and (m := BYTE_FALLBACK.fullmatch(piece)):
                out.append(bytes([int(m.group(1), 16)]))
            elif metaspace:
                out.append(piece.replace("\u2581", " ").encode("utf-8"))
            else:
                out.append(self.tok.decode([i], skip_special_tokens=False).encode("utf-8", "surrogatepass"))
        return out

    @cached_property
    def _token_kinds(self) -> tuple[dict[int, str], bool, bool]:
        """(added tokens by id, whether the decoder is byte-level, whether it is SentencePiece's
        Metaspace/Replace + ByteFallback), read once from the tokenizer's JSON."""
        spec = json.loads(self.tok.to_str())
        added = {t["id"]: t["content"] for t in spec.get("added_tokens") or () if "content" in t}
        types = set(_decoder_types(spec.get("decoder")))
        byte_level = "ByteLevel" in types
        metaspace = not byte_level and bool(types & {"Metaspace", "ByteFallback", "Replace"})
        return added, byte_level, metaspace

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The chat prompt for `messages` (generation prompt added, as OpenAI chat does)."""
        if self.chat_template is None:
            raise InvalidArgument(
                "this model has no chat template (no chat_template in tokenizer_config.json and no "
                "chat_template.jinja): use /v1/completions with a prompt, or import a model that has one"
            )
        return self.chat_template.render(messages)


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: the character byte-level BPE writes for each byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


BYTE_DECODER = _bytes_to_unicode()
BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
BYTES_PREFIX = "bytes:"


def _decoder_types(decoder: Any) -> list[str]:
    """The `type` of a tokenizer.json decoder and of every decoder a Sequence holds."""
    if not isinstance(decoder, dict):
        return []
    return [str(decoder.get("type")), *(t for d in decoder.get("decoders") or () for t in _decoder_types(d))]


def token_text(raw: bytes) -> str:
    """A token's bytes as its OpenAI logprobs text: UTF-8, else "bytes:\\xNN..." (OpenAI's form)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return BYTES_PREFIX + "".join(f"\\x{b:02x}" for b in raw)


def text_bytes(text: str) -> bytes:
    """The bytes a `token_text` stands for (its inverse)."""
    if text.startswith(BYTES_PREFIX):
        hexes = text[len(BYTES_PREFIX) :].split("\\x")[1:]
        try:
            return bytes(int(h, 16) for h in hexes)
        except ValueError:
            pass
    return text.encode("utf-8", "surrogatepass")


def longest_token_bytes(tok) -> int:
    """The most input bytes one token can stand for, from the vocabulary (special tokens included).

    A token's own string is at least as long in UTF-8 as the text it matches: byte-level BPE writes
    each byte as one 1-2 byte character, SentencePiece writes a space as the 3-byte '\u2581'."""
    vocab = tok.get_vocab(with_added_tokens=True)
    longest = max((len(t.encode("utf-8", "surrogatepass")) for t in vocab), default=0)
    return max(longest, MIN_TOKEN_BYTES)


def _ids_from(req: Request, start: int) -> list[int]:
    """prompt + output tokens from index ``start`` on, without copying the whole prompt."""
    n = len(req.prompt_token_ids)
    if start >= n:
        return req.output_token_ids[start - n :]
    return req.prompt_token_ids[start:] + req.output_token_ids


def detokenize_incrementally(tokenizer: Tokenizer, req: Request, *, final: bool = False) -> str:
    """Append newly decodable text to `req.text`; returns the new piece ('' while an incomplete UTF-8
    sequence waits for the next token). `final` (the request ended) releases whatever is left,
    replacement characters included."""
    if req.detok_read_offset >= req.num_tokens:
        return ""
    ids = _ids_from(req, req.detok_prefix_offset)
    prefix = tokenizer.decode(ids[: req.detok_read_offset - req.detok_prefix_offset])
    full = tokenizer.decode(ids)
    if not final and (full.endswith("\ufffd") or len(full) <= len(prefix)):
        return ""
    new = full[len(prefix) :]
    req.detok_prefix_offset = req.detok_read_offset
    req.detok_read_offset = req.num_tokens
    req.text += new
    return new
