"""Model runner: turns a scheduled step into tensors, runs the paged forward, returns logits.

Owns the KV cache tensors. On CUDA, pure-decode steps without LoRA replay captured CUDA graphs
(one per batch-size bucket and block-table width bucket, captured lazily), so small batches are not
dominated by Python and kernel-launch overhead; everything else runs eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from tokenmill.common.inference.block_manager import NULL_BLOCK, BlockManager
from tokenmill.common.inference.lora import LoraAdapter, LoraBatch
from tokenmill.common.inference.model import AttnMeta, DecodeMeta, PagedLlama, PrefillMeta
from tokenmill.common.inference.scheduler import ScheduledItem

log = logging.getLogger(__name__)

MAX_RUN_SHAPES = 24  # distinct shapes one attention group may span (bounds split_runs' work)


def _bucket(n: int, buckets: Sequence[int]) -> int | None:
    for b in buckets:
        if n <= b:
            return b
    return None


class _DecodeGraph:
    """A captured decode step for a fixed (batch, table width); inputs are copied into static buffers."""

    def __init__(self, runner: ModelRunner, batch: int, width: int, pool, capture: bool = True):
        dev = runner.device
        self.batch, self.width = batch, width
        self.input_ids = torch.zeros(batch, dtype=torch.long, device=dev)
        self.positions = torch.zeros(batch, dtype=torch.long, device=dev)
        self.slots = torch.zeros(batch, dtype=torch.long, device=dev)  # padded rows write to the null block
        self.tables = torch.full((batch, width), NULL_BLOCK, dtype=torch.long, device=dev)
        self.ctx = torch.ones(batch, dtype=torch.long, device=dev)
        meta = AttnMeta(self.slots, batch, DecodeMeta(self.tables, self.ctx), None)
        model, caches, bs = runner.model, runner.kv_caches, runner.block_size
        self._forward = lambda: model(self.input_ids, self.positions, meta, caches, bs)
        self.graph = None
        if not capture:  # same static buffers and padding, run eagerly (tests on CPU)
            return
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up kernels / allocator outside the graph
                self._forward()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = self._forward()

    def run(self, packed: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """packed: CPU int64 [4, n] = (input ids, positions, slots, context lengths); tables [n, w]."""
        n, w = packed.shape[1], tables.shape[1]
        dev = self.input_ids.device
        packed = packed.to(dev, non_blocking=True)  # one transfer for the four vectors
        tables = tables.to(dev, non_blocking=True)
        self.input_ids[:n].copy_(packed[0])
        self.positions[:n].copy_(packed[1])
        self.slots[:n].copy_(packed[2])
        self.slots[n:].zero_()
        self.ctx[:n].copy_(packed[3])
        self.ctx[n:].fill_(1)
        self.tables.fill_(NULL_BLOCK)
        self.tables[:n, :w].copy_(tables)
        if self.graph is None:
            self.logits = self._forward()
        else:
            self.graph.replay()
        return self.logits[:n]


class ModelRunner:
    def __init__(
        self,
        model: PagedLlama,
        blocks: BlockManager,
        *,
        use_cuda_graphs: bool = True,
        cuda_graph_max_batch: int = 64,
        max_blocks_per_seq: int = 1,
    ):
        self.model = model
        self.blocks = blocks
        self.block_size = blocks.block_size
        self.device = model.device
        self.kv_caches = model.allocate_kv_cache(blocks.num_blocks, blocks.block_size)
        if model.dynamic_rope:  # past the context a key's rotation depends on its sequence's length
            blocks.limit_prefix_cache(model.spec.config.max_seq_len)
        if all(w is not None for w in model.windows):  # only sliding layers: old blocks are dead
            blocks.set_sliding_window(max(w for w in model.windows if w is not None))
        # Graphs replay table-lookup rope; dynamic NTK computes it per token (eager).
        self.use_graphs = use_cuda_graphs and self.device.type == "cuda" and not model.dynamic_rope
        self.capture_graphs = self.device.type == "cuda"  # False: static-buffer path run eagerly (tests)
        self.graph_batches = [
            b for b in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256) if b <= cuda_graph_max_batch
        ]
        self.graph_widths = []
        w = 4
        while w < max_blocks_per_seq:
            self.graph_widths.append(w)
            w *= 2
        self.graph_widths.append(max(w, max_blocks_per_seq))
        self.graphs: dict[tuple[int, int], _DecodeGraph] = {}
        self.graph_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.lora_slices = self._lora_slices()
        # What one more attention call costs, in (query, key block) pairs of padded work: on CPU a call
        # costs about as much as 64 such pairs; on CUDA padding is cheap next to a call's launches.
        self.group_overhead = 64 if self.device.type == "cpu" else 4096

    def _lora_slices(self) -> dict[str, tuple[int, int]]:
        m, s = self.model, self.model.spec
        q, kv, inter = m.q_size, m.kv_size, s.intermediate_size
        return {
            "q_proj": (0, q),
            "k_proj": (q, q + kv),
            "v_proj": (q + kv, q + 2 * kv),
            "o_proj": (0, s.hidden_size),
            "gate_proj": (0, inter),
            "up_proj": (inter, 2 * inter),
            "down_proj": (0, s.hidden_size),
        }

    def _tables(self, reqs: Sequence, width: int | None = None) -> torch.Tensor:
        tables = [self.blocks.table(r.request_id) for r in reqs]
        w = width or max(len(t) for t in tables)
        padded = [t[:w] + [NULL_BLOCK] * (w - len(t)) for t in tables]
        return torch.tensor(padded, dtype=torch.long)

    def _width(self, it: ScheduledItem) -> int:
        """Blocks holding the item's context after this step."""
        return self.blocks.blocks_for(it.request.num_computed_tokens + it.num_tokens)

    def _decode_meta(self, decodes: Sequence[ScheduledItem], dev: torch.device) -> DecodeMeta:
        """Tables and context lengths of the decodes (sorted by context), bucketed by table width."""
        widths = [self._width(it) for it in decodes]
        ends = split_runs([(1, w) for w in widths], self.group_overhead)
        return DecodeMeta(
            tables=self._tables([it.request for it in decodes], widths[-1]).to(dev),
            ctx=torch.tensor([it.request.num_computed_tokens + 1 for it in decodes], device=dev),
            buckets=[(end, widths[end - 1]) for end in ends],
        )

    def _prefill_groups(self, prefills: Sequence[ScheduledItem], dev: torch.device) -> list[PrefillMeta]:
        """The prefill chunks (sorted by length) in groups that attend together, split where padding
        the group to a longer chunk or a wider table would cost more than a separate call."""
        shapes = [(it.num_tokens, self._width(it)) for it in prefills]
        groups, start = [], 0
        for end in split_runs(shapes, self.group_overhead):
            groups.append(self._prefill_meta(prefills[start:end], max(w for _, w in shapes[start:end]), dev))
            start = end
        return groups

    def _prefill_meta(self, prefills: Sequence[ScheduledItem], width: int, dev: torch.device) -> PrefillMeta:
        """Tables and lengths of prefill chunks; when their lengths differ, the index that pads them."""
        qlens = [it.num_tokens for it in prefills]
        meta = PrefillMeta(
            tables=self._tables([it.request for it in prefills], width).to(dev),
            ctx=torch.tensor([it.request.num_computed_tokens + it.num_tokens for it in prefills], device=dev),
            qlen=torch.tensor(qlens, device=dev),
            num_tokens=sum(qlens),
            fresh=all(it.request.num_computed_tokens == 0 for it in prefills),
        )
        if min(qlens) != max(qlens):
            qmax = max(qlens)
            starts = torch.tensor([0] + qlens[:-1]).cumsum(0)
            ar = torch.arange(qmax)
            valid = ar[None, :] < torch.tensor(qlens)[:, None]
            pad_idx = torch.where(valid, starts[:, None] + ar[None, :], torch.zeros((), dtype=torch.long))
            meta.pad_idx = pad_idx.to(dev)
            meta.valid = valid.to(dev)
        return meta

    def _flatten(self, ordered: Sequence[ScheduledItem]) -> tuple[_StepInputs, list[int]]:
        """The step's tokens as flat lists, and the rows whose logits are sampled: the last row of each
        item that reaches the end of its request's tokens (a partial prefill chunk samples nothing)."""
        bs = self.block_size
        step = _StepInputs([], [], [], [])
        sampled: list[int] = []
        for i, it in enumerate(ordered):
            req, start, n = it.request, it.request.num_computed_tokens, it.num_tokens
            table = self.blocks.table(req.request_id)
            if req.params.scores_prompt:
                _prompt_rows(step, i, req, start, n)
            step.ids.extend(req.all_token_ids[start : start + n])
            rng = range(start, start + n)
            step.pos.extend(rng)
            step.slots.extend(table[p // bs] * bs + p % bs for p in rng)
            if start + n == req.num_tokens:
                step.logits_rows.append(len(step.ids) - 1)
                sampled.append(i)
        return step, sampled

    def _lora_batch(
        self, ordered: Sequence[ScheduledItem], adapters: dict[str, LoraAdapter]
    ) -> LoraBatch | None:
        """Rows of each adapter's requests in the flat batch; None when no request uses one."""
        if not any(it.request.adapter for it in ordered):
            return None
        groups: dict[str, list[int]] = {}
        row = 0
        for it in ordered:
            if it.request.adapter:
                groups.setdefault(it.request.adapter, []).extend(range(row, row + it.num_tokens))
            row += it.num_tokens
        dev = self.device
        return LoraBatch(
            [(adapters[name], torch.tensor(rows, device=dev)) for name, rows in groups.items()],
            self.lora_slices,
        )

    def _graph_decode(self, decodes: Sequence[ScheduledItem], step: _StepInputs) -> torch.Tensor | None:
        """Replay (capturing on first use) the decode graph for this batch; None when no bucket fits."""
        tables = self._tables([it.request for it in decodes])
        b = _bucket(len(decodes), self.graph_batches)
        w = _bucket(tables.shape[1], self.graph_widths)
        if b is None or w is None:
            return None
        ctx = [it.request.num_computed_tokens + 1 for it in decodes]
        packed = torch.tensor([step.ids, step.pos, step.slots, ctx], dtype=torch.long)
        graph = self.graphs.get((b, w))
        if graph is None:
            graph = self.graphs[(b, w)] = _DecodeGraph(self, b, w, self.graph_pool, self.capture_graphs)
        return graph.run(packed, tables)

    @torch.inference_mode()
    def execute(
        self, items: Sequence[ScheduledItem], adapters: dict[str, LoraAdapter]
    ) -> tuple[torch.Tensor, list[int], list[tuple[int, int, int]]]:
        """Run the step; returns (logits [n_sampling + n_prompt, V], positions in `items` of the
        sampling rows, prompt-scoring spans (position in `items`, first position, count)).

        A step may have no sampling rows (only partial prefill chunks, e.g. a long prompt alone): the
        forward still runs for its KV writes and the logits have zero rows. Requests that score their
        prompt (echo with logprobs) add a row per prompt position after the sampling rows."""
        # Sorted by context (decodes) and chunk length (prefills) so that attention groups pad little.
        decodes = sorted((it for it in items if it.num_tokens == 1), key=self._width)
        prefills = sorted(
            (it for it in items if it.num_tokens > 1), key=lambda it: (it.num_tokens, self._width(it))
        )
        ordered = decodes + prefills
        step, sampled = self._flatten(ordered)
        index_of = {id(it): i for i, it in enumerate(items)}
        # `sampled` follows the decode-first order; map it back to positions in the caller's `items`.
        sample_items = [index_of[id(ordered[i])] for i in sampled]
        prompt_spans = [(index_of[id(ordered[i])], first, n) for i, first, n in step.prompt_spans]
        uses_lora = any(it.request.adapter for it in items)
        if decodes and not prefills and self.use_graphs and not uses_lora and not prompt_spans:
            logits = self._graph_decode(decodes, step)
            if logits is not None:
                return logits, sample_items, prompt_spans
        dev = self.device
        decode = self._decode_meta(decodes, dev) if decodes else None
        prefill = self._prefill_groups(prefills, dev) if prefills else None
        slots = torch.tensor(step.slots, dtype=torch.long).to(dev, non_blocking=True)
        meta = AttnMeta(slots, len(decodes), decode, prefill)
        logits = self.model(
            torch.tensor(step.ids, dtype=torch.long, device=dev),
            torch.tensor(step.pos, dtype=torch.long, device=dev),
            meta,
            self.kv_caches,
            self.block_size,
            # int64 even when empty: torch.tensor([]) is float32, which is not a valid index.
            logits_indices=torch.tensor(step.logits_rows + step.prompt_rows, dtype=torch.long, device=dev),
            lora=self._lora_batch(ordered, adapters),
            rope_lens=_rope_lens(ordered, dev) if self.model.dynamic_rope else None,
        )
        return logits, sample_items, prompt_spans


def split_runs(shapes: Sequence[tuple[int, int]], overhead: int) -> list[int]:
    """Split sorted (queries, blocks) shapes into runs attended as one padded batch each, minimising
    padded work (rows x queries x blocks of the run's largest) plus `overhead` per run; returns the end
    index of every run. Dynamic programming over the distinct shapes (equal ones never split), a run
    spanning at most MAX_RUN_SHAPES of them so that a step's split stays cheap to compute."""
    distinct: list[tuple[int, int]] = []
    ends: list[int] = []  # item index after the last item of each distinct shape
    for i, shape in enumerate(shapes):
        if distinct and distinct[-1] == shape:
            ends[-1] = i + 1
        else:
            distinct.append(shape)
            ends.append(i + 1)
    m = len(distinct)
    best = [0] * (m + 1)  # best[i]: cheapest split of the first i distinct shapes
    cut = [0] * (m + 1)  # cut[i]: where the last run of that split starts
    for i in range(1, m + 1):
        qmax = wmax = 0
        best[i] = -1
        for j in range(i - 1, max(-1, i - 1 - MAX_RUN_SHAPES), -1):  # the last run: shapes j..i-1
            qmax, wmax = max(qmax, distinct[j][0]), max(wmax, distinct[j][1])
            rows = ends[i - 1] - (ends[j - 1] if j else 0)
            cost = best[j] + rows * qmax * wmax + overhead
            if best[i] < 0 or cost < best[i]:
                best[i], cut[i] = cost, j
    runs, i = [], m
    while i:
        runs.append(ends[i - 1])
        i = cut[i]
    return runs[::-1]


def _prompt_rows(step: _StepInputs, i: int, req, start: int, n: int) -> None:
    """Rows whose logits score the next prompt token: positions in [start, start + n) below the last
    prompt position, from the first not yet scored (a recompute after preemption scores nothing twice)."""
    first = max(start, len(req.prompt_logprobs))
    last = min(start + n, len(req.prompt_token_ids) - 1)
    if last > first:
        base = len(step.ids) - start  # row of position p in the flat batch is base + p
        step.prompt_rows.extend(range(base + first, base + last))
        step.prompt_spans.append((i, first, last - first))


@dataclass
class _StepInputs:
    """One step's tokens flattened decode-first: ids, positions, KV slots, and rows to sample."""

    ids: list[int]
    pos: list[int]
    slots: list[int]
    logits_rows: list[int]
    prompt_rows: list[int] = field(default_factory=list)  # rows scoring prompt tokens (echo)
    prompt_spans: list[tuple[int, int, int]] = field(default_factory=list)  # (item, first pos, count)


def _rope_lens(ordered: Sequence[ScheduledItem], dev: torch.device) -> torch.Tensor:
    """Per token, the sequence length HF's dynamic NTK rope rotated it with: the prompt length for
    prompt tokens (HF prefills the prompt in one forward), position + 1 for generated tokens."""
    lens: list[int] = []
    for it in ordered:
        start, prompt = it.request.num_computed_tokens, len(it.request.prompt_token_ids)
        lens.extend(max(p + 1, prompt) for p in range(start, start + it.num_tokens))
    return torch.tensor(lens, dtype=torch.long, device=dev)
