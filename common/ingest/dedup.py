"""Exact and near-duplicate detection: content hashes, MinHash signatures, LSH buckets, clusters.

Three stages, each a pure function over arrays so they can run in one process, in a process pool
(signatures), or on Ray Data (buckets and clusters, see ``dedup_ray.py``):

1. **signatures**: text -> word 5-gram shingles (after lower-casing, punctuation removal and digit
   folding) -> ``num_perm = bands * rows`` MinHash values. Shingles are hashed by combining per-word
   CRC32s with a random linear map (vectorised in numpy, no per-shingle Python hashing), and the
   permutations are multiply-shift hashes ``(a*h + b) >> 32`` (Dietzfelbinger et al. 1997).
   ``MinHashConfig(hash_family="datatrove-sha1")`` instead reproduces datatrove's
   ``MinhashDedupSignature`` (sha1, precision 32) bit for bit, still vectorised, at about half the
   speed (Python-level SHA-1 per shingle, a 64-bit modulus); ``word_split="spacy-like"`` approximates
   its spaCy word splitting. Both exist for like-for-like comparison with datatrove (bench/ingest.py).
2. **buckets**: for each band, the ``rows`` values of a signature are folded into one 64-bit key;
   documents sharing a key in any band are candidate pairs.
3. **clusters**: candidates are verified against the full signature (estimated Jaccard >=
   ``threshold``, the false-positive check NeMo Curator also does) and merged with union-find;
   each cluster keeps its lowest document index (the first one read), so results are deterministic.

The LSH "S-curve": a pair with Jaccard similarity ``s`` shares at least one band with probability

    P(s) = 1 - (1 - s**rows) ** bands

With the default 20 bands x 13 rows (260 hashes, threshold ~ (1/20)**(1/13) = 0.79):
P(0.5) = 0.002, P(0.7) = 0.17, P(0.8) = 0.68, P(0.9) = 0.997, P(0.95) = 1.0000. Verification then
removes candidates whose estimated Jaccard (standard error <= 0.031 at 260 hashes) is below 0.8.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np

from tokenmill.common.ingest.punctuation import PUNCTUATION

_MAX32 = np.uint64(0xFFFFFFFF)
_SHIFT = np.uint64(32)
_MERSENNE = np.uint64((1 << 61) - 1)  # datatrove's modulus for its (a*h + b) permutations
_PUNCT_TRANS = str.maketrans({c: " " for c in PUNCTUATION})
_SPACY_EN_EXCEPTIONS = (
    "ai|nt are|nt can|not ca|nt ca|nt|ve could|nt could|nt|ve could|ve dare|nt did|nt did|nt|ve does|nt "
    "does|nt|ve do|nt do|nt|ve gon|na got|ta had|nt had|nt|ve has|nt have|nt he|d he|d|ve he|ll|ve he|s "
    "how|d how|d|ve how|ll how|ll|ve how|re how|s how|ve is|nt it|d it|d|ve it|ll it|ll|ve i|d i|d|ve "
    "i|ll|ve i|m i|m|a i|ve may|nt may|nt|ve might|nt might|nt|ve might|ve must|nt must|nt|ve must|ve "
    "need|nt need|nt|ve not|ve ought|nt ought|nt|ve sha|nt sha|nt|ve she|d|ve she|ll|ve she|s should|nt "
    "should|nt|ve should|ve that|d that|d|ve that|ll that|ll|ve that|s there|d there|d|ve there|ll "
    "there|ll|ve there|re there|s there|ve these|d these|d|ve these|ll these|ll|ve these|re these|ve "
    "they|d they|d|ve they|ll they|ll|ve they|re they|ve this|d this|d|ve this|ll this|ll|ve this|s "
    "those|d those|d|ve those|ll those|ll|ve those|re those|ve was|nt were|nt we|d we|d|ve we|ll|ve we|ve "
    "what|d what|d|ve what|ll what|ll|ve what|re what|s what|ve when|d when|d|ve when|ll when|ll|ve "
    "when|re when|s when|ve where|d where|d|ve where|ll where|ll|ve where|re where|s where|ve who|d "
    "who|d|ve who|ll who|ll|ve who|s who|ve why|d why|d|ve why|ll why|ll|ve why|re why|s why|ve would|nt "
    "would|nt|ve would|ve wo|nt wo|nt|ve you|d you|d|ve you|ll you|ll|ve you|re you|ve y|all "
)
_EXCEPTIONS = {e.replace("|", ""): e.split("|") for e in _SPACY_EN_EXCEPTIONS.split()}
# spaCy's English suffix rule splits a unit off a number ("0g" -> "0 g"); the lower-case ASCII units.
_UNIT_SUFFIX = re.compile(
    r"(?<=[0-9])(km|dm|cm|mm|ha|nm|yd|in|ft|kg|mg|lb|oz|kmh|mph|mbar|mb|kb|gb|tb|m|g|t)$"
)
_NUMBERS = re.compile(r"\d+(?:[.,،٫⎖⎗⎘]\d+)?")  # datatrove's NUMBERS_PATTERN (\d is Unicode Nd)


def content_hash(text: str) -> bytes:
    """16-byte BLAKE2b of the normalised text: the key of exact dedup and of the train/val split."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def lsh_probability(s: float, bands: int, rows: int) -> float:
    """Probability that a pair with Jaccard ``s`` becomes a candidate: 1 - (1 - s^r)^b."""
    return 1.0 - (1.0 - s**rows) ** bands


@dataclass(frozen=True)
class MinHashConfig:
    ngram: int = 5
    bands: int = 20
    rows: int = 13
    seed: int = 1
    threshold: float = 0.8  # verification on the full signature; 0 disables it
    chunk: int = 4096  # shingles per numpy block (bounds memory on huge documents)
    # "crc-ms": per-word CRC32s combined linearly, multiply-shift permutations (fast, our default).
    # "datatrove-sha1": datatrove's MinhashDedupSignature with HashConfig(precision=32, hash_fc="sha1"):
    # SHA-1 of the space-joined n-gram, then (a*h + b) mod (2^61 - 1) in uint64 arithmetic, low 32
    # bits, with a, b from np.random.RandomState(seed); same seed -> bit-identical signatures.
    hash_family: Literal["crc-ms", "datatrove-sha1"] = "crc-ms"
    # "whitespace" (default) or "spacy-like": ``spacy_like_split``, closer to datatrove's spaCy words.
    word_split: Literal["whitespace", "spacy-like"] = "whitespace"

    def __post_init__(self) -> None:
        if self.hash_family not in ("crc-ms", "datatrove-sha1"):
            raise ValueError(
                f"unknown MinHash hash_family {self.hash_family!r}: use 'crc-ms' or 'datatrove-sha1'"
            )
        if self.word_split not in ("whitespace", "spacy-like"):
            raise ValueError(
                f"unknown MinHash word_split {self.word_split!r}: use 'whitespace' or 'spacy-like'"
            )

    @property
    def num_perm(self) -> int:
        return self.bands * self.rows

    @property
    def lsh_threshold(self) -> float:
        """Where the S-curve is steepest: ~ (1/bands)^(1/rows)."""
        return (1.0 / self.bands) ** (1.0 / self.rows)


class MinHasher:
    """Turns texts into uint32 signatures of length ``config.num_perm``.

    ``splitter`` turns simplified text into words (default: whitespace split). It exists so a
    benchmark can plug in another tool's word tokenizer (datatrove uses spaCy's) and measure how
    much word splitting alone moves the result, without that tokenizer on the runtime path.
    """

    def __init__(self, config: MinHashConfig, splitter: Callable[[str], list[str]] | None = None):
        self.config = config
        self._split = splitter or (spacy_like_split if config.word_split == "spacy-like" else str.split)
        rng = np.random.Generator(np.random.PCG64(config.seed))
        self._a = rng.integers(1, 2**63, size=config.num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self._b = rng.integers(0, 2**63, size=config.num_perm, dtype=np.uint64)
        self._mult = rng.integers(1, 2**63, size=config.ngram, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self._band_mult = rng.integers(1, 2**63, size=config.rows, dtype=np.uint64) * np.uint64(
            2
        ) + np.uint64(1)
        if config.hash_family == "datatrove-sha1":
            # Exactly datatrove's MinhashDedupSignature.parameters: one RandomState, a then b.
            gen = np.random.RandomState(config.seed)
            self._a = gen.randint(1, _MERSENNE, dtype=np.uint64, size=config.num_perm)
            self._b = gen.randint(0, _MERSENNE, dtype=np.uint64, size=config.num_perm)

    @staticmethod
    def simplify_text(text: str) -> str:
        """datatrove's ``simplify_text`` order: lower-case, numbers -> 0, punctuation -> space,
        diacritics dropped; so both tools shingle the same words."""
        text = _NUMBERS.sub("0", text.lower()).translate(_PUNCT_TRANS)
        if not text.isascii():
            text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
        return text

    @staticmethod
    def simplify(text: str) -> list[str]:
        """Simplified words with the default (whitespace) splitter."""
        return MinHasher.simplify_text(text).split()

    def words(self, text: str) -> list[str]:
        return self._split(self.simplify_text(text))

    def shingles(self, text: str) -> np.ndarray:
        """Distinct 32-bit shingle hashes (uint64 holding values < 2^32)."""
        words = self.words(text)
        if not words:
            return np.empty(0, dtype=np.uint64)
        n = self.config.ngram
        if len(words) < n:  # one shingle for the whole short text: only identical short texts collide
            n = len(words)
        m = len(words) - n + 1
        if self.config.hash_family == "datatrove-sha1":
            return np.unique(_sha1_ngrams(words, n, m))
        wh = np.fromiter(
            (zlib.crc32(w.encode("utf-8", "surrogatepass")) for w in words), np.uint64, len(words)
        )
        with np.errstate(over="ignore"):
            acc = wh[:m] * self._mult[0]
            for k in range(1, n):
                acc += wh[k : k + m] * self._mult[k]
        return np.unique(acc >> _SHIFT)

    def signature(self, text: str) -> np.ndarray:
        h = self.shingles(text)
        sig = np.full(self.config.num_perm, 0xFFFFFFFF, dtype=np.uint64)
        datatrove = self.config.hash_family == "datatrove-sha1"
        buf = np.empty((min(self.config.chunk, h.size), self.config.num_perm), dtype=np.uint64)
        with np.errstate(over="ignore"):  # in-place ufuncs: no [chunk, num_perm] temporaries
            for start in range(0, h.size, self.config.chunk):
                block = h[start : start + self.config.chunk, None]
                vals = buf[: block.shape[0]]
                np.multiply(block, self._a, out=vals)
                vals += self._b
                if datatrove:  # uint64 wrap-around before the modulus, as datatrove's numpy code does
                    np.remainder(vals, _MERSENNE, out=vals)
                    vals &= _MAX32
                else:
                    vals >>= _SHIFT
                np.minimum(sig, vals.min(axis=0), out=sig)
        return sig.astype(np.uint32)

    def band_keys(self, sigs: np.ndarray) -> np.ndarray:
        """``[N, bands]`` uint64 keys: each band's ``rows`` values folded with a random linear map."""
        c = self.config
        s = np.asarray(sigs, dtype=np.uint64).reshape(-1, c.bands, c.rows)
        with np.errstate(over="ignore"):
            return (s * self._band_mult).sum(axis=2, dtype=np.uint64)


def _sha1_ngrams(words: list[str], n: int, m: int) -> np.ndarray:
    """datatrove's ``sha1_hash32(" ".join(ngram))`` for the ``m`` n-grams: the first 4 bytes of the
    SHA-1 digest, little-endian. The text is encoded once and each n-gram hashed as a byte slice
    (no per-shingle join or encode); the digests are decoded in one numpy view."""
    buf = " ".join(words).encode("utf-8", "surrogatepass")
    lens = np.fromiter((len(w.encode("utf-8", "surrogatepass")) + 1 for w in words), np.int64, len(words))
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    ends = (starts + lens - 1)[n - 1 :]  # exclusive end of the n-gram's last word
    view = memoryview(buf)
    sha1 = hashlib.sha1
    digests = b"".join(
        [sha1(view[s:e]).digest() for s, e in zip(starts[:m].tolist(), ends.tolist(), strict=True)]
    )
    return np.frombuffer(digests, dtype="<u4").reshape(m, 5)[:, 0].astype(np.uint64)


def spacy_like_split(text: str) -> list[str]:
    """A dependency-free approximation of spaCy's English tokenizer on *simplified* text (datatrove's
    MinHash word splitter): whitespace split, then spaCy's apostrophe-free contraction exceptions
    (``cannot`` -> ``can not``, ``id`` -> ``i d``; table extracted from spaCy 3's ``en`` tokenizer
    rules), units split off numbers, and leading/trailing symbols split off one character each."""
    out: list[str] = []
    for w in text.split():
        if w.isalnum():
            exc = _EXCEPTIONS.get(w)
            if exc is not None:
                out.extend(exc)
            elif "0" in w and (m := _UNIT_SUFFIX.search(w)) is not None:  # digits are folded to 0
                out += [w[: m.start()], w[m.start() :]]
            else:
                out.append(w)
            continue
        i, j = 0, len(w)
        while i < j and not w[i].isalnum():
            i += 1
        k = j
        while k > i and not w[k - 1].isalnum():
            k -= 1
        out.extend(w[:i])
        if i < k:
            out.append(w[i:k])
        out.extend(w[k:])
    return out


# --------------------------------------------------------------------------------------------- buckets


def candidate_pairs(keys: np.ndarray) -> np.ndarray:
    """``[E, 2]`` int64 pairs (first member of a bucket, another member) over all bands, deduplicated.

    ``keys`` is ``[N, bands]``; row ``i`` is document ``i``. Each bucket contributes a star around
    its lowest index, which is enough for connected components.
    """
    n, bands = keys.shape
    out = []
    idx = np.arange(n, dtype=np.int64)
    for band in range(bands):
        col = keys[:, band]
        order = np.lexsort((idx, col))
        sk = col[order]
        if n < 2:
            break
        same = sk[1:] == sk[:-1]
        if not same.any():
            continue
        # start index of each run, propagated forward
        run_start = np.where(np.concatenate([[True], ~same]))[0]
        run_id = np.cumsum(np.concatenate([[True], ~same])) - 1
        heads = order[run_start][run_id]
        members = order
        mask = heads != members
        out.append(np.stack([heads[mask], members[mask]], axis=1))
    if not out:
        return np.empty((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(out), axis=0)


# --------------------------------------------------------------------------------------------- clusters


def verify_pairs(sigs: np.ndarray, pairs: np.ndarray, threshold: float, block: int = 65536) -> np.ndarray:
    """Keep pairs whose estimated Jaccard (fraction of equal MinHash values) is >= threshold."""
    if threshold <= 0 or pairs.size == 0:
        return pairs
    keep = np.zeros(len(pairs), dtype=bool)
    for start in range(0, len(pairs), block):
        p = pairs[start : start + block]
        est = (np.asarray(sigs[p[:, 0]]) == np.asarray(sigs[p[:, 1]])).mean(axis=1)
        keep[start : start + block] = est >= threshold
    return pairs[keep]


def connected_components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Representative (lowest index) of each of ``n`` nodes under the union of ``pairs``."""
    parent = np.arange(n, dtype=np.int64)

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = int(parent[root])
        while parent[x] != root:
            parent[x], x = root, int(parent[x])
        return root

    for a, b in pairs.tolist():
        ra, rb = find(a), find(b)
        if ra != rb:
            if ra < rb:
                parent[rb] = ra
            else:
                parent[ra] = rb
    for i in range(n):
        parent[i] = find(i)
    return parent


@dataclass
class NearDupResult:
    representative: np.ndarray  # [N] lowest index of each document's cluster
    candidate_pairs: int
    verified_pairs: int

    @cached_property
    def keep(self) -> np.ndarray:
        return self.representative == np.arange(self.representative.size)

    @property
    def removed(self) -> int:
        return int((~self.keep).sum())

    @property
    def clusters(self) -> int:
        """Clusters with more than one member."""
        rep = self.representative
        dup_roots = np.unique(rep[rep != np.arange(rep.size)])
        return int(dup_roots.size)


def near_duplicates(sigs: np.ndarray, hasher: MinHasher) -> NearDupResult:
    """Buckets + clusters over ``[N, num_perm]`` signatures (a memmap is fine)."""
    n = len(sigs)
    if n == 0:
        return NearDupResult(np.empty(0, dtype=np.int64), 0, 0)
    keys = np.empty((n, hasher.config.bands), dtype=np.uint64)
    for start in range(0, n, 65536):
        keys[start : start + 65536] = hasher.band_keys(np.asarray(sigs[start : start + 65536]))
    pairs = candidate_pairs(keys)
    verified = verify_pairs(sigs, pairs, hasher.config.threshold)
    return NearDupResult(connected_components(n, verified), len(pairs), len(verified))
