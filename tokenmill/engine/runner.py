"""ModelRunner: turns a scheduled step into one forward pass over the paged KV cache.

It owns the KV cache tensor, flattens the step's chunked prefills and decodes into one token batch, builds the
attention metadata, runs the model, and returns the logits of the sequences that reached the end of their known
tokens (a request in the middle of a chunked prefill samples nothing). On CUDA, decode-only steps replay CUDA graphs
captured per padded batch size.
"""

from __future__ import annotations

import logging
import math
import mmap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from tokenmill.device_copy import to_device
from tokenmill.engine.piecewise import WHOLE_STEP_MAX_TOKENS, PiecewiseForward, supports_piecewise
from tokenmill.engine.request import PLACEHOLDER_TOKEN, Request
from tokenmill.engine.sampler import EarlierTokens, greedy_pick
from tokenmill.layers.attention_metadata import AttentionMetadata

logger = logging.getLogger(__name__)


@dataclass
class StepInput:
    """The flattened token batch of one step, on the host."""

    token_ids: list[int]
    positions: list[int]
    query_lens: list[int]
    seq_lens: list[int]
    block_tables: list[list[int]]
    sample_rows: list[int]  # index (into scheduled) of each sequence that samples this step
    sample_token_index: list[int]  # flat token index whose hidden state gives that sequence's logits
    state_seeds: list[int] | None = None  # per sequence, for looped models with a seeded state (Parcae)
    # (flat token index, row) of each PLACEHOLDER_TOKEN: an id the previous step sampled, still on the device
    placeholders: list[tuple[int, int]] = field(default_factory=list)


class StepLogits(NamedTuple):
    rows: list[int]  # rows of the step's scheduled requests that sample
    logits: torch.Tensor | None  # their float32 logits [len(rows), vocab]
    # From a CUDA graph: each row's greedy token and whether its logits hold NaN/inf, [len(rows), 2] int64, computed
    # inside the graph (Sampler.launch uses it where every row is plain greedy). A view of the graph's output:
    # valid until the graph replays again.
    greedy: torch.Tensor | None = None


def build_step_input(scheduled: list[tuple[Request, int]]) -> StepInput:
    token_ids: list[int] = []
    positions: list[int] = []
    query_lens: list[int] = []
    seq_lens: list[int] = []
    block_tables: list[list[int]] = []
    sample_rows: list[int] = []
    sample_token_index: list[int] = []
    state_seeds: list[int | None] = []
    placeholders: list[tuple[int, int]] = []
    for row, (req, num_new) in enumerate(scheduled):
        start = req.num_computed_tokens
        end = start + num_new
        if num_new < 1 or end > req.num_tokens:
            raise ValueError(f"request {req.request_id}: cannot compute tokens {start}..{end} of {req.num_tokens}")
        prompt_len = req.num_prompt_tokens
        if end <= prompt_len:
            token_ids.extend(req.prompt_token_ids[start:end])
        elif start >= prompt_len:  # a decode: slice the outputs alone (all_token_ids copies the whole sequence)
            token_ids.extend(req.output_token_ids[start - prompt_len : end - prompt_len])
        else:
            token_ids.extend(req.all_token_ids[start:end])
        positions.extend(range(start, end))
        query_lens.append(num_new)
        seq_lens.append(end)
        block_tables.append(req.block_ids)
        state_seeds.append(req.state_seed)
        if end == req.num_tokens:
            sample_rows.append(row)
            sample_token_index.append(len(token_ids) - 1)
            if token_ids[-1] == PLACEHOLDER_TOKEN:  # only ever a request's last token
                placeholders.append((len(token_ids) - 1, row))
    seeds: list[int] | None = None
    if any(s is not None for s in state_seeds):
        if any(s is None for s in state_seeds):
            raise ValueError("either every request of a step carries a state_seed or none does")
        seeds = state_seeds  # type: ignore[assignment]
    return StepInput(
        token_ids, positions, query_lens, seq_lens, block_tables, sample_rows, sample_token_index, seeds, placeholders
    )


@dataclass(frozen=True)
class DecodeTier:
    """`decoder` offered for decode steps of up to max_batch_size sequences whose longest (tokens in the cache,
    this step's included) is at most max_context (None: any length). One decoder can back several tiers, e.g. the
    megakernel at every context up to batch 8 and at short contexts up to 16, where it beat the next tier."""

    decoder: Any
    max_batch_size: int
    max_context: int | None = None

    def __call__(self, input_ids, positions, kv_cache, meta):
        return self.decoder(input_ids, positions, kv_cache, meta)

    def compute_logits(self, hidden):
        return self.decoder.compute_logits(hidden)


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int,
        max_model_len: int,
        dtype: torch.dtype,
        device: torch.device,
        use_cuda_graphs: bool = False,
        max_graph_batch_size: int = 64,
        decode_models: Sequence = (),
        piecewise_max_tokens: int = 0,
    ) -> None:
        self.model = model
        # Decode-only steps run on the first of these whose max_batch_size covers the batch and whose max_context
        # (if it has one: DecodeTier) covers the step's longest sequence (e.g. the megakernel for the smallest
        # batches, then kernels.fused_llama.FusedLlamaDecoder), else on `model`, which also keeps prefill and mixed
        # steps. Same forward() and compute_logits() contract as `model`.
        self.decode_models = list(decode_models)
        self.block_size = block_size
        self.device = device
        self.dtype = dtype
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        # The block pool never hands out block 0; padded rows of captured decode graphs write and read there.
        self.pad_block = 0
        kv_shape = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
        if device.type == "cpu":
            self.kv_cache = _zeros_on_first_touch(kv_shape, dtype)
        else:
            self.kv_cache = torch.zeros(kv_shape, dtype=dtype, device=device)
        # padded batch size -> {id(model): its graph}: one per model that a step of that size may run on
        self.graphs: dict[int, dict[int, _DecodeGraph]] = {}
        # Steps that no decode graph runs (prompt chunks, larger batches), with piecewise_max_tokens > 0 and up to
        # that many tokens (capped: piecewise.PIECEWISE_MAX_TOKENS): the general model's dense parts replayed from
        # CUDA graphs (engine/piecewise.py).
        self.piecewise: PiecewiseForward | None = None
        if use_cuda_graphs and device.type == "cuda":
            self._capture_decode_graphs(max_graph_batch_size)
            if piecewise_max_tokens > 0 and supports_piecewise(model):
                start = time.perf_counter()
                self.piecewise = PiecewiseForward(model, piecewise_max_tokens, device, self.kv_cache,
                                                  pad_slot=self.pad_block * block_size,
                                                  max_seqs=max_graph_batch_size,
                                                  max_blocks_per_seq=self.max_blocks_per_seq)
                logger.info("piecewise CUDA graphs for steps of up to %d tokens (%d sizes, %d of them whole steps) "
                            "captured in %.1f s", self.piecewise.max_tokens, len(self.piecewise.sizes),
                            len(self.piecewise.whole_sizes), time.perf_counter() - start)
        if device.type == "cuda":
            self._warm_up_prompt_steps(max_model_len)

    def _warm_up_prompt_steps(self, max_model_len: int) -> None:
        """Runs prompt steps of each kind into the padding block, so that the attention kernels' prompt variants
        compile now rather than in the middle of serving (Triton compiles a variant on first use, ~0.4 s each on an
        H100 host, and the engine stalls for it): one short prompt (a whole-step graph where there are any), one
        long one (the prefill kernel's 128-row tiles), and several short ones together, more tokens than a
        whole-step graph takes (its 64-row tiles outside a graph: mixed steps of decodes and a chunk)."""
        short = min(16, max_model_len)
        steps = [[short], [min(512, max_model_len)], [short] * (WHOLE_STEP_MAX_TOKENS // short + 1)]
        for query_lens in steps:
            tables = [[self.pad_block] * -(-n // self.block_size) for n in query_lens]
            meta = AttentionMetadata.build(query_lens, query_lens, tables, self.block_size, self.device)
            n = sum(query_lens)
            ids = torch.zeros(n, dtype=torch.long, device=self.device)
            positions = torch.cat([torch.arange(q, device=self.device) for q in query_lens])
            fits = self.piecewise is not None and self.piecewise.fits(n, len(query_lens))
            model = self.piecewise if fits else self.model
            with torch.inference_mode():
                model(ids, positions, self.kv_cache, meta)
        torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def execute(self, scheduled: list[tuple[Request, int]], earlier_tokens: EarlierTokens | None = None
                ) -> StepLogits:
        """Runs one step: the rows of `scheduled` that sample and their logits (StepLogits).
        earlier_tokens: the step was planned before the previous step's tokens reached the host; its placeholder
        input ids are filled on the device from that step's sampled ids."""
        step = build_step_input(scheduled)
        fill = None  # (flat token indices, earlier rows) of the placeholders
        if step.placeholders:
            if earlier_tokens is None:
                raise ValueError("the step holds placeholder tokens but no earlier step's ids to fill them")
            fill = ([index for index, _ in step.placeholders],
                    [earlier_tokens.source_row[scheduled[row][0].request_id] for _, row in step.placeholders])
        if not step.sample_rows and not step.token_ids:
            return StepLogits([], None)
        is_decode = all(q == 1 for q in step.query_lens)
        longest = max(step.seq_lens, default=0)
        model = self._model_for(len(step.query_lens), longest) if is_decode else self.model
        # Captured graphs have no per-token state seeds; models that need them run eagerly.
        graph = self._graph_for(len(step.query_lens), longest) if is_decode and step.state_seeds is None else None
        if graph is not None:
            logits = graph.run(self, step, fill and (*fill, earlier_tokens.token_ids))
            n = len(step.query_lens)
            rows = step.sample_rows
            if len(rows) == n:
                return StepLogits(rows, logits[:n], graph.greedy[:n])
            return StepLogits(rows, logits[rows])
        else:
            meta = AttentionMetadata.build(
                step.query_lens, step.seq_lens, step.block_tables, self.block_size, self.device, step.state_seeds
            )
            input_ids = to_device(step.token_ids, torch.long, self.device)
            if fill is not None:
                pairs = to_device(fill, torch.long, self.device)
                fill_placeholders(input_ids, pairs, earlier_tokens.token_ids)
            positions = to_device(step.positions, torch.long, self.device)
            if (self.piecewise is not None and model is self.model and step.state_seeds is None
                    and self.piecewise.fits(len(step.token_ids), len(step.query_lens))):
                model = self.piecewise
            hidden = model(input_ids, positions, self.kv_cache, meta)
            if not step.sample_rows:
                return StepLogits([], None)
            index = to_device(step.sample_token_index, torch.long, self.device)
            sample_hidden = hidden.index_select(0, index)
        logits = model.compute_logits(sample_hidden)
        return StepLogits(step.sample_rows, logits)

    def _model_for(self, decode_batch_size: int, longest: int | None = None):
        """The first decode model that serves this batch size and, where it limits the context, the step's longest
        sequence; the general model otherwise. longest None: unknown, so only models that take any context."""
        for decode_model in self.decode_models:
            limit = getattr(decode_model, "max_context", None)
            if decode_batch_size <= decode_model.max_batch_size and (
                    limit is None or (longest is not None and longest <= limit)):
                return decode_model
        return self.model

    def _models_for_size(self, size: int) -> list:
        """Every model a decode step padded to `size` may run on, in tier order: the context-limited decode models
        that serve the size, up to the first that takes any context (or the general model)."""
        models = []
        for decode_model in self.decode_models:
            if size <= decode_model.max_batch_size:
                models.append(decode_model)
                if getattr(decode_model, "max_context", None) is None:
                    return models
        return models + [self.model]

    # ---- CUDA graphs for decode -------------------------------------------------------------------------------

    def _graph_for(self, batch_size: int, longest: int) -> "_DecodeGraph | None":
        """The graph of the smallest captured size that holds the batch, for the model the padded batch runs on."""
        for size in sorted(self.graphs):
            if size >= batch_size:
                return self.graphs[size].get(id(self._model_for(size, longest)))
        return None

    def _capture_decode_graphs(self, max_batch: int) -> None:
        sizes = [s for s in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256) if s <= max_batch]
        pool = None
        for size in reversed(sizes):  # largest first, so smaller graphs reuse its memory pool
            self.graphs[size] = {}
            for model in self._models_for_size(size):
                graph = _DecodeGraph(self, size, model, pool)
                pool = graph.graph.pool()
                self.graphs[size][id(model)] = graph


def fill_placeholders(input_ids: torch.Tensor, pairs: torch.Tensor, earlier_ids: torch.Tensor) -> None:
    """input_ids[pairs[0]] = earlier_ids[pairs[1]], on the device (no host synchronisation): placeholder input ids
    (by index) take the earlier step's sampled ids (by its row)."""
    targets, sources = pairs.long()
    input_ids.index_copy_(0, targets, earlier_ids.index_select(0, sources).to(input_ids.dtype))


def _zeros_on_first_touch(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor of zeros in anonymous memory that the OS maps only when a page is first touched (torch.zeros
    writes every byte at start-up: ~0.5 s and 2 GiB resident for the default CPU KV cache, however little of it a
    session uses). Huge pages are asked for, as torch's allocator gets them for large blocks (a first version on 4 KiB
    pages decoded a few per cent slower, though inside this machine's noise)."""
    nbytes = math.prod(shape) * dtype.itemsize
    memory = mmap.mmap(-1, nbytes)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        memory.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(memory, dtype=torch.uint8).view(dtype).view(shape)


class _DecodeGraph:
    """A decode forward + LM head for a fixed padded batch size, captured once over static input buffers.

    All per-step inputs travel in one pinned int32 buffer and one host-to-device copy; the graph itself widens
    ids, positions and slots to int64.
    """

    def __init__(self, runner: ModelRunner, batch_size: int, model, pool) -> None:
        dev = runner.device
        b, width = batch_size, runner.max_blocks_per_seq
        self.batch_size = batch_size
        # staged layout: ids [b] | positions [b] | slots [b] | seq_lens [b] | block tables [b, width] | placeholder
        # rows [b] | their sources [b] (async scheduling: which rows take which earlier sampled id; read outside
        # the graph)
        tables_end = 4 * b + b * width
        self.host = torch.zeros(tables_end + 2 * b, dtype=torch.int32, pin_memory=True)
        self.host_np = self.host.numpy()
        self.tables_np = self.host_np[4 * b: tables_end].reshape(b, width)
        self.fill_np = self.host_np[tables_end:].reshape(2, b)
        self.staged = torch.zeros_like(self.host, device=dev)
        self.seq_lens = self.staged[3 * b: 4 * b]
        self.block_tables = self.staged[4 * b: tables_end].view(b, width)
        self.fill = self.staged[tables_end:].view(2, b)
        # Recorded after each copy of `host`: the host buffer may be rewritten only once that copy ran (with async
        # scheduling the next step is staged while this one is still queued).
        self.copied = torch.cuda.Event()
        self._reset_padding(runner, 0)
        self.staged.copy_(self.host)
        self.meta = AttentionMetadata(
            slot_mapping=torch.empty(0, dtype=torch.long, device=dev),  # set inside the captured region
            query_start_loc=torch.arange(b + 1, dtype=torch.int32, device=dev),
            seq_lens=self.seq_lens,
            block_tables=self.block_tables,
            max_query_len=1,
            max_seq_len=width * runner.block_size,
            query_start_loc_cpu=list(range(b + 1)),
            seq_lens_cpu=[1] * b,
        )
        # Warm up outside the graph (Triton autotuning and lazy initialisation must not be captured).
        for _ in range(2):
            self._forward(model, runner)
        torch.cuda.synchronize(dev)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = self._forward(model, runner)
            self.greedy = greedy_pick(self.logits)

    def _forward(self, model, runner: ModelRunner) -> torch.Tensor:
        b = self.batch_size
        ids = self.staged[:b].long()
        positions = self.staged[b: 2 * b].long()
        self.meta.slot_mapping = self.staged[2 * b: 3 * b].long()
        hidden = model(ids, positions, runner.kv_cache, self.meta)
        return model.compute_logits(hidden)

    def _reset_padding(self, runner: ModelRunner, first_row: int) -> None:
        """Rows from first_row on are padding: token 0 at position 0, writing and reading slot 0 of block 0."""
        b = self.batch_size
        pad_slot = runner.pad_block * runner.block_size
        for k, value in enumerate((0, 0, pad_slot, 1)):
            self.host_np[k * b + first_row: (k + 1) * b] = value
        self.tables_np[first_row:, 0] = runner.pad_block

    def run(self, runner: ModelRunner, step: StepInput,
            fill: tuple[list[int], list[int], torch.Tensor] | None = None) -> torch.Tensor:
        """Replays the graph for `step` (at most batch_size decode rows); returns logits of all padded rows.
        fill: (rows, earlier rows, earlier sampled ids): those rows' input ids come from the device."""
        n = len(step.query_lens)
        b, bs = self.batch_size, runner.block_size
        self.copied.synchronize()
        h = self.host_np
        h[:n] = step.token_ids
        h[b: b + n] = step.positions
        h[2 * b: 2 * b + n] = [t[(s - 1) // bs] * bs + (s - 1) % bs for t, s in zip(step.block_tables, step.seq_lens)]
        h[3 * b: 3 * b + n] = step.seq_lens
        # Entries past a row's own blocks are stale but never read: attention stops at seq_len.
        for row, table in enumerate(step.block_tables):
            self.tables_np[row, : len(table)] = table
        self._reset_padding(runner, n)
        if fill is not None:
            rows, sources, earlier_ids = fill
            self.fill_np[0, : len(rows)] = rows
            self.fill_np[1, : len(rows)] = sources
        self.staged.copy_(self.host, non_blocking=True)
        self.copied.record()
        if fill is not None:
            fill_placeholders(self.staged[:b], self.fill[:, : len(rows)], earlier_ids)
        self.graph.replay()
        return self.logits
