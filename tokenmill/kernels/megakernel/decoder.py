"""MegakernelLlamaDecoder: a whole decode step of a bf16 Llama-family model as one persistent kernel launch.

Contract as FusedLlamaDecoder and the model (so the runner captures it in its per-batch-size CUDA graphs), plus
decode_logits(), which the runner prefers: the kernel ends in the LM head, so there is no hidden state to hand back.

Per batch size the decoder keeps a Schedule (instruction lists, schedule.py), its encoding on the device and the
scratch buffers the kernel writes (residual stream, q, attention output, MLP activation, split partials, logits,
counters). Each call zeroes the counters and launches once; weights are read in place from the model, except
the norm-folded copies of qkv, gate_up and the LM head (fold_norm).
"""

from __future__ import annotations

import logging
import os
import re

import torch

from tokenmill.kernels.megakernel.build import (
    MegakernelUnavailable, MegakernelUnsupported, encode_kv_tensor_map, load_kernel, pack_params,
)
from tokenmill.kernels.megakernel.schedule import (
    ATTN_PHASES, MATMUL_PHASES, MAX_ATTN_SPLITS, OP_ATTN, OP_DOWN, OP_O, XS_BUDGET, DecodeShape, Schedule,
    attention_item_costs, balanced_split_tokens, build_schedule, div_magic, ring_magic, unsupported_reason,
)
from tokenmill.kernels.megakernel.trace import stage_report, unwrap_timer
from tokenmill.layers.attention_metadata import AttentionMetadata

logger = logging.getLogger(__name__)

LOG2E = 1.4426950408889634
DEFAULT_MAX_INFLIGHT_CHUNKS = 2  # m12b: 1.5-2.5% faster than the ring's worth at batch 1-16
DEFAULT_PAUSE_RELEASE = 1  # m12e: 3-4% faster than 0 at batch 1-16
DEFAULT_MIN_SPLIT_TOKENS = 128
# m18b (H200): pairing items of >= 2 or >= 4 chunks, 0.5-0.9 % faster at 8-16 x 4k; >= 2 was 0.4 % slower at 4 x 1k
# (items of 2 chunks), >= 4 never slower.
DEFAULT_ATTN_PAIR_MIN_CHUNKS = 4
# m25a (H200): balanced attention splits at batch 9-14 (Llama-3.2-1B): 9 x 4k / 8k 0.940 / 0.827, 11 x 4k 0.932, 12 x
# 4k / 8k 0.968 / 0.905, 13 x 8k 0.976; 9 x 2k 1.015 (one split, other blocks than the unbalanced schedule's).
DEFAULT_ATTN_BALANCE_MAX = 8
DEFAULT_FOLD_NORM = 1  # m18c (H200): 1.0 / 2.5 / 3.9 % faster at 1 / 8 / 16 x 1k than HF's order
# Defaults that differ by card, each where an A/B on that card chose it (the H200's HBM is ~43 % faster: a chunk in
# flight lands sooner, and every wait behind one is shorter).
H200_CARDS = re.compile(r"\bH200\b")  # "NVIDIA H200", "NVIDIA H200 NVL"; not GH200 (not measured)
# m13: the tagged residual stream at batch 1 won on H200 (-2.1 %) and lost on H100 (+1.7 %), both in one-process
# A/Bs at 1 x 128 / 1k / 4k; on by default only on the cards where it won.
# H100 2026-11-27, ctx 1k: TMA tensor copies of attention's K / V beat one warp's cp.async from batch 2 on (batch 16
# 2.00 -> 1.64 ms) and lose ~13 us at batch 1 (one short chunk per item: 8 splits of 128 tokens); DECODE_NOTES m11.
# H200 2026-11-28: TMA at batch 1 as well: 1 x 4k 0.946 -> 0.904 ms, 1 x 128 / 1k within 0.4 % (m16a).
DEFAULT_ATTN_TMA_MIN_BATCH = 2
H200_ATTN_TMA_MIN_BATCH = 1
# The engine's megakernel tier at batch 9-16 (EngineConfig.megakernel_short_context). H100 m13: fused + PDL won
# 16 x 4k by 6 %. H200 m25a (decode_h200_m25a_b9_16.json, equal contexts): the megakernel won every batch 9-16 cell
# at 2k and 4k by 6-17 %, at 8k by 0-8 % (13 x 8k even), and lost at 16k from batch 13 on. Its attention splits are
# fixed per batch size, so a batch's attention takes as long as its longest sequence's (one 8k sequence among short
# ones costs about what eight do), while the fused kernels' split-KV grid spreads one long sequence over many SMs:
# 4k, where equal contexts win by 6 % or more, not 8k, where they win by 0-8 %.
DEFAULT_SHORT_CONTEXT = 1536
H200_SHORT_CONTEXT = 4096


def env_int(name: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
    """An integer tuning knob from the environment; MegakernelUnsupported (the engine then falls back, saying why)
    when it is not an integer in [minimum, maximum]."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise MegakernelUnsupported(f"{name} must be an integer, got {text!r}") from None
    if value < minimum:
        raise MegakernelUnsupported(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise MegakernelUnsupported(f"{name} must be <= {maximum}, got {value}")
    return value


def default_tag_residual(device_name: str) -> bool:
    """Whether the tagged residual stream is on by default on this card (the H200s: m13)."""
    return H200_CARDS.search(device_name) is not None


def default_attn_tma_min_batch(device_name: str) -> int:
    """From which batch size on attention's K / V arrive by TMA tensor copies by default on this card."""
    return H200_ATTN_TMA_MIN_BATCH if H200_CARDS.search(device_name) else DEFAULT_ATTN_TMA_MIN_BATCH


def default_short_context(device_name: str) -> int:
    """The engine's default megakernel_short_context on this card (config.EngineConfig): the longest context at which
    the megakernel takes decode batches 9-16."""
    return H200_SHORT_CONTEXT if H200_CARDS.search(device_name) else DEFAULT_SHORT_CONTEXT


def model_unsupported_reason(model: torch.nn.Module, device: torch.device | str) -> str | None:
    """Why the megakernel cannot run `model` on `device`, or None (does not compile anything)."""
    from tokenmill.models.llama import LlamaForCausalLM

    device = torch.device(device)
    if type(model) is not LlamaForCausalLM:
        return f"the megakernel implements the Llama family only, not {type(model).__name__}"
    if device.type != "cuda":
        return f"the megakernel runs on CUDA (sm_90a) GPUs, not {device}"
    if model.dtype != torch.bfloat16:
        return f"the megakernel reads bf16 weights; the model is {model.dtype}"
    linears = [m for layer in model.layers for m in (layer.attn.qkv_proj, layer.attn.o_proj,
                                                     layer.mlp.gate_up_proj, layer.mlp.down_proj)]
    if getattr(model, "quantized_lm_head", None) is not None or any(type(m) is not torch.nn.Linear for m in linears):
        return "the model's weights are quantized"
    if any(m.bias is not None for m in linears):
        return "the megakernel has no projection biases (Qwen2-style q/k/v bias)"
    return unsupported_reason(DecodeShape.of(model.config, 1))


class MegakernelLlamaDecoder:
    max_batch_size: int = 16

    def __init__(self, model: torch.nn.Module, max_batch: int | None = None) -> None:
        """max_batch: serve decode batches up to this size (the engine gives larger ones to the next backend); None:
        as large as the shapes allow (16)."""
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        device = next(model.parameters()).device
        reason = model_unsupported_reason(model, device)
        if reason is not None:
            raise MegakernelUnsupported(reason)
        self.model = model
        self.config = model.config
        self.device = device
        # 1: attention items claimed at run time from a per-layer counter, cut by the step's context lengths
        # (schedule.claim_plan; the kernel built with ATTN_CLAIM), instead of static ranges that assume equal
        # contexts. Prepared in session 26, not measured yet.
        self.attn_claim = bool(env_int("TOKENMILL_MEGAKERNEL_ATTN_CLAIM", 0, minimum=0, maximum=1))
        self.kernel = load_kernel(device.index or 0, model.config.head_dim,
                                  ("-DATTN_CLAIM=1",) if self.attn_claim else ())
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        cfg = model.config
        self.max_batch_size = max(b for b in range(1, 17) if unsupported_reason(DecodeShape.of(cfg, b)) is None)
        if max_batch is not None:
            self.max_batch_size = min(self.max_batch_size, max_batch)
        layer_ptrs = []
        for layer in model.layers:
            for w in (layer.attn_norm.weight, layer.attn.qkv_proj.weight, layer.attn.o_proj.weight,
                      layer.mlp_norm.weight, layer.mlp.gate_up_proj.weight, layer.mlp.down_proj.weight):
                if not w.is_contiguous():
                    raise MegakernelUnsupported("a weight is not contiguous")
                layer_ptrs.append(w.data_ptr())
        self.layer_ptrs = torch.tensor(layer_ptrs, dtype=torch.int64, device=device)
        self.embed = model.embed_tokens.weight
        self.lm_head_weight = model.lm_head_weight.contiguous()
        self.final_norm = model.norm.weight
        # The RMSNorm weights folded into the weights that read the normed rows (qkv, gate_up, the LM head): W * w,
        # rounded to bf16 once, so the kernel only scales each output row by 1 / rms (llama_decode.cu, stage_x).
        # Copies of those weights: 1.8 GB for Llama-3.2-1B, allocated here so the KV cache is sized after them.
        # TOKENMILL_MEGAKERNEL_FOLD_NORM=0 keeps HF's order (x * 1/rms rounded, times w rounded) on the model's own.
        self.fold_norm = bool(env_int("TOKENMILL_MEGAKERNEL_FOLD_NORM", DEFAULT_FOLD_NORM, minimum=0, maximum=1))
        self._folded: tuple[torch.Tensor, list[torch.Tensor], torch.Tensor] | None = None
        if self.fold_norm:
            self._folded_weights()
        self.cos = model.rotary.cos_cache.contiguous()
        self.sin = model.rotary.sin_cache.contiguous()
        self.scale = model.layers[0].attn.scale
        self._per_batch: dict[int, dict] = {}
        # Weight / KV chunks each SM's producer keeps asked for and not yet landed (0: as many as the ring holds).
        self.max_inflight_chunks = env_int("TOKENMILL_MEGAKERNEL_INFLIGHT", DEFAULT_MAX_INFLIGHT_CHUNKS, minimum=0)
        # The producer asks for no chunk of the next instruction while the consumers release one (their fence waits
        # for this SM's loads in flight): 1 from a matmul's last tile epilogue on, 2 only around the fences, 0 never.
        self.pause_release = env_int("TOKENMILL_MEGAKERNEL_PAUSE_RELEASE", DEFAULT_PAUSE_RELEASE, minimum=0,
                                     maximum=2)
        # At batch 1 the residual stream carries its writers' tags and o / down / embed release without a fence
        # (llama_decode.cu, "tagged residual stream"): 1 on, 0 off; the default depends on the card.
        card = torch.cuda.get_device_name(device)
        self.tag_residual = bool(env_int("TOKENMILL_MEGAKERNEL_TAG_RESIDUAL", int(default_tag_residual(card)),
                                         minimum=0, maximum=1))
        # From this batch size on, attention's past K / V arrive by TMA tensor copies (a KV block's rows of one head
        # per copy) instead of one warp's 16-byte cp.async, where the cache's geometry allows (kv_tensor_map).
        self.attn_tma_min_batch = env_int("TOKENMILL_MEGAKERNEL_ATTN_TMA_MIN_BATCH", default_attn_tma_min_batch(card),
                                          minimum=1)
        # (cache pointer, shape) -> its map on the GPU, or None where TMA does not apply. Kept for the decoder's
        # lifetime: a captured CUDA graph holds the map's address.
        self._kv_tensor_maps: dict[tuple, torch.Tensor | None] = {}
        # Fewest context tokens per attention split: shorter contexts use fewer splits (no merge for one split).
        self.min_split_tokens = env_int("TOKENMILL_MEGAKERNEL_MIN_SPLIT", DEFAULT_MIN_SPLIT_TOKENS, minimum=1)
        # Attention's context splits balance the SMs' K / V bytes with up to this many splits where one split per
        # (sequence, KV head) leaves blocks without attention (schedule.attention_splits); 0: never.
        self.attn_balance_max = env_int("TOKENMILL_MEGAKERNEL_ATTN_BALANCE", DEFAULT_ATTN_BALANCE_MAX, minimum=0,
                                        maximum=MAX_ATTN_SPLITS)
        # A balanced schedule's splits are used from this many tokens per split on (0: balanced_split_tokens' model).
        self.attn_balance_min_split = env_int("TOKENMILL_MEGAKERNEL_ATTN_BALANCE_MIN_SPLIT", 0, minimum=0)
        # 1: a balanced schedule's one-split contexts on the blocks the unbalanced schedule would give them
        # (schedule.whole_split_layout; prepared in session 25, not measured yet).
        self.attn_whole_layout = bool(env_int("TOKENMILL_MEGAKERNEL_ATTN_LAYOUT", 0, minimum=0, maximum=1))
        # Attention items of at least this many ring chunks are worked by the consumer warps in two halves on
        # alternate chunks (llama_decode.cu, run_attention_t); 0: never.
        self.attn_pair_min_chunks = env_int("TOKENMILL_MEGAKERNEL_ATTN_PAIR_MIN_CHUNKS", DEFAULT_ATTN_PAIR_MIN_CHUNKS,
                                            minimum=0)
        # Blocks launched in thread-block clusters of this many (1: no clusters), and at most this many blocks
        # (0: one per SM, or as many whole clusters as fit at once).
        self.cluster_size = env_int("TOKENMILL_MEGAKERNEL_CLUSTER", 1, minimum=1, maximum=16)
        self.max_blocks = env_int("TOKENMILL_MEGAKERNEL_BLOCKS", 0, minimum=0)
        # Activation bytes one K segment may stage (schedule.DecodeShape.xs_budget); where a batch's rows need more,
        # that batch keeps the default.
        self.xs_budget = env_int("TOKENMILL_MEGAKERNEL_XS_BUDGET", XS_BUDGET, minimum=1)
        # Tests: fill the kernel's outputs with NaN before each launch, so anything it fails to write shows.
        self.poison_scratch = False

    def _folded_weights(self) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """(layer pointers with qkv and gate_up replaced by their norm-folded copies, the copies, the folded LM head),
        built on first use."""
        if self._folded is None:
            def fold(weight: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
                return (weight.float() * norm.float()).to(weight.dtype).contiguous()

            ptrs, copies = [], []
            for layer in self.model.layers:
                qkv = fold(layer.attn.qkv_proj.weight, layer.attn_norm.weight)
                gate_up = fold(layer.mlp.gate_up_proj.weight, layer.mlp_norm.weight)
                copies += [qkv, gate_up]
                ptrs += [layer.attn_norm.weight.data_ptr(), qkv.data_ptr(), layer.attn.o_proj.weight.data_ptr(),
                         layer.mlp_norm.weight.data_ptr(), gate_up.data_ptr(), layer.mlp.down_proj.weight.data_ptr()]
            lm_head = fold(self.lm_head_weight, self.final_norm)
            self._folded = (torch.tensor(ptrs, dtype=torch.int64, device=self.device), copies, lm_head)
            size = sum(t.numel() * t.element_size() for t in [*copies, lm_head])
            logger.info("megakernel: RMSNorm weights folded into copies of qkv, gate_up and the LM head (%.2f GB; "
                        "TOKENMILL_MEGAKERNEL_FOLD_NORM=0 reads the model's weights instead)", size / 1e9)
        return self._folded

    # ---- per batch size ---------------------------------------------------------------------------------------

    def split_tokens(self, schedule: Schedule) -> int:
        """The fewest context tokens per attention split: min_split_tokens, or for a balanced schedule the length at
        which all its splits pay (schedule.balanced_split_tokens)."""
        if schedule.attn_balanced:
            return self.attn_balance_min_split or balanced_split_tokens(schedule.shape, schedule.num_blocks,
                                                                        schedule.attn_splits)
        return self.min_split_tokens

    def schedule(self, batch: int) -> Schedule:
        return self._state(batch)["schedule"]

    def _state(self, batch: int) -> dict:
        if batch not in self._per_batch:
            cfg, dev = self.config, self.device
            shape = DecodeShape.of(cfg, batch, self.xs_budget)
            if unsupported_reason(shape) is not None:  # a budget too small for this batch's rows: the default
                shape = DecodeShape.of(cfg, batch)
            schedule = build_schedule(shape, self._num_blocks(shape), self.attn_balance_max, self.attn_whole_layout,
                                      self.attn_claim)
            flat, counts = schedule.encoded()
            q_size = cfg.num_attention_heads * cfg.head_dim
            group = cfg.num_attention_heads // cfg.num_key_value_heads
            splits = schedule.attn_splits
            max_segs = max(shape.segs(OP_O), shape.segs(OP_DOWN))
            num_arrivals = cfg.num_hidden_layers * 2 * (cfg.hidden_size // 16) + \
                cfg.num_hidden_layers * batch * cfg.num_key_value_heads
            num_claim_counters = cfg.num_hidden_layers if schedule.attn_claim else 0
            self._per_batch[batch] = {
                "schedule": schedule,
                "shape": shape,
                "max_chunks": schedule.max_chunks,  # walks every instruction (ms): once, not per launch
                "instrs": torch.tensor(flat, dtype=torch.int32, device=dev),
                "counts": torch.tensor(counts, dtype=torch.int32, device=dev),
                # the residual stream: bf16, or (tagged, batch 1) 32-bit words of bf16 and the writing stage's tag;
                # all ones (tag 0xFFFF, which no stage writes) until a launch writes it
                "h": torch.full((batch, cfg.hidden_size), -1, dtype=torch.int32, device=dev),
                # launches so far: each launch's tags differ from the last's (counted up before the kernel; 64-bit,
                # since a 32-bit count wraps from 2^32 - 1 to 0, both multiples of 0xFFFF: the same tags twice)
                "epoch": torch.zeros(1, dtype=torch.int64, device=dev),
                "q": torch.empty(batch, q_size, dtype=torch.float32, device=dev),
                "attn": torch.empty(batch, q_size, dtype=torch.bfloat16, device=dev),
                "act": torch.empty(batch, cfg.intermediate_size, dtype=torch.bfloat16, device=dev),
                "part": torch.empty(max_segs * batch * cfg.hidden_size, dtype=torch.float32, device=dev),
                "o_part": torch.empty(batch * cfg.num_key_value_heads * splits * group * cfg.head_dim,
                                      dtype=torch.float32, device=dev),
                "ml_part": torch.empty(batch * cfg.num_key_value_heads * splits * group * 2,
                                       dtype=torch.float32, device=dev),
                "logits": torch.empty(batch, cfg.vocab_size, dtype=torch.float32, device=dev),
                # done counters (one per stage), arrival counters, then (attn_claim) claim counters (one per
                # layer), zeroed by one memset per launch
                "counters": torch.zeros(len(schedule.stages) + num_arrivals + num_claim_counters, dtype=torch.int32,
                                        device=dev),
                "num_arrivals": num_arrivals,
                "trace": None,
                "chunk_trace": None,
                "phase_trace": None,
            }
        return self._per_batch[batch]

    def _num_blocks(self, shape: DecodeShape) -> int:
        """Blocks to launch: one per SM, or with clusters as many whole clusters as fit at once; at most
        max_blocks (a multiple of the cluster size)."""
        c = self.cluster_size
        blocks = self.num_sms if c == 1 else self.kernel.max_cluster_blocks(c, shape.smem_bytes())
        if self.max_blocks:
            blocks = min(blocks, self.max_blocks // c * c)
        if blocks < 1:
            raise MegakernelUnsupported(f"no cluster of {c} blocks fits on this GPU")
        return blocks

    def enable_trace(self, batch: int, on: bool = True) -> None:
        """Makes the kernel record global-timer stamps for batch: per instruction (start, dependency met, end), per
        weight chunk (producer issued its copy, consumers found it landed) and per instruction the ends of its phases
        (trace.ATTENTION_PHASES of an attention instruction's last non-empty item; trace.MATMUL_PHASES)."""
        st = self._state(batch)
        schedule = st["schedule"]
        st["trace"] = torch.zeros(schedule.num_blocks * schedule.max_instrs * 3, dtype=torch.int64,
                                  device=self.device) if on else None
        st["chunk_trace"] = torch.zeros(schedule.num_blocks * st["max_chunks"] * 2, dtype=torch.int64,
                                        device=self.device) if on else None
        st["phase_trace"] = torch.zeros(schedule.num_blocks * schedule.max_instrs * ATTN_PHASES, dtype=torch.int64,
                                        device=self.device) if on else None

    def trace_stamps(self, batch: int) -> tuple[Schedule, list, list]:
        """(schedule, per-instruction stamps [block][instr][3], per-chunk stamps [block][chunk][2]) of the last traced
        launch, copied to the host once; tokenmill.kernels.megakernel.trace reads them."""
        st = self._traced_state(batch)
        schedule = st["schedule"]
        return (schedule, st["trace"].view(schedule.num_blocks, schedule.max_instrs, 3).tolist(),
                st["chunk_trace"].view(schedule.num_blocks, st["max_chunks"], 2).tolist())

    def phase_stamps(self, batch: int) -> list:
        """Per block and instruction, the ATTN_PHASES phase-end slots of the last traced launch: an attention
        instruction's ATTN_PHASES (zeros if its items were all empty), a matmul's first MATMUL_PHASES, zeros
        elsewhere. The kernel keeps the timer's low 32 bits; the instruction's "dependency met" stamp supplies the
        rest."""
        st = self._traced_state(batch)
        schedule = st["schedule"]
        lows = st["phase_trace"].view(schedule.num_blocks, schedule.max_instrs, ATTN_PHASES).tolist()
        met = st["trace"].view(schedule.num_blocks, schedule.max_instrs, 3)[:, :, 1].tolist()
        stamps = []
        for b, block in enumerate(lows):
            stamps.append([])
            for i, row in enumerate(block):
                # a matmul's slots past its stamps hold counts (repoll_counts), not stamps
                used = MATMUL_PHASES if _is_matmul_slot(schedule, b, i) else ATTN_PHASES
                stamps[-1].append([unwrap_timer(lo, met[b][i]) if lo and k < used else 0 for k, lo in enumerate(row)])
        return stamps

    def repoll_counts(self, batch: int) -> list[list[int]]:
        """Per block and instruction of the last traced launch: for a matmul that staged tagged words (batch 1),
        the most times one consumer re-read its words before they carried the writer's tag (0: all there at the
        first read); 0 elsewhere."""
        st = self._traced_state(batch)
        schedule = st["schedule"]
        slots = st["phase_trace"].view(schedule.num_blocks, schedule.max_instrs, ATTN_PHASES)[:, :, MATMUL_PHASES]
        return [[count if _is_matmul_slot(schedule, b, i) else 0 for i, count in enumerate(row)]
                for b, row in enumerate(slots.tolist())]

    def _traced_state(self, batch: int) -> dict:
        st = self._state(batch)
        if st["trace"] is None:
            raise ValueError("enable_trace(batch) first")
        return st

    def trace_report(self, batch: int) -> dict:
        """Per-stage timing of the last traced launch (trace.stage_report)."""
        schedule, instr_stamps, _ = self.trace_stamps(batch)
        return stage_report(schedule, instr_stamps)

    def kv_tensor_map(self, kv_cache: torch.Tensor) -> torch.Tensor | None:
        """The cache's TMA tensor map in GPU memory (the kernel reads it there); None where the cache does not fit
        TMA, or where it is first seen while a CUDA graph is being captured (the map's copy to the GPU cannot be
        captured): attention then copies with cp.async. The engine's warm-up launches build it before capture."""
        key = (kv_cache.data_ptr(), tuple(kv_cache.shape))
        if key not in self._kv_tensor_maps:
            if torch.cuda.is_current_stream_capturing():
                logger.info("megakernel: KV cache first seen during graph capture; its attention copies use cp.async")
                return None
            try:
                raw = encode_kv_tensor_map(self.kernel.libcuda, kv_cache)
                self._kv_tensor_maps[key] = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(self.device)
            except MegakernelUnsupported as exc:
                logger.info("megakernel attention copies K / V with cp.async, not TMA: %s", exc)
                self._kv_tensor_maps[key] = None
        return self._kv_tensor_maps[key]

    # ---- the step ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def decode_logits(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Runs the decode step; returns logits [M, vocab] fp32 (a buffer the next call with M rows overwrites)."""
        batch = input_ids.shape[0]
        if not meta.is_decode_only:
            raise ValueError("the megakernel runs decode-only batches (one new token per sequence)")
        if not 1 <= batch <= self.max_batch_size:
            raise ValueError(f"the megakernel runs batches of 1..{self.max_batch_size}, got {batch}")
        if meta.block_tables.shape[0] != batch or positions.shape != input_ids.shape:
            raise ValueError("one position, slot and block table row per token")
        if kv_cache.dtype != torch.bfloat16 or kv_cache.shape[0] != self.config.num_hidden_layers:
            raise ValueError("kv_cache must be bf16 with one entry per layer")
        st = self._state(batch)
        cfg = self.config
        ids = input_ids if input_ids.dtype == torch.int64 else input_ids.long()
        pos = positions if positions.dtype == torch.int64 else positions.long()
        slots = meta.slot_mapping if meta.slot_mapping.dtype == torch.int64 else meta.slot_mapping.long()
        seq_lens = meta.seq_lens if meta.seq_lens.dtype == torch.int32 else meta.seq_lens.int()
        tables = meta.block_tables if meta.block_tables.dtype == torch.int32 else meta.block_tables.int()
        if not (ids.is_contiguous() and pos.is_contiguous() and slots.is_contiguous() and seq_lens.is_contiguous()
                and tables.stride(-1) == 1 and kv_cache.is_contiguous()):
            raise ValueError("decode inputs and the KV cache must be contiguous")
        tagged = self.tag_residual and st["shape"].residual_tags_fit()
        if st.get("tagged") != tagged:  # bf16 pairs left by the other mode could read as a tag
            st["h"].fill_(-1)
            st["tagged"] = tagged
        if self.poison_scratch:
            for name in ("q", "attn", "act", "part", "o_part", "ml_part", "logits"):
                st[name].fill_(float("nan"))
            st["h"].fill_(-1)  # NaN values, and tag 0xFFFF, which no stage writes
        st["counters"].zero_()
        if tagged:  # (one more small kernel per step, only where the tags need it)
            st["epoch"].add_(1)
        schedule = st["schedule"]
        kv_tmap = self.kv_tensor_map(kv_cache) if batch >= self.attn_tma_min_batch else None
        if self.fold_norm:
            layer_ptrs, _, lm_head = self._folded_weights()
        else:
            layer_ptrs, lm_head = self.layer_ptrs, self.lm_head_weight
        kv_row_elems = cfg.num_key_value_heads * cfg.head_dim  # a token's K (or V) row: the tensor map's rows
        item_cost, merge_cost = attention_item_costs(cfg.head_dim)
        params = pack_params({
            "layers": layer_ptrs.data_ptr(),
            "embed": self.embed.data_ptr(),
            "lm_head": lm_head.data_ptr(),
            "final_norm": self.final_norm.data_ptr(),
            "cos_tab": self.cos.data_ptr(),
            "sin_tab": self.sin.data_ptr(),
            "input_ids": ids.data_ptr(),
            "positions": pos.data_ptr(),
            "slot_mapping": slots.data_ptr(),
            "seq_lens": seq_lens.data_ptr(),
            "block_tables": tables.data_ptr(),
            "bt_stride": tables.stride(0),
            "kv_cache": kv_cache.data_ptr(),
            "kv_layer_stride": kv_cache.stride(0),
            "kv_v_offset": kv_cache.stride(1),
            "block_size": kv_cache.shape[3],
            "h": st["h"].data_ptr(),
            "q": st["q"].data_ptr(),
            "attn": st["attn"].data_ptr(),
            "act": st["act"].data_ptr(),
            "part": st["part"].data_ptr(),
            "o_part": st["o_part"].data_ptr(),
            "ml_part": st["ml_part"].data_ptr(),
            "logits": st["logits"].data_ptr(),
            "done": st["counters"].data_ptr(),
            "epoch": st["epoch"].data_ptr(),
            "tagged": int(tagged),
            "arrivals": st["counters"].data_ptr() + 4 * len(schedule.stages),
            "instrs": st["instrs"].data_ptr(),
            "instr_counts": st["counts"].data_ptr(),
            "max_instrs": schedule.max_instrs,
            "M": batch,
            "hidden": cfg.hidden_size,
            "inter": cfg.intermediate_size,
            "vocab": cfg.vocab_size,
            "n_q_heads": cfg.num_attention_heads,
            "n_kv_heads": cfg.num_key_value_heads,
            "head_dim": cfg.head_dim,
            "num_layers": cfg.num_hidden_layers,
            "attn_splits": schedule.attn_splits,
            "min_split_tokens": self.split_tokens(schedule),
            "attn_pair_min_chunks": self.attn_pair_min_chunks,
            "norm_folded": int(self.fold_norm),
            "kseg_o": st["shape"].kseg(st["shape"].k(OP_O)),
            "kseg_down": st["shape"].kseg(st["shape"].k(OP_DOWN)),
            "num_stages": st["shape"].num_stages(),
            "ring_magic": ring_magic(st["shape"].num_stages()),
            "attn_split_magic": div_magic(schedule.attn_splits),
            "attn_item_magic": div_magic(schedule.attn_splits * cfg.num_key_value_heads),
            "block_magic": div_magic(kv_cache.shape[3]),
            "kv_layer_rows": kv_cache.stride(0) // kv_row_elems,
            "kv_v_rows": kv_cache.stride(1) // kv_row_elems,
            "attn_whole_splits": int(schedule.attn_balanced),
            "claim_counters": (st["counters"].data_ptr() + 4 * (len(schedule.stages) + st["num_arrivals"])
                               if schedule.attn_claim else 0),
            "claim_item_cost": item_cost,
            "claim_merge_cost": merge_cost,
            "kv_head_magic": div_magic(cfg.num_key_value_heads),
            "max_inflight": self.max_inflight_chunks,
            "pause_release": self.pause_release,
            "attn_tma": int(kv_tmap is not None),
            "kv_tmap": kv_tmap.data_ptr() if kv_tmap is not None else 0,
            "trace": st["trace"].data_ptr() if st["trace"] is not None else 0,
            "chunk_trace": st["chunk_trace"].data_ptr() if st["chunk_trace"] is not None else 0,
            "phase_trace": st["phase_trace"].data_ptr() if st["phase_trace"] is not None else 0,
            "max_chunks": st["max_chunks"],
            "eps": cfg.rms_norm_eps,
            "scale_log2": self.scale * LOG2E,
        })
        # Keep the converted inputs alive until the launch is enqueued.
        st["inputs"] = (ids, pos, slots, seq_lens, tables)
        self.kernel.launch(schedule.num_blocks, st["shape"].smem_bytes(), params,
                           torch.cuda.current_stream(self.device).cuda_stream, self.cluster_size)
        return st["logits"]

    @torch.no_grad()
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """The model's contract: returns 'hidden' rows for compute_logits. Here they are the logits already."""
        return self.decode_logits(input_ids, positions, kv_cache, meta)

    __call__ = forward

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Identity on what forward() returned (the kernel ends in the LM head); rows may have been selected."""
        if hidden.shape[-1] != self.config.vocab_size:
            raise ValueError("compute_logits expects the rows forward() returned")
        return hidden


def _is_matmul_slot(schedule: Schedule, block: int, index: int) -> bool:
    """Whether trace slot `index` of `block` belongs to an instruction whose phase slots are a matmul's (its stamps,
    then its re-read count), not attention's or an unused slot's."""
    return index < len(schedule.blocks[block]) and schedule.blocks[block][index].op != OP_ATTN


def make_megakernel_decoder(model: torch.nn.Module, device: torch.device | str, max_batch: int | None = None,
                            quiet: bool = False) -> MegakernelLlamaDecoder | None:
    """The megakernel decoder (batches up to max_batch), or None (with a log line saying why: a warning, or with
    `quiet` an info line) where it does not apply or cannot be built."""
    reason = model_unsupported_reason(model, device)
    if reason is None:
        try:
            return MegakernelLlamaDecoder(model, max_batch)
        except (MegakernelUnavailable, MegakernelUnsupported) as exc:
            reason = str(exc)
    logger.log(logging.INFO if quiet else logging.WARNING, "decode backend 'megakernel' does not apply (%s)", reason)
    return None
