"""Byte-level BPE tokenizer: train one on the cleaned corpus (HF ``tokenizers``) or reuse a file.

Byte-level pre-tokenisation means every string round-trips exactly (``decode(encode(t)) == t``),
which the packing round-trip test relies on. ``<|endoftext|>`` is id 0 and is the eos appended
after every document. The PII placeholders are added as ordinary (non-special) tokens so each is
one id and survives ``skip_special_tokens`` decoding.

In the packed stream every document follows an ``<|endoftext|>``, so that token is also how the
model knows a document starts. The trained tokenizer's post-processor therefore puts it in front
of encoded text, as Llama's tokenizer puts BOS: a served prompt ("class ") starts where a training
document starts instead of at an arbitrary point mid-file, and HF's tokenizer over the same
tokenizer.json does the same. Packing encodes with ``add_special_tokens=False``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tokenmill.common.data.dataset import MANIFEST, TOKENIZER
from tokenmill.common.errors import FailedPrecondition, InvalidArgument, NotFound
from tokenmill.common.inputs import check_input_allowed
from tokenmill.common.names import validate_name

if TYPE_CHECKING:
    from tokenizers import Tokenizer  # imported lazily at run time: only ingest runs need it

EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [EOS, PAD]
PLACEHOLDER_TOKENS = ["<EMAIL>", "<PHONE>", "<IP_ADDRESS>", "<CREDIT_CARD>", "<SECRET>"]


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, *, length: int | None = None, min_frequency: int = 2
) -> Tokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size - len(PLACEHOLDER_TOKENS), 256 + len(SPECIAL_TOKENS)),
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_batched(texts), trainer=trainer, length=length)
    tok.add_tokens(PLACEHOLDER_TOKENS)
    eos = eos_id(tok)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{EOS} $A", pair=f"{EOS} $A {EOS} $B", special_tokens=[(EOS, eos)]
    )
    return tok


def _batched(texts: Iterable[str], size: int = 256) -> Iterator[list[str]]:
    batch: list[str] = []
    for t in texts:
        batch.append(t)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def load_tokenizer(path: str | Path) -> Tokenizer:
    from tokenizers import Tokenizer

    p = Path(path)
    if not p.is_file():
        raise NotFound(f"tokenizer file {p} does not exist; give a tokenizer.json or 'dataset:NAME'")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as exc:  # tokenizers raises plain Exception on a bad file
        raise InvalidArgument(f"{p} is not a valid HF tokenizers tokenizer.json ({exc})") from None


def eos_id(tok: Tokenizer) -> int:
    eid = tok.token_to_id(EOS)
    if eid is None:
        raise FailedPrecondition(
            f"the tokenizer has no {EOS} token; ingest needs it as the document separator"
        )
    return int(eid)


def vocab_size(tok: Tokenizer) -> int:
    return int(tok.get_vocab_size(with_added_tokens=True))


def resolve_tokenizer(source: str, root: Path, input_roots: Sequence[str] = ()) -> Path | None:
    """The tokenizer.json an ingest spec's ``tokenizer`` setting names, or None (train one).

    ``dataset:NAME`` reuses that dataset's tokenizer under ``root`` (the datasets directory); a path
    must lie under `input_roots` and load. Called before any work starts, and again when it is used."""
    if not source:
        return None
    if source.startswith("dataset:"):
        other = validate_name(source.split(":", 1)[1], what="dataset", field="tokenizer")
        path = root / other / TOKENIZER
        if not (root / other / MANIFEST).is_file() or not path.is_file():
            raise NotFound(
                f"tokenizer source dataset {other!r} not found; list datasets with 'tokenmill data list'"
            )
        return path
    path = Path(check_input_allowed(source, input_roots, what="tokenizer"))
    load_tokenizer(path)
    return path
