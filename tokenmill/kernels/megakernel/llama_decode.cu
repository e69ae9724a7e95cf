// One decode step of a Llama-family model (bf16 weights, batch <= 16) in one persistent kernel.
//
// One block per SM, each with its own list of instructions (built and checked in Python: schedule.py).
// Warp 8 of every block is the *producer*: it walks the block's instruction list ahead of the others and streams
// each weight tile into a ring of shared-memory stages with bulk copies (cp.async.bulk, completion on an mbarrier),
// and attention's past-token K and V rows the same way (TMA tensor copies, or cp.async at batch 1). Neither
// depends on this step, so the producer runs ahead across instruction boundaries: while the consumer warps wait
// for an instruction's inputs (a dependency counter), that instruction's weights (or K and V) are already
// arriving. It keeps only 2 chunks in flight and holds back while the consumers release an instruction: a deeper
// HBM queue adds no bandwidth, and every fence waits for the SM's loads in flight.
// Warps 0-7 are the *consumers*: they wait for the instruction's dependency (acquire load of a global counter),
// stage the activations in shared memory (RMSNorm folded in), run the tile's dot products on tensor cores
// (mma.sync m16n8k16, weights as the A operand: 16 weight rows x batch columns), reduce across warps and run the
// op's epilogue (RoPE + KV-cache write, residual add, SiLU*up, logits), then release the stage's counter. (At batch
// 1 the residual stream can carry its writers' tags instead of a counter: "tagged residual stream" below.)
//
// Stages (in order): embed | per layer: qkv, attention, o, gate_up, down | lm_head. A stage's instructions wait
// only for the previous stage; every block runs its instructions in stage order, so the earliest unfinished stage
// can always progress (no deadlock with every block resident, which the cooperative launch guarantees).
//
// The Params struct is generated from build.PARAM_FIELDS and inserted before the PTX helpers.

#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

#define NUM_CONSUMER_WARPS 8
#define NUM_CONSUMERS (NUM_CONSUMER_WARPS * 32)
#define NUM_THREADS (NUM_CONSUMERS + 32)
#define TILE_ROWS 16
#define CHUNK_K 1024
#define MAX_STAGES 8  // ring stages: as many as fit next to the activation buffer (Params.num_stages)
#define ROW_PAD_BYTES 64  // row stride = 64 mod 128 bytes: the 8 lanes of one 16-byte load phase hit distinct banks
#define STAGE_ROW_BYTES (CHUNK_K * 2 + ROW_PAD_BYTES)
#define STAGE_BYTES (TILE_ROWS * STAGE_ROW_BYTES)
#define RED_BYTES (NUM_CONSUMER_WARPS * 2 * 32 * 16)
#define MISC_BYTES 2048
#define ATTN_CHUNK_BYTES 16384  // an attention chunk in a ring stage: K rows of its tokens, then V rows (16 KB each)
#define INSTR_INTS 8
#ifndef TAGGED_POLL_NS  // tagged staging: the sleep before a stale piece is read again (m20d: 256 ns ±0.3 %)
#define TAGGED_POLL_NS 32
#endif
#ifndef DEP_POLL_NS  // a dependency counter's poll sleeps this long between reads (m20e: 64 ns -0.4 % against
#define DEP_POLL_NS 64  // back to back, in 9 of 10 cells over two runs; relaxed polls and one fence +1.6 to +4 %)
#endif
#ifndef MATMUL_GROUPS  // 2: where a block has two tiles or more, two groups of four consumer warps take them in turn
#define MATMUL_GROUPS 2  // (m22a at batch > 8: 16 x 1k -3.8 %; m22b at batch <= 8: 1 x 1k -2.1 %); 1: eight warps a tile
#endif
#ifndef PAUSE_SPIN_NS  // the producer's poll of pause_ii sleeps this long between reads (0: a tight loop)
#define PAUSE_SPIN_NS 0
#endif
#define MAX_ATTN_SPLITS 32  // schedule.MAX_ATTN_SPLITS
#define ATTN_PHASES 7       // schedule.ATTN_PHASES: stamps per traced attention instruction
#define MATMUL_PHASES 3     // schedule.MATMUL_PHASES: per traced matmul instruction (in ATTN_PHASES slots)
// Context tokens per attention chunk: 128 for 64-dim heads.
#define ATTN_CHUNK_TOKENS (ATTN_CHUNK_BYTES / (2 * ATTN_HEAD_DIM))
static_assert(2 * ATTN_CHUNK_BYTES <= STAGE_BYTES, "an attention chunk's K and V fill one ring stage");

enum Op { OP_EMBED = 0, OP_QKV = 1, OP_ATTN = 2, OP_O = 3, OP_GATE_UP = 4, OP_DOWN = 5, OP_LM_HEAD = 6 };

struct LayerPtrs {
  const bf16* attn_norm;
  const bf16* qkv;
  const bf16* o;
  const bf16* mlp_norm;
  const bf16* gate_up;
  const bf16* down;
};

// ---- PTX helpers -----------------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count));
}

__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}

__device__ __forceinline__ void mbar_arrive_count(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}

__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n"
      "}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}

__device__ __forceinline__ uint64_t evict_first_policy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  return policy;
}

// Bulk copy global -> this CTA's shared memory; completes `bytes` of the mbarrier's transaction count.
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes, uint64_t* bar, uint64_t policy) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;" ::
          "r"(smem_addr(dst)),
      "l"(src), "r"(bytes), "r"(smem_addr(bar)), "l"(policy)
      : "memory");
}

// A 16-byte copy global -> shared memory (shared address dst) through L2 only; cp.async.wait_all completes it.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}

// A 3-D tensor copy (TMA) of one box of `tmap` at coordinates (c0, c1, c2) into shared memory, completion on `bar`.
__device__ __forceinline__ void tma_load_3d(void* dst, const void* tmap, int c0, int c1, int c2, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];"
      ::"r"(smem_addr(dst)), "l"(tmap), "r"(c0), "r"(c1), "r"(c2), "r"(smem_addr(bar))
      : "memory");
}

__device__ __forceinline__ int ld_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void red_release_add(int* p, int v) {
  asm volatile("red.release.gpu.global.add.s32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ int atom_acq_rel_add(int* p, int v) {
  int old;
  asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v) : "memory");
  return old;
}

// ---- tagged residual stream (p.tagged: batch 1) ----------------------------------------------------------------
// With p.tagged, h holds 32-bit words: a bf16 value in the low half, in the high half the tag of the stage that
// wrote it. The stages that write h (embed, o, down) then release no counter, so they pay no fence (which waits for
// every load the SM has in flight); the stages that read it (qkv, gate_up, the LM head) copy the words until every
// one carries the tag of the stage they depend on: the data is its own completion flag (NCCL's LL protocol). Tag =
// (epoch x stages + stage) mod 0xFFFF, the epoch counted up once per tagged launch; 0xFFFF never occurs (the
// decoder poisons with all ones). The words go through shared memory (cp.async) rather than registers, whose every
// one the kernel uses (a register version spilled, m12d): into the activation buffer behind the staged row (batch 1
// only, where xs has room for both: DecodeShape.residual_tags_fit). Measured (m13): 2 % faster on the H200, 2 %
// slower on the H100, whose readers wait longer behind their SM's weight chunks in flight; the decoder's default
// follows the card.
#define NO_TAG 0xFFFFFFFFu

__device__ __forceinline__ void st_tagged(uint32_t* p, bf16 value, uint32_t tag) {
  const uint32_t word = (tag << 16) | (uint32_t)__bfloat16_as_ushort(value);
  asm volatile("st.relaxed.gpu.global.b32 [%0], %1;" ::"l"(p), "r"(word) : "memory");
}

// Eight packed bf16 as eight tagged words at p (32-byte aligned).
__device__ __forceinline__ void st_tagged8(uint32_t* p, uint4 x, uint32_t tag) {
  const uint32_t w[8] = {__byte_perm(x.x, tag, 0x5410), __byte_perm(x.x, tag, 0x5432), __byte_perm(x.y, tag, 0x5410),
                         __byte_perm(x.y, tag, 0x5432), __byte_perm(x.z, tag, 0x5410), __byte_perm(x.z, tag, 0x5432),
                         __byte_perm(x.w, tag, 0x5410), __byte_perm(x.w, tag, 0x5432)};
  asm volatile("st.relaxed.gpu.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w[0]), "r"(w[1]), "r"(w[2]),
               "r"(w[3]) : "memory");
  asm volatile("st.relaxed.gpu.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p + 4), "r"(w[4]), "r"(w[5]), "r"(w[6]),
               "r"(w[7]) : "memory");
}

// One tagged word as a float, once it carries `tag`.
__device__ __forceinline__ float ld_tagged(const uint32_t* p, uint32_t tag) {
  uint32_t word;
  while (true) {
    asm volatile("ld.relaxed.gpu.global.b32 %0, [%1];" : "=r"(word) : "l"(p) : "memory");
    if (word >> 16 == tag) break;
    __nanosleep(32);
  }
  return __uint_as_float(word << 16);
}

__device__ __forceinline__ bool carries(uint4 w, uint32_t tag) {
  return (w.x >> 16 == tag) & (w.y >> 16 == tag) & (w.z >> 16 == tag) & (w.w >> 16 == tag);
}

// The bf16 halves of eight tagged words, packed as eight bf16 (16 bytes).
__device__ __forceinline__ uint4 tagged_values8(uint4 lo, uint4 hi) {
  return make_uint4(__byte_perm(lo.x, lo.y, 0x5410), __byte_perm(lo.z, lo.w, 0x5410), __byte_perm(hi.x, hi.y, 0x5410),
                    __byte_perm(hi.z, hi.w, 0x5410));
}

// Barrier of the consumer warps only (the producer warp never joins it).
__device__ __forceinline__ void consumer_sync() { asm volatile("bar.sync 1, %0;" ::"n"(NUM_CONSUMERS) : "memory"); }
// One half of the consumers (MATMUL_GROUPS 2): named barrier 2 or 3.
__device__ __forceinline__ void group_sync(int group) {
  if (group)
    asm volatile("bar.sync 3, %0;" ::"n"(NUM_CONSUMERS / 2) : "memory");
  else
    asm volatile("bar.sync 2, %0;" ::"n"(NUM_CONSUMERS / 2) : "memory");
}

__device__ __forceinline__ void mma_bf16(float* c, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ long long globaltimer() {
  long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}

// The low 32 bits (wraps every 4.3 s): one register where a stamp must not cost the loop a spill.
__device__ __forceinline__ uint32_t globaltimer_lo() {
  uint32_t t;
  asm volatile("mov.u32 %0, %globaltimer_lo;" : "=r"(t));
  return t;
}

__device__ __forceinline__ float bf16_round(float x) { return __bfloat162float(__float2bfloat16(x)); }

// RMSNorm of two packed bf16 values x with their weights w, in HF's order: (x * rstd) rounded to bf16, times w
// rounded to bf16 (the bf16 product is exact in fp32, so the packed multiply rounds as fp32-then-bf16 would).
__device__ __forceinline__ uint32_t rmsnorm_pair(uint32_t x, uint32_t w, float rstd) {
  const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&x));
  const __nv_bfloat162 xn = __floats2bfloat162_rn(f.x * rstd, f.y * rstd);
  const __nv_bfloat162 y = __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&w), xn);
  return *reinterpret_cast<const uint32_t*>(&y);
}

// ---- ops: weights, shapes, tile rows --------------------------------------------------------------------------

struct OpInfo {
  const bf16* weight;  // [N, K] row-major
  int K;
  int kseg;  // K is reduced in segments of kseg (several segments: split-K with a fix-up by the last to arrive)
};

__device__ __forceinline__ OpInfo op_info(const Params& p, int op, int layer) {
  const LayerPtrs& L = p.layers[layer < 0 ? 0 : layer];
  switch (op) {
    case OP_QKV: return {L.qkv, (int)p.hidden, (int)p.hidden};
    case OP_O: return {L.o, (int)(p.n_q_heads * p.head_dim), (int)p.kseg_o};
    case OP_GATE_UP: return {L.gate_up, (int)p.hidden, (int)p.hidden};
    case OP_DOWN: return {L.down, (int)p.inter, (int)p.kseg_down};
    default: return {p.lm_head, (int)p.hidden, (int)p.hidden};
  }
}

// Row i (0..15) of weight tile `tile`. Paired ops put a row and its partner in rows i and i + 8 of one tile, which
// the mma accumulator hands to the same thread: RoPE halves (q and k heads) and gate/up.
// The head dim qkv's rows are laid out by: ATTN_HEAD_DIM, not p.head_dim (the kernel traps unless they are equal),
// so that the divisions by it in the producer's row lookups and qkv's epilogue are shifts, not ~20-instruction
// integer divisions (m24b: 16 x 1k -1.5 %, 1 x 1k -0.5 %). A function: the constant spelled out at its three uses
// changed ptxas's register allocation (156 registers at 128-dim heads against 144), away from the measured build.
__device__ __forceinline__ int qkv_head_dim(const Params&) { return ATTN_HEAD_DIM; }

__device__ __forceinline__ int tile_row(const Params& p, int op, int tile, int i) {
  if (op == OP_QKV) {
    const int D = qkv_head_dim(p), tiles_per_head = D / 16;
    const int rope_tiles = (int)(p.n_q_heads + p.n_kv_heads) * tiles_per_head;
    if (tile < rope_tiles) {
      const int head = tile / tiles_per_head, j = tile % tiles_per_head;
      return head * D + 8 * j + (i & 7) + (i >> 3) * (D / 2);
    }
    return rope_tiles * 16 + (tile - rope_tiles) * 16 + i;
  }
  if (op == OP_GATE_UP) return 8 * tile + (i & 7) + (i >> 3) * (int)p.inter;
  return 16 * tile + i;
}

__device__ __forceinline__ bool is_matmul(int op) { return op != OP_EMBED && op != OP_ATTN; }

// ---- attention work items ----------------------------------------------------------------------------------

// Attention work item = (sequence m, KV head kvh, context split): tokens [t0, t1) of the sequence's L (the last of
// them, L - 1, is this step's token). A split covers at least min_split_tokens tokens, rounded up to 16 (a chunk then
// starts on a TMA box: a KV block's 16 rows, or all of a smaller block), so short contexts use fewer splits: `splits`
// counts the non-empty ones, and an item with split >= splits is empty.
struct AttnItem {
  int m, kvh, split, L, t0, t1, splits;
};

// x / n for x < 2^32 / n, given magic = schedule.div_magic(n) = 2^32 / n rounded up (up to 2^32: 64-bit; ring_use
// below is the 32-bit form, for the ring's stage count, whose magic always fits).
__device__ __forceinline__ uint32_t div_by_magic(uint32_t x, uint64_t magic) {
  return (uint32_t)(((uint64_t)x * magic) >> 32);
}

__device__ __forceinline__ AttnItem attn_item(const Params& p, int item) {
  const int S = (int)p.attn_splits, Hkv = (int)p.n_kv_heads;
  AttnItem a;
  // m24c: the item's coordinates by multiply-highs; the compiler's integer division by a runtime value is
  // ~20 dependent instructions, and the producer's cursor and the consumers take an item's apart once each.
  const int q = (int)div_by_magic(item, p.attn_split_magic);  // item / S
  a.m = (int)div_by_magic(item, p.attn_item_magic);           // item / (S * Hkv)
  a.split = item - q * S;
  a.kvh = q - a.m * Hkv;
  a.L = p.seq_lens[a.m];
  const int even = (int)div_by_magic(a.L + S - 1, p.attn_split_magic);  // ceil(L / S)
  // Balanced schedules (p.attn_whole_splits, schedule.attention_splits): all S splits where each holds at least
  // min_split_tokens, else one; otherwise as many splits of at least min_split_tokens as the context fills.
  const int least = (int)p.min_split_tokens;
  const int tokens = !p.attn_whole_splits ? max(even, least) : even >= least ? even : max(a.L, 1);
  const int per_split = (tokens + 15) / 16 * 16;
  a.t0 = a.split * per_split;
  a.t1 = min(a.L, a.t0 + per_split);
  a.splits = max(1, (a.L + per_split - 1) / per_split);
  return a;
}

// ---- attention items claimed at run time (ATTN_CLAIM) -------------------------------------------------------------

// Under ATTN_CLAIM every block holds each attention stage's instruction, and its producer takes items from the
// layer's counter (p.claim_counters) one at a time: whichever block is free takes the next item, so contexts of any
// lengths spread over the SMs (the static ranges assume equal ones). The items come from the step's context lengths
// (claim_plan, computed once per step by each producer), longest sequence first. The producer posts each claimed item
// to its consumers through a small mailbox in shared memory, before the item's chunks, so that they load q while
// the K / V chunks land; an item with m < 0 ends the block's share of the stage.
// The producer claims an item only once its mailbox has room: with one slot, once the consumers have taken the
// previous item, so a block holds at most the item it works and the next (a producer far ahead of its consumers
// would otherwise take items that idle blocks could work, e.g. one-chunk items at batch 1).
#ifndef CLAIM_BOX
#define CLAIM_BOX 1
#endif

struct ClaimBox {
  uint64_t full[CLAIM_BOX];   // the producer's post (count 1)
  uint64_t empty[CLAIM_BOX];  // read by every consumer warp (count NUM_CONSUMER_WARPS)
  AttnItem item[CLAIM_BOX];
};

#ifdef ATTN_CLAIM
// The producer's plan of the step's claimed attention stages, as schedule.claim_plan (its reference): lane r holds
// the sequence r-th in claim order (longest first, ties by index), its tokens per item and items per KV head, and
// `first`, the stage's items before that sequence's (INT_MAX on lanes past the batch). `items`: the stage's total.
struct ClaimPlan {
  int m, L, per_split, splits, first, items;
};

__device__ __forceinline__ int round_up16(int x) { return (x + 15) & ~15; }

// Per-lane items of a context of L tokens cut into items of at most t tokens (t a multiple of 16), and their size.
__device__ __forceinline__ int claim_splits(int L, int t, int& per_split) {
  const int parts = max(1, (L + t - 1) / t);
  per_split = round_up16(max((L + parts - 1) / parts, 1));
  return max(1, (L + per_split - 1) / per_split);
}

__device__ __forceinline__ ClaimPlan claim_plan(const Params& p) {
  const int lane = threadIdx.x & 31, M = (int)p.M, Hkv = (int)p.n_kv_heads;
  const bool seq = lane < M;
  const int L = seq ? max(p.seq_lens[lane], 0) : 0;
  int longest = L, total = L;
#pragma unroll
  for (int off = 16; off; off >>= 1) {
    longest = max(longest, __shfl_xor_sync(0xffffffffu, longest, off));
    total += __shfl_xor_sync(0xffffffffu, total, off);
  }
  // Items of at most t tokens, t = the longest context / s rounded up to 16, for the s with the least estimated
  // time: rounds of the largest item (items + their fixed cost over every block), plus a merge if any context splits.
  // 32-bit: every value below is under Hkv x (all tokens + the items' costs), < 2^32 for any batch the kernel runs
  // at contexts up to millions of tokens (a 64-bit division is a ~100-instruction call, 32 times here).
  const uint32_t item_cost = (uint32_t)p.claim_item_cost, blocks = gridDim.x;
  int best_t = 0;
  uint32_t best_cost = 0;
  for (int s = 1; s <= MAX_ATTN_SPLITS; ++s) {
    const int t = round_up16(max((longest + s - 1) / s, 1));
    if (s > 1 && t < (int)p.min_split_tokens) break;
    int per_split, splits = seq ? claim_splits(L, t, per_split) : 0, most = splits;
#pragma unroll
    for (int off = 16; off; off >>= 1) {
      splits += __shfl_xor_sync(0xffffffffu, splits, off);
      most = max(most, __shfl_xor_sync(0xffffffffu, most, off));
    }
    const uint32_t size = t + item_cost, work = Hkv * (total + item_cost * splits);
    const uint32_t merge = most > 1 ? (uint32_t)p.claim_merge_cost : 0u;
    const uint32_t cost = (work + blocks * size - 1) / (blocks * size) * size + merge;
    if (best_t == 0 || cost < best_cost) {
      best_t = t;
      best_cost = cost;
    }
  }
  int per_split = 0;
  const int splits = seq ? claim_splits(L, best_t, per_split) : 0;
  int rank = 0;
  for (int j = 0; j < M; ++j) {
    const int Lj = __shfl_sync(0xffffffffu, L, j);
    rank += Lj > L || (Lj == L && j < lane);
  }
  int before = 0, all = 0, src = 0;  // src: the lane of the sequence ranked `lane`
  for (int j = 0; j < M; ++j) {
    const int rj = __shfl_sync(0xffffffffu, rank, j), sj = __shfl_sync(0xffffffffu, splits, j);
    before += rj < rank ? sj : 0;
    all += sj;
    src = rj == lane ? j : src;
  }
  ClaimPlan c;
  c.m = src;
  c.L = __shfl_sync(0xffffffffu, L, src);
  c.per_split = __shfl_sync(0xffffffffu, per_split, src);
  c.splits = __shfl_sync(0xffffffffu, splits, src);
  c.first = __shfl_sync(0xffffffffu, before, src) * Hkv;
  if (!seq) c.first = INT_MAX;
  c.items = all * Hkv;
  return c;
}

// Item `id` (< c.items) of a claimed stage, as schedule.claim_items: sequences in claim order, each split-major.
__device__ __forceinline__ AttnItem claimed_item(const Params& p, const ClaimPlan& c, int id) {
  const int Hkv = (int)p.n_kv_heads;
  const int r = 31 - __clz(__ballot_sync(0xffffffffu, c.first <= id));  // firsts increase with the rank
  AttnItem a;
  a.m = __shfl_sync(0xffffffffu, c.m, r);
  a.L = __shfl_sync(0xffffffffu, c.L, r);
  a.splits = __shfl_sync(0xffffffffu, c.splits, r);
  const int per_split = __shfl_sync(0xffffffffu, c.per_split, r);
  const int local = id - __shfl_sync(0xffffffffu, c.first, r);
  a.split = (int)div_by_magic(local, p.kv_head_magic);
  a.kvh = local - a.split * Hkv;
  a.t0 = a.split * per_split;
  a.t1 = min(a.L, a.t0 + per_split);
  return a;
}

// The producer (warp-wide) waits until its n-th post of the step has a free slot before it claims the item
// (box_free), then posts it (post_claimed).
__device__ __forceinline__ void box_free(ClaimBox* box, uint32_t n) {
  mbar_wait(&box->empty[n % CLAIM_BOX], ((n / CLAIM_BOX) & 1) ^ 1);
}

__device__ __forceinline__ void post_claimed(ClaimBox* box, uint32_t n, const AttnItem& a) {
  const int k = n % CLAIM_BOX;
  if ((threadIdx.x & 31) == 0) {
    box->item[k] = a;
    mbar_arrive(&box->full[k]);  // release: the item's stores before it
  }
  __syncwarp();
}

// Whether the producer's n-th post of the step has arrived and ends the stage (the item taken before it was the
// block's last): a look without waiting (mbarrier.test_wait, acquire), false while the post is not there yet.
__device__ __forceinline__ bool claimed_end_posted(ClaimBox* box, uint32_t n) {
  const int k = n % CLAIM_BOX;
  uint32_t posted;
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "mbarrier.test_wait.parity.shared::cta.b64 done, [%1], %2;\n"
      "selp.u32 %0, 1, 0, done;\n"
      "}\n"
      : "=r"(posted)
      : "r"(smem_addr(&box->full[k])), "r"((n / CLAIM_BOX) & 1)
      : "memory");
  return posted && box->item[k].m < 0;
}

// The consumers' n-th take of the step (every consumer thread; n counts in each).
__device__ __forceinline__ AttnItem take_claimed(ClaimBox* box, uint32_t& n) {
  const int k = n % CLAIM_BOX;
  mbar_wait(&box->full[k], (n / CLAIM_BOX) & 1);
  ++n;
  const AttnItem a = box->item[k];  // (after the wait: its asm clobbers memory)
  __syncwarp();
  if ((threadIdx.x & 31) == 0) mbar_arrive(&box->empty[k]);
  return a;
}
#endif

// ---- producer ---------------------------------------------------------------------------------------------------

// Position in a block's stream of ring chunks; ii == count once past the end. A matmul chunk is (instruction,
// tile, K offset kc); an attention chunk is (instruction, item = tile, first token kc of the item's [.., k1)), with
// info.weight the layer's K cache and m, kvh from the item.
struct Cursor {
  int ii, op, tile, tile_end, k0, kc, k1;
  int m, kvh;
  int kv_row0;  // attention under p.attn_tma: the layer's first K row in the KV tensor map
  OpInfo info;
#ifdef ATTN_CLAIM
  int layer;        // the attention instruction's
  uint32_t claims;  // items posted so far this step (the mailbox's sequence)
  bool planned;     // plan computed (at the step's first attention instruction)
  ClaimPlan plan;
  ClaimBox* box;
#endif
};

// Points an attention cursor at item c.tile; false when the item has no context tokens (no chunks).
__device__ __forceinline__ bool cursor_attention_item(const Params& p, Cursor& c) {
  const AttnItem a = attn_item(p, c.tile);
  c.kc = a.t0;
  c.k1 = a.t1;
  c.m = a.m;
  c.kvh = a.kvh;
  return a.t1 > a.t0;  // (split < splits just as well: a split past the last is empty; no division for splits here)
}

#ifdef ATTN_CLAIM
// Claims items of the cursor's attention stage until one has context tokens (true: c points at its first chunk) or
// the stage has none left (false: the end is posted). Every claimed item is posted, empty ones too: their
// (sequence, KV head) completes all the same.
__device__ __forceinline__ bool cursor_claim(const Params& p, Cursor& c) {
  if (!c.planned) {
    c.plan = claim_plan(p);
    c.planned = true;
  }
  for (;;) {
    box_free(c.box, c.claims);
    int id = 0;
    if ((threadIdx.x & 31) == 0) id = atomicAdd(p.claim_counters + c.layer, 1);
    id = __shfl_sync(0xffffffffu, id, 0);
    AttnItem a;
    if (id < c.plan.items) {
      a = claimed_item(p, c.plan, id);
    } else {
      a.m = -1;
      a.t0 = a.t1 = 0;
    }
    post_claimed(c.box, c.claims++, a);
    if (a.m < 0) return false;
    if (a.t1 > a.t0) {
      c.kc = a.t0;
      c.k1 = a.t1;
      c.m = a.m;
      c.kvh = a.kvh;
      return true;
    }
  }
}
#endif

__device__ __forceinline__ void cursor_seek(const Params& p, const int* instrs, int count, Cursor& c) {
  for (; c.ii < count; ++c.ii) {
    const int* in = instrs + c.ii * INSTR_INTS;
    if (is_matmul(in[0]) && in[3] < in[4]) {
      c.op = in[0];
      c.info = op_info(p, in[0], in[1]);
      c.k0 = c.kc = in[2] * c.info.kseg;
      c.k1 = min(c.info.K, c.k0 + c.info.kseg);
      c.tile = in[3];
      c.tile_end = in[4];
      return;
    }
    if (in[0] == OP_ATTN) {
      c.op = OP_ATTN;
      c.info.weight = p.kv_cache + in[1] * p.kv_layer_stride;
      c.kv_row0 = in[1] * (int)p.kv_layer_rows;
#ifdef ATTN_CLAIM
      c.layer = in[1];
      if (cursor_claim(p, c)) return;
#else
      c.tile_end = in[4];
      for (c.tile = in[3]; c.tile < c.tile_end; ++c.tile)
        if (cursor_attention_item(p, c)) return;
#endif
    }
  }
}

__device__ __forceinline__ void cursor_next(const Params& p, const int* instrs, int count, Cursor& c) {
  if (c.op == OP_ATTN) {
    c.kc += ATTN_CHUNK_TOKENS;
    if (c.kc < c.k1) return;
#ifdef ATTN_CLAIM
    if (cursor_claim(p, c)) return;
#else
    while (++c.tile < c.tile_end)
      if (cursor_attention_item(p, c)) return;
#endif
    ++c.ii;
    cursor_seek(p, instrs, count, c);
    return;
  }
  c.kc += CHUNK_K;
  if (c.kc < c.k1) return;
  c.kc = c.k0;
  if (++c.tile < c.tile_end) return;
  ++c.ii;
  cursor_seek(p, instrs, count, c);
}

// The block-table entry lane needs first for an attention chunk: under p.attn_tma its box's (box = lane, the K and
// V boxes in turn), else its lane-th KV block of the chunk's; 0 for a lane with none.
__device__ __forceinline__ int attention_lane_block(const Params& p, const Cursor& c) {
  const int lane = threadIdx.x & 31, BS = (int)p.block_size;
  const int n = min(ATTN_CHUNK_TOKENS, c.k1 - c.kc);
  const int* table = p.block_tables + (size_t)c.m * p.bt_stride;
  if (p.attn_tma) {
    const int box = min(BS, 16), boxes = box == 16 ? (n + 15) >> 4 : (n + box - 1) / box;
    return lane < 2 * boxes ? __ldg(table + div_by_magic(c.kc + (lane >> 1) * box, p.block_magic)) : 0;
  }
  const int first_block = (int)div_by_magic(c.kc, p.block_magic);
  const int blocks = (int)div_by_magic(c.kc + n - 1, p.block_magic) - first_block + 1;
  return lane < blocks ? __ldg(table + first_block + lane) : 0;
}

// An attention chunk: the K rows (then, ATTN_CHUNK_BYTES on, the V rows) of up to ATTN_CHUNK_TOKENS context tokens
// of one item. Past tokens' K and V do not depend on this step, so they stream in ahead like weights; the row of
// this step's token comes along stale and the consumers overwrite it after their dependency.
// With p.attn_tma, one TMA tensor copy per (KV block's box of up to 16 rows, K or V); else the warp copies 16-byte
// pieces with cp.async, NVEC lanes per row (the rows, 128 bytes for 64-dim heads, are too short for plain bulk
// copies: ~7 us per 32 KB chunk measured), each lane's copies arriving on the stage's mbarrier.
// lane_block: attention_lane_block(p, c).
__device__ __forceinline__ void produce_attention_chunk(const Params& p, const Cursor& c, int lane_block, char* stage,
                                                        uint64_t* full) {
  constexpr int D = ATTN_HEAD_DIM, NVEC = D / 8, ROWS_PER_PASS = 32 / NVEC;
  const int lane = threadIdx.x & 31, vec = lane % NVEC;
  const int n = min(ATTN_CHUNK_TOKENS, c.k1 - c.kc), BS = (int)p.block_size, Hkv = (int)p.n_kv_heads;
  const int* table = p.block_tables + (size_t)c.m * p.bt_stride;
  if (p.attn_tma) {
    // Token rows of the tensor map (all layers, K and V, every block's slots): this layer's K rows start at
    // layer_row, its V rows v_rows later. A chunk starts on a box (attn_item) and a box stays in one KV block.
    // (no 64-bit division of a pointer difference per chunk; a KV block by a multiply-high)
    const int box = min(BS, 16), boxes = box == 16 ? (n + 15) >> 4 : (n + box - 1) / box;
    const int layer_row = c.kv_row0, v_rows = (int)p.kv_v_rows;
    if (lane == 0) mbar_expect_tx(full, boxes * 2 * box * D * 2);
    __syncwarp();
    for (int b = lane; b < 2 * boxes; b += 32) {
      const int kv = b & 1, pos = c.kc + (b >> 1) * box;
      const int blk = (int)div_by_magic(pos, p.block_magic);
      const int entry = b == lane ? lane_block : __ldg(table + blk);  // (b >= 32: KV blocks under 16 tokens)
      const int row = layer_row + kv * v_rows + entry * BS + (pos - blk * BS);
      tma_load_3d(stage + kv * ATTN_CHUNK_BYTES + (pos - c.kc) * D * 2, p.kv_tmap, 0, c.kvh, row, full);
    }
    return;
  }
  const int first_block = (int)div_by_magic(c.kc, p.block_magic);
  // The lane's token, its KV block (relative to the chunk's first) and slot in it, advanced by additions only: one
  // warp issues every copy of the chunk, so its instruction count is the chunk's issue time.
  const long long row_stride = (long long)Hkv * D, block_stride = (long long)BS * row_stride;
  const bf16* src0 = c.info.weight + c.kvh * D + vec * 8;
  int i = lane / NVEC, pos = c.kc + i, rel = (int)div_by_magic(pos, p.block_magic) - first_block;
  int slot = pos - (first_block + rel) * BS;
  uint32_t dst = smem_addr(stage + (i * D + vec * 8) * 2);
  for (int i0 = 0; i0 < n; i0 += ROWS_PER_PASS) {
    int block = __shfl_sync(0xffffffffu, lane_block, rel & 31);
    if (i < n) {
      if (rel >= 32) block = __ldg(table + first_block + rel);  // a chunk over more than 32 KV blocks
      const bf16* src = src0 + block * block_stride + slot * row_stride;
      cp_async16(dst, src);
      cp_async16(dst + ATTN_CHUNK_BYTES, src + p.kv_v_offset);
    }
    i += ROWS_PER_PASS;
    pos += ROWS_PER_PASS;
    dst += ROWS_PER_PASS * D * 2;
    for (slot += ROWS_PER_PASS; slot >= BS; slot -= BS) ++rel;
  }
  // Each lane's arrival waits for its copies (and counts itself in: net zero); lane 0's is the one expected.
  asm volatile("cp.async.mbarrier.arrive.shared::cta.b64 [%0];" ::"r"(smem_addr(full)) : "memory");
  __syncwarp();
  if (lane == 0) mbar_arrive(full);
}

// Chunk c of a block sits in ring slot c % num_stages, in that slot's (c / num_stages)-th use. The quotient is a
// multiply-high by p.ring_magic (schedule.ring_magic: 2^32 / num_stages rounded up, exact for c < 2^32 / num_stages):
// the integer division by the runtime num_stages was ~20 dependent instructions, a MUFU among them, in front of
// every barrier wait (m23e: 16 x 1k -2.6 %, 1 x 1k -1.5 %).
__device__ __forceinline__ uint32_t ring_use(uint32_t c, uint32_t magic) { return __umulhi(c, magic); }

__device__ __forceinline__ uint32_t ring_slot(uint32_t c, uint32_t num_stages, uint32_t magic) {
  return c - ring_use(c, magic) * num_stages;
}

// Before the producer asks for `chunk`: at most `max_inflight` chunks asked for and not landed. A deeper queue adds
// no bandwidth, only HBM queueing that every later memory request waits behind (the consumers' L2 reads, their
// release fences): 2 chunks (64 KB per SM, ~8 MB over the H100) measured best, 1 starves HBM, half-chunk steps
// between them did not help (m12b).
__device__ __forceinline__ void wait_inflight(uint64_t* full, uint32_t num_stages, uint32_t magic, uint32_t chunk,
                                              uint32_t max_inflight) {
  if (chunk < max_inflight) return;
  const uint32_t old = chunk - max_inflight;  // its slot is not refilled before `chunk`: max_inflight <= num_stages
  mbar_wait(&full[ring_slot(old, num_stages, magic)], ring_use(old, magic) & 1);
}

// The producer warp: every chunk of the block's instructions, in order, into the ring: a weight chunk (lane i copies
// row i of the 16-row tile) or an attention chunk. (Asking L2 for the chunks beyond a full ring, so that HBM keeps
// streaming while the consumers wait, made every batch slower each time it was tried: m7, m9a, m12a, m12i on the
// H100, m20a on the H200.)
// `pause_ii`: while the consumers release instruction pause_ii (p.pause_release), the producer asks for no chunk
// of a later instruction; INT_MAX otherwise. A release fence (and the acq_rel of a split merge) waits for the loads
// this SM has in flight: holding new ones back from the last tile's epilogue to the release made batch 1-16 faster
// by 30-55 us per step on the H100 (m12e), starting earlier (at the last tile's first chunk, or after the staging)
// less so.
// `box`: ATTN_CLAIM's mailbox to the consumers (unused otherwise).
__device__ void producer(const Params& p, const int* instrs, int count, char* ring, uint64_t* full,
                         uint64_t* empty, const volatile int* pause_ii, ClaimBox* box) {
  const int lane = threadIdx.x & 31;
  const uint32_t NUM_STAGES = (uint32_t)p.num_stages, RING_M = (uint32_t)p.ring_magic;
  const uint32_t max_inflight = p.max_inflight > 0 ? min((uint32_t)p.max_inflight, NUM_STAGES) : NUM_STAGES;
  const uint64_t policy = evict_first_policy();
  // The KV cache's tensor map lives in global memory: have the TMA unit fetch it now, not at the first attention
  // chunk.
  if (p.attn_tma && lane == 0) asm volatile("prefetch.tensormap [%0];" ::"l"(p.kv_tmap) : "memory");
  Cursor load;
  load.ii = 0;
#ifdef ATTN_CLAIM
  load.claims = 0;
  load.planned = false;
  load.box = box;
#endif
  cursor_seek(p, instrs, count, load);
  uint32_t attn_chunks = 0;  // chunk trace entries are weight chunks only
  for (uint32_t chunk = 0; load.ii < count; ++chunk) {
    const int len = min(CHUNK_K, load.k1 - load.kc);
    const int s = ring_slot(chunk, NUM_STAGES, RING_M);
    const uint32_t parity = (ring_use(chunk, RING_M) & 1) ^ 1;
    // An attention chunk's block-table read (an L2 round trip) under the waits, not between them and the copies,
    // where the one chunk in flight behind them would be all this SM asks of HBM (m24d: 16 x 4k -1.4 to -2.5 %)
    const int lane_block = load.op == OP_ATTN ? attention_lane_block(p, load) : 0;
    mbar_wait(&empty[s], parity);
    wait_inflight(full, NUM_STAGES, RING_M, chunk, max_inflight);
    if (p.pause_release)
      while (load.ii > *pause_ii) {
        if (PAUSE_SPIN_NS > 0) __nanosleep(PAUSE_SPIN_NS);
      }
    if (load.op == OP_ATTN) {
      produce_attention_chunk(p, load, lane_block, ring + s * STAGE_BYTES, &full[s]);
      ++attn_chunks;
    } else {
      if (lane == 0 && p.chunk_trace)
        p.chunk_trace[((size_t)blockIdx.x * p.max_chunks + chunk - attn_chunks) * 2] = globaltimer();
      if (lane == 0) mbar_expect_tx(&full[s], TILE_ROWS * len * 2);
      __syncwarp();
      if (lane < TILE_ROWS) {
        const int row = tile_row(p, load.op, load.tile, lane);
        bulk_copy(ring + s * STAGE_BYTES + lane * STAGE_ROW_BYTES,
                  load.info.weight + (size_t)row * load.info.K + load.kc, len * 2, &full[s], policy);
      }
    }
    cursor_next(p, instrs, count, load);
  }
}

// ---- consumers: activations into shared memory --------------------------------------------------------------

struct Misc {
  float ss[NUM_CONSUMER_WARPS][2];  // stage_x: each warp's sum of squares of its rows (at most 2 per warp group)
  float rstd[16];  // stage_x, p.norm_folded: each staged row's 1 / rms (the epilogues read it after their barrier)
  int flag;
  int merged;
  uint32_t attn_chunks;  // ring chunks that were attention's so far (the chunk trace counts weight chunks)
  uint32_t phase[ATTN_PHASES];  // the instruction's phase ends, always stamped (a conditional stamp made ptxas spill)
  int pause_ii;  // the producer asks for no chunk of an instruction after this one (INT_MAX: none held back)
  int ii;        // the instruction the consumers run
  int staging_ii;  // = ii, but written before the barrier that ends the previous instruction: any consumer may read it
  int repolls[2];  // traced: the most times a consumer re-read its tagged words, by instruction parity (thread 0
                   // copies and clears instruction ii's after the barrier that ends it, while ii + 1 uses the other)
  uint32_t tag_base;  // p.tagged: epoch x stages mod 0xFFFF; stage s writes tag (tag_base + s) mod 0xFFFF
#ifdef ATTN_CLAIM
  ClaimBox box;
#endif
};

// Thread 0's stamps of the instruction the consumers run (p.trace: start, dependency met, end), or null. Derived
// from the parameters and misc->ii where a stamp is taken, not held across the instruction: the kernel sat at its
// 168-register cap, and the pointer held from the loop's top took 10 registers (158 without it, no spills).
__device__ __forceinline__ long long* instr_trace(const Params& p, const Misc* misc) {
  return p.trace ? p.trace + ((size_t)blockIdx.x * p.max_instrs + misc->ii) * 3 : nullptr;
}

// Waits (thread 0, then every consumer) until stage `dep_stage` has completed `dep_target` units.
__device__ __forceinline__ void wait_dependency(const Params& p, int dep_stage, int dep_target, const Misc* misc) {
  if (threadIdx.x == 0) {
    if (dep_stage >= 0) {
      while (ld_acquire(p.done + dep_stage) < dep_target) {
        if (DEP_POLL_NS > 0) __nanosleep(DEP_POLL_NS);
      }
    }
    if (p.trace) instr_trace(p, misc)[1] = globaltimer();
  }
  consumer_sync();
}

__device__ __forceinline__ uint32_t stage_tag(const Misc* misc, int stage) {
  return (misc->tag_base + (uint32_t)stage) % 0xFFFFu;
}

// The ops that read h, tagged with p.tagged (and o and down read its residual rows).
__device__ __forceinline__ bool reads_h(int op) { return op == OP_QKV || op == OP_GATE_UP || op == OP_LM_HEAD; }
__device__ __forceinline__ bool writes_h(int op) { return op == OP_EMBED || op == OP_O || op == OP_DOWN; }

// Whether op's readers find its results by their tags (p.tagged): then it releases no counter, and the producer
// need not hold back around a release fence that does not happen. (A macro: as an inlined function the same test
// compiled the whole kernel differently.)
#define WRITES_TAGGED(p, op) ((p).tagged && writes_h(op))

// The tag of the residual rows an o or down instruction of `stage` reads: down's of the previous layer (or embed's)
// for o, o's for down.
__device__ __forceinline__ uint32_t resid_tag(const Misc* misc, int op, int stage) {
  return stage_tag(misc, stage - (op == OP_O ? 3 : 2));
}

// The producer asks for no chunk past the current instruction until the release after it (p.pause_release)...
__device__ __forceinline__ void pause_loads(Misc* misc) {
  *reinterpret_cast<volatile int*>(&misc->pause_ii) = misc->ii;
}

// ... and from then on for any.
__device__ __forceinline__ void resume_loads(Misc* misc) {
  *reinterpret_cast<volatile int*>(&misc->pause_ii) = INT_MAX;
}

// Copies norm[k0..k0+klen) into shared memory (`dst`, the reduction scratch, free between tiles) with cp.async:
// norm weights depend on nothing, so this goes out before the dependency wait; stage_x waits for it.
__device__ __forceinline__ void preload_norm(const bf16* norm, int k0, int klen, char* dst) {
  for (int v = threadIdx.x; v < klen / 8; v += NUM_CONSUMERS)
    cp_async16(smem_addr(dst + v * 16), norm + k0 + v * 8);
  asm volatile("cp.async.commit_group;" ::: "memory");
}

// Row m's share of the staging: rows are spread over G = 1 << staging_groups_log2(M) groups of whole warps (the
// largest power of two <= M, at most 8); group m % G holds row m as its (m / G)-th row. As log2, so that the group
// arithmetic is shifts and masks, not the integer divisions the compiler emitted, one of them on the critical path
// right after the staging barrier (m23d: -0.3 to -0.5 %).
__device__ __forceinline__ int staging_groups_log2(int M) { return M >= 8 ? 3 : M >= 4 ? 2 : M >= 2 ? 1 : 0; }
constexpr int LOG2_NUM_CONSUMERS = 8;
static_assert(NUM_CONSUMERS == 1 << LOG2_NUM_CONSUMERS, "shifts below");

// 1 / rms of staged row m (klen values) from the sums of squares its group's warps left in misc->ss.
__device__ __forceinline__ float staged_row_rstd(const Params& p, const Misc* misc, int m, int klen) {
  float total = 0.f;
  const int lg = staging_groups_log2((int)p.M), group_warps = NUM_CONSUMER_WARPS >> lg;
  const int first = (m & ((1 << lg) - 1)) * group_warps;
  for (int w = first; w < first + group_warps; ++w) total += misc->ss[w][m >> lg];
  // (__fdividef here and in the SiLU: a reciprocal and a multiply, where the IEEE division adds a slow-path call;
  // 2 ulp at most, far under bf16's rounding: m24f, -0.2 to -0.5 % at batch 1-16)
  return rsqrtf(__fdividef(total, (float)klen) + (float)p.eps);
}

// xs[m][0..klen) = x[m][k0..k0+klen) for m < M, RMSNorm'd (HF order) when norm != null; norm_smem: the norm
// weights preload_norm copied, or null (read from global). With p.norm_folded the weights already hold the norm's
// weights (decoder: W * w, rounded to bf16 once), so the rows stay as they are and only each row's 1 / rms is kept,
// for the epilogue: the pass over the rows that normalises them cost 2 % of a step at batch 1 and 4 % at 16 (its
// loads and arithmetic, not its stores: measured by leaving out each).
// The rows are spread over G groups of whole warps (G = the largest power of two <= M, at most 8): a group copies
// its rows with cp.async (every piece of every row in flight at once), sums the squares of the pieces each thread
// copied itself, and after the one block barrier adds its warps' sums and normalises its own pieces. (Row by row
// across the block, loads into registers then stores, paid an L2 round trip and a reduction per row: ~0.6 us per
// row at batch 16; one warp per row made batch 1 slower.)
// With tag != NO_TAG (p.tagged, batch 1), src is h's tagged words and this is the dependency wait: each thread
// copies its pieces' words into `words` (shared memory) until they carry `tag`, then keeps their bf16 halves.
__device__ void stage_x(const Params& p, const void* src, int ld, int k0, int klen, const bf16* norm, char* xs,
                        int xstride, Misc* misc, const char* norm_smem, uint32_t tag, uint32_t* words) {
#ifdef DIAG_NO_NORM  // timing experiments only: the rows are staged, not normalised
  norm = nullptr;
#endif
  constexpr int U = 2;  // pieces per thread loaded before any is used
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int M = (int)p.M, vecs = klen / 8;
  const int lg = staging_groups_log2(M), G = 1 << lg;  // groups of rows: at most 2 rows each (M <= 16)
  const int group_threads = NUM_CONSUMERS >> lg, group = tid >> (LOG2_NUM_CONSUMERS - lg);
  const int i0 = tid & (group_threads - 1);
  if (tag == NO_TAG) {
#ifdef DIAG_STAGE_ROWS  // timing experiments only: stage the first DIAG_STAGE_ROWS rows, leave the rest stale
    for (int m = group; m < min(M, DIAG_STAGE_ROWS); m += G)
#else
    for (int m = group; m < M; m += G)
#endif
      for (int v = i0; v < vecs; v += group_threads)
        cp_async16(smem_addr(xs + m * xstride + v * 16), static_cast<const bf16*>(src) + (size_t)m * ld + k0 + v * 8);
  } else {  // M == 1 (the decoder tags h at batch 1 only): one group, piece v of the row is thread v's
    if (M != 1) __trap();
    const uint32_t* row = static_cast<const uint32_t*>(src) + k0;
    for (int v = tid; v < vecs; v += NUM_CONSUMERS) {
      cp_async16(smem_addr(words + v * 8), row + v * 8);
      cp_async16(smem_addr(words + v * 8 + 4), row + v * 8 + 4);
    }
    asm volatile("cp.async.wait_all;" ::: "memory");
    int tries = 0;
    for (int v = tid; v < vecs; v += NUM_CONSUMERS) {
      while (true) {
        const uint4 a = *reinterpret_cast<const uint4*>(words + v * 8);
        const uint4 b = *reinterpret_cast<const uint4*>(words + v * 8 + 4);
        if (carries(a, tag) & carries(b, tag)) {
          *reinterpret_cast<uint4*>(xs + v * 16) = tagged_values8(a, b);
          break;
        }
        __nanosleep(TAGGED_POLL_NS);
        ++tries;
        cp_async16(smem_addr(words + v * 8), row + v * 8);
        cp_async16(smem_addr(words + v * 8 + 4), row + v * 8 + 4);
        asm volatile("cp.async.wait_all;" ::: "memory");
      }
    }
    if (p.phase_trace && tries) atomicMax(&misc->repolls[misc->staging_ii & 1], tries);
  }
  asm volatile("cp.async.wait_all;" ::: "memory");  // also this thread's norm copies (preload_norm)
#ifdef DIAG_STAMP_STAGED_COPY  // timing experiments only: "staged" once thread 0's own copies landed, before the
  if (tid == 0) misc->phase[0] = globaltimer_lo();  // sums of squares and the barrier
#endif
  if (norm) {
    for (int m = group, j = 0; m < M; m += G, ++j) {
      const char* row = xs + m * xstride;
      float ss = 0.f;
#pragma unroll U
      for (int v = i0; v < vecs; v += group_threads) {
        const uint4 x = *reinterpret_cast<const uint4*>(row + v * 16);
        const bf16* e = reinterpret_cast<const bf16*>(&x);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          const float f = __bfloat162float(e[k]);
          ss += f * f;
        }
      }
#pragma unroll
      for (int off = 16; off; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
      if (lane == 0) misc->ss[warp][j] = ss;
    }
  }
  consumer_sync();  // every row in xs; the sums of squares; the norm weights (copied by all consumers)
  if (!norm) return;
  if (p.norm_folded) {  // the weights carry the norm's weights: 1 / rms per row is all, the epilogue applies it
    if (tid < M) misc->rstd[tid] = staged_row_rstd(p, misc, tid, klen);
    return;
  }
  for (int m = group; m < M; m += G) {
    char* row = xs + m * xstride;
    const float r = staged_row_rstd(p, misc, m, klen);
    for (int v0 = i0; v0 < vecs; v0 += group_threads * U) {
      uint4 x[U], g[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int v = v0 + group_threads * u;
        if (v < vecs) {
          x[u] = *reinterpret_cast<const uint4*>(row + v * 16);
          g[u] = norm_smem ? *reinterpret_cast<const uint4*>(norm_smem + v * 16)
                           : __ldg(reinterpret_cast<const uint4*>(norm + k0 + v * 8));
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int v = v0 + group_threads * u;
        if (v < vecs) {
          const uint4 y = {rmsnorm_pair(x[u].x, g[u].x, r), rmsnorm_pair(x[u].y, g[u].y, r),
                           rmsnorm_pair(x[u].z, g[u].z, r), rmsnorm_pair(x[u].w, g[u].w, r)};
          *reinterpret_cast<uint4*>(row + v * 16) = y;
        }
      }
    }
  }
  consumer_sync();
}

// ---- consumers: epilogues ----------------------------------------------------------------------------------------

// What an epilogue reads besides the accumulators, loaded when the tile starts so the loads overlap its weights:
// QKV: cos and sin of the RoPE pair, and for k and v rows this token's KV cache slot; O and DOWN: the residual rows.
struct EpilogueInputs {
  float x, y;
  long long slot;
};

// `resid_tag` (p.tagged): the tag of the residual rows o and down read (down's of the previous layer, or embed's,
// for o; o's for down): those stages ended before this one could start, so the loads find it at once.
__device__ __forceinline__ EpilogueInputs epilogue_inputs(const Params& p, int op, int tile, int r, int m,
                                                          uint32_t resid_tag) {
  const int lo_row = tile_row(p, op, tile, r);
  if (op == OP_QKV) {
    const int D = qkv_head_dim(p), half = D / 2, Hq = (int)p.n_q_heads;
    const long long slot = lo_row / D >= Hq ? p.slot_mapping[m] : -1;
    if (lo_row / D >= Hq + (int)p.n_kv_heads) return {0.f, 0.f, slot};
    const long long at = p.positions[m] * half + lo_row % D;
    return {__ldg(p.cos_tab + at), __ldg(p.sin_tab + at), slot};
  }
  if (op == OP_O || op == OP_DOWN) {
    const int hi_row = tile_row(p, op, tile, r + 8);
    if (p.tagged) {
      const uint32_t* h = p.h + (size_t)m * p.hidden;
      return {ld_tagged(h + lo_row, resid_tag), ld_tagged(h + hi_row, resid_tag), -1};
    }
    const bf16* h = reinterpret_cast<const bf16*>(p.h) + (size_t)m * p.hidden;
    return {__bfloat162float(__ldcg(h + lo_row)), __bfloat162float(__ldcg(h + hi_row)), -1};
  }
  return {0.f, 0.f, -1};
}

// Output rows `lo_row` (tile row r) and `hi_row` (tile row r + 8) for batch row m, values in fp32; `in` from
// epilogue_inputs.
// `tag` (p.tagged): this stage's, on what it writes to h.
__device__ void epilogue(const Params& p, int op, int layer, int tile, int r, int m, float lo, float hi,
                         EpilogueInputs in, uint32_t tag) {
  const int lo_row = tile_row(p, op, tile, r), hi_row = tile_row(p, op, tile, r + 8);
  switch (op) {
    case OP_QKV: {
      const int D = qkv_head_dim(p), half = D / 2, Hq = (int)p.n_q_heads, Hkv = (int)p.n_kv_heads;
      const int head = lo_row / D;
      const long long slot = in.slot;
      if (head < Hq + Hkv) {  // a RoPE pair: dims d and d + D/2 of one q or k head
        const int d = lo_row % D;
        const float c = in.x, s = in.y;
        const float y_lo = lo * c - hi * s, y_hi = hi * c + lo * s;
        if (head < Hq) {
          p.q[(size_t)m * Hq * D + head * D + d] = y_lo;
          p.q[(size_t)m * Hq * D + head * D + d + half] = y_hi;
        } else if (slot >= 0) {
          bf16* k = p.kv_cache + layer * p.kv_layer_stride + slot * Hkv * D + (head - Hq) * D;
          k[d] = __float2bfloat16(y_lo);
          k[d + half] = __float2bfloat16(y_hi);
        }
      } else if (slot >= 0) {  // v rows: a plain 16-row tile inside one head
        const int vi = lo_row - (Hq + Hkv) * D;
        bf16* v = p.kv_cache + layer * p.kv_layer_stride + p.kv_v_offset + slot * Hkv * D;
        v[vi] = __float2bfloat16(lo);
        v[vi + 8] = __float2bfloat16(hi);
      }
      break;
    }
    case OP_O:
    case OP_DOWN: {
      const bf16 y_lo = __float2bfloat16(in.x + bf16_round(lo)), y_hi = __float2bfloat16(in.y + bf16_round(hi));
      if (p.tagged) {
        st_tagged(p.h + (size_t)m * p.hidden + lo_row, y_lo, tag);
        st_tagged(p.h + (size_t)m * p.hidden + hi_row, y_hi, tag);
      } else {
        bf16* h = reinterpret_cast<bf16*>(p.h) + (size_t)m * p.hidden;
        h[lo_row] = y_lo;
        h[hi_row] = y_hi;
      }
      break;
    }
    case OP_GATE_UP: {
      const float g = bf16_round(lo), u = bf16_round(hi);  // (g < -88: 1 + e^-g = inf, g / inf = -0: the limit)
      p.act[(size_t)m * p.inter + lo_row] = __float2bfloat16(bf16_round(__fdividef(g, 1.f + __expf(-g))) * u);
      break;
    }
    default:
      p.logits[(size_t)m * p.vocab + lo_row] = lo;
      p.logits[(size_t)m * p.vocab + hi_row] = hi;
  }
}

// ---- consumers: one matmul instruction ------------------------------------------------------------------------

// Split-K arrivals of the instruction's tiles [t0, t1), after their partials are stored: warp 0 counts them in, one
// tile per lane, so a single release fence covers them all (a fence per tile, which waits behind the loads in flight,
// cost ~4.5 us each at batch 16: the next tile's weights sat in the ring meanwhile). The block that brings a tile's
// last segment adds all of its partials in segment order; returns how many tiles it merged. A tile's merge needs
// 8 x M threads (rows r and r + 8 of batch row c each), so the consumers merge NUM_CONSUMERS / (8 M) tiles at once:
// each merge is an L2 round trip for the partials and the residual, and one after another they were most of the
// 6.9 us from down's last chunk to its end at 16 x 1k (session 17's trace).
__device__ int merge_split_k(const Params& p, int op, int layer, int stage, int t0, int t1, int nsegs, Misc* misc) {
  const int tid = threadIdx.x, M = (int)p.M, N = (int)p.hidden;
  const int per_tile = 8 * M, groups = NUM_CONSUMERS / per_tile, group = tid / per_tile;
  const int r = (tid % per_tile) & 7, c = (tid % per_tile) >> 3;
  int* counters = p.arrivals + ((size_t)layer * 2 + (op == OP_DOWN)) * (p.hidden / 16);
  int merged = 0;
  for (int base = t0; base < t1; base += 32) {
    if (tid < 32) {  // acq_rel: releases the block's partials (barrier before the call), acquires the others'
      const bool last = base + tid < t1 && atom_acq_rel_add(counters + base + tid, 1) == nsegs - 1;
      const unsigned mask = __ballot_sync(0xffffffffu, last);
      if (tid == 0) misc->flag = (int)mask;
    }
    consumer_sync();
    unsigned mask = (unsigned)misc->flag;
    consumer_sync();  // misc->flag is rewritten by the next round
    merged += __popc(mask);
    if (group >= groups) continue;
    for (int i = 0; i < group; ++i) mask &= mask - 1;  // this group's tiles: the group-th set bit, then every groups-th
    while (mask) {
      const int tile = base + __ffs(mask) - 1;
      const int lo_row = tile_row(p, op, tile, r), hi_row = tile_row(p, op, tile, r + 8);
      const EpilogueInputs in = epilogue_inputs(p, op, tile, r, c, resid_tag(misc, op, stage));
      float lo = 0.f, hi = 0.f;
      for (int s2 = 0; s2 < nsegs; ++s2) {
        lo += __ldcg(p.part + ((size_t)s2 * M + c) * N + lo_row);
        hi += __ldcg(p.part + ((size_t)s2 * M + c) * N + hi_row);
      }
      epilogue(p, op, layer, tile, r, c, lo, hi, in, stage_tag(misc, stage));
      for (int i = 0; i < groups && mask; ++i) mask &= mask - 1;
    }
  }
  return merged;
}

// A warp's share of one weight chunk (16 rows x `steps` steps of 32 columns in the ring slot `w`): steps first,
// first + stride, ...; the activations' columns from `kbase` on in xs. Each step's second k16 half goes to acc_hi
// (m21a's second chain: pass acc itself for one chain).
template <int NT>
__device__ __forceinline__ void mma_chunk(const char* w, const char* xs, int xstride, int kbase, int steps, int first,
                                          int stride, int M, float (&acc)[NT][4], float (&acc_hi)[NT][4]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  for (int step = first; step < steps; step += stride) {
    const int kk = step * 32 + 8 * t;
    const uint4 alo = *reinterpret_cast<const uint4*>(w + g * STAGE_ROW_BYTES + kk * 2);
    const uint4 ahi = *reinterpret_cast<const uint4*>(w + (g + 8) * STAGE_ROW_BYTES + kk * 2);
    const int kx = kbase + kk;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      // Batch rows past M are zero columns of the B operand (not stored).
      const uint4 b = n * 8 + g < M ? *reinterpret_cast<const uint4*>(xs + (n * 8 + g) * xstride + kx * 2)
                                    : make_uint4(0, 0, 0, 0);
      mma_bf16(acc[n], alo.x, ahi.x, alo.y, ahi.y, b.x, b.y);
      mma_bf16(acc_hi[n], alo.z, ahi.z, alo.w, ahi.w, b.z, b.w);
    }
  }
}

// Rows r and r + 8, batch column c of a tile: the sum of `warps` warps' partials in `red` (each warp's accumulators
// as float4 per lane, NT n-tiles), in warp order.
template <int NT>
__device__ __forceinline__ float2 sum_partials(const float4* red, int warps, int r, int c) {
  const int n = c >> 3, cc = c & 7, src_lane = r * 4 + (cc >> 1);
  float lo = 0.f, hi = 0.f;
  for (int w2 = 0; w2 < warps; ++w2) {
    const float4 v = red[(w2 * NT + n) * 32 + src_lane];
    lo += (cc & 1) ? v.y : v.x;
    hi += (cc & 1) ? v.w : v.z;
  }
  return make_float2(lo, hi);
}

template <int NT>  // n-tiles of 8 batch rows
__device__ void run_matmul(const Params& p, const int* in, char* ring, uint64_t* full, uint64_t* empty, char* xs,
                           float4* red, Misc* misc, uint32_t& chunk, int prev_dep) {
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int op = in[0], layer = in[1], seg = in[2], M = (int)p.M;
  const OpInfo info = op_info(p, op, layer);
  const int k0 = seg * info.kseg, k1 = min(info.K, k0 + info.kseg), klen = k1 - k0;
  const int nsegs = (info.K + info.kseg - 1) / info.kseg;
  const int xstride = klen * 2 + ROW_PAD_BYTES;

  const void* src;
  const bf16* norm = nullptr;
  int ld;
  switch (op) {
    case OP_QKV: src = p.h; ld = (int)p.hidden; norm = p.layers[layer].attn_norm; break;
    case OP_GATE_UP: src = p.h; ld = (int)p.hidden; norm = p.layers[layer].mlp_norm; break;
    case OP_O: src = p.attn; ld = (int)(p.n_q_heads * p.head_dim); break;
    case OP_DOWN: src = p.act; ld = (int)p.inter; break;
    default: src = p.h; ld = (int)p.hidden; norm = p.final_norm;
  }
  const char* norm_smem =
      norm && !p.norm_folded && klen * 2 <= RED_BYTES ? reinterpret_cast<const char*>(red) : nullptr;
  if (norm_smem) preload_norm(norm, k0, klen, reinterpret_cast<char*>(red));
  // Thread -> (tile row r < 8, batch column c) in the reduction and epilogue below. Up to batch 8 (NT = 1) the
  // first tile's epilogue inputs that no unfinished stage writes are loaded before the dependency wait, by threads
  // from warp 1 on: thread 0 polls the dependency, and an acquire poll waits for the polling thread's loads in
  // flight (m9c; m19c loaded from warp 0 and lost 1.5-2.5 %). qkv's are step inputs (positions -> cos / sin, the KV
  // slots); o's and down's residual rows were written 3 and 2 stages back, so they are complete once this block has
  // waited for that stage (prev_dep: its previous instruction's dependency), and with tags (batch 1) always safe to
  // poll for: their writers never wait for a later stage. -2 to -3 % at batch 1, -0.5 to -1.4 % at 2-8 (m19f, m19g).
  // At batch 16 the same lost 1-3 %, even behind a runtime-false flag, so the NT = 2 code stays as it was.
  constexpr bool early = NT == 1;
  // Where the consumers' halves take the tiles in turn (below), each half's first tile has its inputs loaded early,
  // by the half's threads from its second warp on (warps 1-2 and 5-6: thread 0 polls the dependency; m22b).
  const bool halves1 = NT == 1 && MATMUL_GROUPS == 2 && in[4] - in[3] >= 2;
  const int et = halves1 ? ((tid & (NUM_CONSUMERS / 2 - 1)) + 96) & (NUM_CONSUMERS / 2 - 1)
                 : early ? (tid + NUM_CONSUMERS - 32) % NUM_CONSUMERS
                         : tid;
  const int first_tile = in[3] + (halves1 ? warp >> 2 : 0);
  const int r = et & 7, c = et >> 3;
  const bool active = et < 64 * NT && c < M;
  const bool early_in = early && active && first_tile < in[4] &&
                        (op == OP_QKV || (nsegs == 1 && (op == OP_O || op == OP_DOWN) &&
                                          (p.tagged || prev_dep >= in[7] - (op == OP_O ? 3 : 2))));
  const EpilogueInputs first_in =
      early_in ? epilogue_inputs(p, op, first_tile, r, c, resid_tag(misc, op, in[7])) : EpilogueInputs{0.f, 0.f, -1};
  const bool tagged_in = p.tagged && reads_h(op);  // the words' tags are the dependency
  if (!tagged_in) wait_dependency(p, in[5], in[6], misc);
  // (p.tagged: the decoder checked that a row of words fits in xs behind the staged row)
  stage_x(p, src, ld, k0, klen, norm, xs, xstride, misc, norm_smem, tagged_in ? stage_tag(misc, in[5]) : NO_TAG,
          reinterpret_cast<uint32_t*>(xs + xstride));
  // (stamped after the staging: the words arrived)
  if (tagged_in && tid == 0 && p.trace) instr_trace(p, misc)[1] = globaltimer();
#ifndef DIAG_STAMP_STAGED_COPY
  if (tid == 0) misc->phase[0] = globaltimer_lo();  // activations staged
#endif
  const uint32_t NUM_STAGES = (uint32_t)p.num_stages, RING_M = (uint32_t)p.ring_magic;

  int merged = 0;
  const int N = op == OP_O || op == OP_DOWN ? (int)p.hidden : 0;
  if (MATMUL_GROUPS == 2 && in[4] - in[3] >= 2) {
    // m22a: the warps' partial sums of a tile are added up by a barrier, a pass over the reduction scratch and the
    // epilogue, one tile after another (8.7 % of a batch-16 step, DIAG_MATMUL_NO_REDUCTION). Here, where a block has
    // two tiles or more, the two halves of the consumers take alternate tiles, each split over its four warps' K
    // steps, so that one half reduces while the other multiplies. A chunk then has four warps, each arriving twice
    // on its slot's empty barrier; and since the halves run apart, a half first waits until the slot's previous
    // chunk (perhaps the other half's) is used.
    const int group = warp >> 2, gwarp = warp & 3, gt = tid & (NUM_CONSUMERS / 2 - 1);
    const int gr = NT == 1 ? r : gt & 7, gc = NT == 1 ? c : gt >> 3;
    const bool gactive = NT == 1 ? active : gc < M;
    const int per_tile = (klen + CHUNK_K - 1) / CHUNK_K;
    float4* gred = red + group * (NUM_CONSUMER_WARPS / 2) * NT * 32;
    for (int tile = in[3] + group; tile < in[4]; tile += 2) {
      const EpilogueInputs epi_in = early_in && tile == first_tile ? first_in
                                    : gactive && nsegs == 1
                                        ? epilogue_inputs(p, op, tile, gr, gc, resid_tag(misc, op, in[7]))
                                        : EpilogueInputs{0.f, 0.f, -1};
      float acc_hi[NT][4];  // m21a's second chains, at NT = 1 only (m23f: no gain at 2)
#pragma unroll
      for (int n = 0; n < NT; ++n) acc_hi[n][0] = acc_hi[n][1] = acc_hi[n][2] = acc_hi[n][3] = 0.f;
      float acc[NT][4];
#pragma unroll
      for (int n = 0; n < NT; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
      uint32_t ch = chunk + (uint32_t)((tile - in[3]) * per_tile);
      for (int kc = k0; kc < k1; kc += CHUNK_K, ++ch) {
        const int len = min(CHUNK_K, k1 - kc);
        const int s = ring_slot(ch, NUM_STAGES, RING_M);
        // (the slot's previous chunk used, as the producer waits)
        mbar_wait(&empty[s], (ring_use(ch, RING_M) & 1) ^ 1);
        mbar_wait(&full[s], ring_use(ch, RING_M) & 1);
        if (gt == 0 && p.chunk_trace)
          p.chunk_trace[((size_t)blockIdx.x * p.max_chunks + ch - misc->attn_chunks) * 2 + 1] = globaltimer();
        mma_chunk<NT>(ring + s * STAGE_BYTES, xs, xstride, kc - k0, len / 32, gwarp, NUM_CONSUMER_WARPS / 2, M, acc,
                      NT == 1 ? acc_hi : acc);
        __syncwarp();
        if (lane == 0) mbar_arrive_count(&empty[s], 2);
      }
      if (NT == 1)
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[n][i] += acc_hi[n][i];
      if (gt == 0 && p.pause_release == 1 && tile == in[4] - 1 && !WRITES_TAGGED(p, op)) pause_loads(misc);
#pragma unroll
      for (int n = 0; n < NT; ++n)
        gred[(gwarp * NT + n) * 32 + lane] = make_float4(acc[n][0], acc[n][1], acc[n][2], acc[n][3]);
      group_sync(group);
      if (gactive) {
        const float2 sum = sum_partials<NT>(gred, NUM_CONSUMER_WARPS / 2, gr, gc);
        float lo = sum.x, hi = sum.y;
        if (nsegs == 1) {
          if (norm && p.norm_folded) {
            lo *= misc->rstd[gc];
            hi *= misc->rstd[gc];
          }
          epilogue(p, op, layer, tile, gr, gc, lo, hi, epi_in, stage_tag(misc, in[7]));
        } else {
          p.part[((size_t)seg * M + gc) * N + tile_row(p, op, tile, gr)] = lo;
          p.part[((size_t)seg * M + gc) * N + tile_row(p, op, tile, gr + 8)] = hi;
        }
      }
      group_sync(group);  // gred[] is reused by the half's next tile
    }
    chunk += (uint32_t)((in[4] - in[3]) * per_tile);
    consumer_sync();  // both halves' tiles done: the release and the split-K merge's fence cover them
    merged = nsegs == 1 ? in[4] - in[3] : 0;
  } else {
    for (int tile = in[3]; tile < in[4]; ++tile) {
      const EpilogueInputs epi_in =
          early_in && tile == in[3] ? first_in
          : active && nsegs == 1 ? epilogue_inputs(p, op, tile, r, c, resid_tag(misc, op, in[7]))
                                 : EpilogueInputs{0.f, 0.f, -1};
      // Up to batch 8 (NT = 1) the second k16 half of every step goes to accumulators of its own, added after the
      // tile's last chunk: a warp's chain of dependent mma per chunk is half as long (m21a: -1 % at batch 1, -0.5 % at
      // 8; four chains lost 2.5 %). At NT = 2 the two n-tiles are independent chains already (a second set: +0.6 %).
      float acc[NT][4], acc_hi[NT][4];
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
        acc_hi[n][0] = acc_hi[n][1] = acc_hi[n][2] = acc_hi[n][3] = 0.f;
      }
      for (int kc = k0; kc < k1; kc += CHUNK_K, ++chunk) {
        const int len = min(CHUNK_K, k1 - kc);
        const int s = ring_slot(chunk, NUM_STAGES, RING_M);
        mbar_wait(&full[s], ring_use(chunk, RING_M) & 1);
#ifndef DIAG_STAMP_AFTER_MMA  // timing experiments only: the chunk's "used" stamp after warp 0's mma, not before
        if (tid == 0 && p.chunk_trace)
          p.chunk_trace[((size_t)blockIdx.x * p.max_chunks + chunk - misc->attn_chunks) * 2 + 1] = globaltimer();
#endif
        // (The DIAG_MATMUL_* defines act on this loop: on single-tile blocks, or everywhere with MATMUL_GROUPS 1.)
#ifdef DIAG_MATMUL_NO_MMA  // timing experiments only: weight chunks stream and are released, nothing is multiplied
        const int steps = 0;
#else
        const int steps = len / 32;
#endif
        mma_chunk<NT>(ring + s * STAGE_BYTES, xs, xstride, kc - k0, steps, warp, NUM_CONSUMER_WARPS, M, acc,
                      NT == 1 ? acc_hi : acc);
#ifdef DIAG_STAMP_AFTER_MMA
        if (tid == 0 && p.chunk_trace) {
          asm volatile("" ::"f"(acc[0][0]), "f"(acc_hi[0][0]));  // stamped once warp 0's results are in
          p.chunk_trace[((size_t)blockIdx.x * p.max_chunks + chunk - misc->attn_chunks) * 2 + 1] = globaltimer();
        }
#endif
        __syncwarp();
        if (lane == 0) mbar_arrive(&empty[s]);
      }
      // (2: only at the release; none where the output is tagged h: no fence to wait, and the next instruction's
      // chunks would be held back for nothing)
      if (tid == 0 && p.pause_release == 1 && tile == in[4] - 1 && !WRITES_TAGGED(p, op)) pause_loads(misc);
      if (NT == 1)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[0][i] += acc_hi[0][i];
#ifdef DIAG_MATMUL_NO_REDUCTION  // timing experiments only: the warps' partials are not added up (no barriers
      // between tiles); the epilogue writes one warp's (wrong values, right tags)
      float lo = acc[0][0], hi = acc[0][2];
#else
#pragma unroll
      for (int n = 0; n < NT; ++n)
        red[(warp * NT + n) * 32 + lane] = make_float4(acc[n][0], acc[n][1], acc[n][2], acc[n][3]);
      consumer_sync();
      float lo = 0.f, hi = 0.f;
      if (active) {
        const float2 sum = sum_partials<NT>(red, NUM_CONSUMER_WARPS, r, c);
        lo = sum.x;
        hi = sum.y;
      }
#endif
      if (nsegs == 1) {
        if (active && norm && p.norm_folded) {
          lo *= misc->rstd[c];
          hi *= misc->rstd[c];
        }
#ifdef DIAG_MATMUL_NO_EPILOGUE  // timing experiments only: the sums are made, not written (tagged h still is)
        if (active && WRITES_TAGGED(p, op))
#else
        if (active)
#endif
          epilogue(p, op, layer, tile, r, c, lo, hi, epi_in, stage_tag(misc, in[7]));
        ++merged;
      } else if (active) {  // split-K: this segment's partial; the tiles' arrivals follow the loop (merge_split_k)
        p.part[((size_t)seg * M + c) * N + tile_row(p, op, tile, r)] = lo;
        p.part[((size_t)seg * M + c) * N + tile_row(p, op, tile, r + 8)] = hi;
      }
#ifndef DIAG_MATMUL_NO_REDUCTION
      consumer_sync();  // red[] is reused by the next tile; the partials are stored before merge_split_k's fence
#endif
    }
  }
  if (tid == 0) misc->phase[1] = globaltimer_lo();  // every tile's weights used, its result or partial stored
  if (nsegs > 1) merged = merge_split_k(p, op, layer, in[7], in[3], in[4], nsegs, misc);
  if (tid == 0) {
    misc->merged = merged;
    misc->phase[2] = globaltimer_lo();  // split-K tiles merged
  }
}

// ---- consumers: attention (one sequence x KV head x context split per work item) ------------------------------

#define G_MAX 8  // query heads per KV head

// Attention's shared memory (in the activation buffer), sized by the query group G and head_dim D; Python sizes the
// buffer to hold it (schedule.attention_smem_bytes).
struct AttnSmem {
  float* warp_max;  // [NUM_CONSUMER_WARPS][G_MAX] each warp's running max (log2 domain) per head
  float* warp_sum;  // [NUM_CONSUMER_WARPS][G_MAX] and its sum of probabilities
  float* merge_w;   // [MAX_ATTN_SPLITS][G_MAX] the split merge's weights
  float* q;         // [G * D] (16-byte aligned: cp.async)
  float* o_red;     // [NUM_CONSUMER_WARPS][G * D] each warp's unnormalised output (then the split merge's partials)
};

__device__ __forceinline__ AttnSmem attn_smem(char* base, int G, int D) {
  AttnSmem sm;
  sm.warp_max = reinterpret_cast<float*>(base);
  sm.warp_sum = sm.warp_max + NUM_CONSUMER_WARPS * G_MAX;
  sm.merge_w = sm.warp_sum + NUM_CONSUMER_WARPS * G_MAX;
  sm.q = sm.merge_w + MAX_ATTN_SPLITS * G_MAX;
  sm.o_red = sm.q + G * D;
  return sm;
}

// The last of the `splits` non-empty splits of (sequence m, KV head kvh) to finish: attention output = the splits'
// partial outputs weighted by their softmax mass, summed in split order. `staged`: NUM_CONSUMER_WARPS x G x D floats
// of shared memory free for the merge (the warps' output buffer).
__device__ __forceinline__ void merge_splits(const Params& p, int m, int kvh, int D, int splits, float* weight,
                                             float* staged) {
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int Hq = (int)p.n_q_heads, Hkv = (int)p.n_kv_heads, G = Hq / Hkv, S = (int)p.attn_splits;
  const size_t b0 = ((size_t)m * Hkv + kvh) * S * G;
  // Up to NUM_CONSUMER_WARPS splits, the partial outputs are copied into `staged` (cp.async, no registers: the
  // kernel is at its register cap) while the weights' inputs are loaded: the merge takes one L2 round trip, not two.
  // (Through L2 only, as every read of another block's output: cp.async.cg, 16-byte pieces.)
  const bool prefetched = splits <= NUM_CONSUMER_WARPS;
  if (prefetched)
    for (int v = tid; v < splits * G * D / 4; v += NUM_CONSUMERS)  // split v / (G D / 4): its group's columns in order
      cp_async16(smem_addr(staged + 4 * v), p.o_part + b0 * D + 4 * v);
  for (int h = warp; h < G; h += NUM_CONSUMER_WARPS) {  // one warp per head, one lane per split
    const float mx = lane < splits ? __ldcg(p.ml_part + (b0 + lane * G + h) * 2) : -INFINITY;
    const float sum = lane < splits ? __ldcg(p.ml_part + (b0 + lane * G + h) * 2 + 1) : 0.f;
    float gmax = mx;
#pragma unroll
    for (int off = 16; off; off >>= 1) gmax = fmaxf(gmax, __shfl_xor_sync(0xffffffffu, gmax, off));
    const float e = lane < splits ? exp2f(mx - gmax) : 0.f;
    float den = sum * e;
#pragma unroll
    for (int off = 16; off; off >>= 1) den += __shfl_xor_sync(0xffffffffu, den, off);
    if (lane < splits) weight[lane * G + h] = e / den;
  }
  asm volatile("cp.async.wait_all;" ::: "memory");
  consumer_sync();
  for (int idx = tid; idx < G * D; idx += NUM_CONSUMERS) {
    const int h = idx / D;
    float o = 0.f;
    if (prefetched) {
      for (int s2 = 0; s2 < splits; ++s2) o += weight[s2 * G + h] * staged[s2 * G * D + idx];
    } else {
      const float* part = p.o_part + (b0 + h) * D + idx % D;  // split s2 at part[s2 * G * D]
#pragma unroll 8
      for (int s2 = 0; s2 < splits; ++s2) o += weight[s2 * G + h] * __ldcg(part + (size_t)s2 * G * D);
    }
    p.attn[(size_t)m * Hq * D + kvh * G * D + idx] = __float2bfloat16(o);
  }
}

// One work item = (sequence, KV head, context split), one ring chunk (ATTN_CHUNK_TOKENS context tokens) at a time:
// the producer streamed the past tokens' K and V rows into the ring ahead of time, so after the dependency wait only
// q and this step's token's K and V rows are copied (one round trip each, overlapping).
// Each warp owns an eighth of every chunk's tokens (TPW consecutive ones) and runs its own online softmax over them
// on the tensor cores, so a chunk needs no block barrier; the warps' (max, sum, output) are merged once per item.
// Per group of 8 tokens, in mma fragments (g = lane / 4, t4 = lane % 4):
// - scores S^T (query heads x tokens) = Q (m16: the group's heads, zero rows past G) x K^T, m16n8k16 over the dims.
//   The dims a k-step takes are permuted so that lane t4 reads one contiguous quarter of its token's K row (D / 4
//   dims: 16-byte pieces, rotated by the token so that a warp's loads hit distinct banks); q uses the same order.
// - S^T's accumulator is P's B fragment (k: tokens, n: head g) as it stands, so the output is kept transposed:
//   O^T (dims x heads) += V^T (m16: dims) x P, m16n8k8 per group. Row g of m-tile mt is dim g * D/8 + 2 mt, row
//   g + 8 the next one, so lane g reads one contiguous eighth of a token's V row.
// P enters the product in bf16 and q is rounded to bf16 (as the bf16 reference model and flash kernels do); scores,
// softmax and accumulation are fp32.
// A split covers at least `min_split_tokens` tokens, so short contexts use fewer than attn_splits splits (the rest
// of the items are empty). A single split writes the normalised output itself; otherwise the last split of a
// (sequence, KV head) to finish merges all splits' partials, in split order.
__device__ __forceinline__ void mma_bf16_k8(float* c, uint32_t a0, uint32_t a1, uint32_t b0) {
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(a1), "r"(b0));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// 16 / 8 bytes of shared memory. Volatile: the compiler may not merge a load with an equal one or hoist it, as
// re-reading is cheaper than a register held across a loop (the register budget is tight).
__device__ __forceinline__ uint4 lds128(const void* p) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(smem_addr(p)));
  return v;
}

__device__ __forceinline__ uint2 lds64(const void* p) {
  uint2 v;
  asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "r"(smem_addr(p)));
  return v;
}

// N 16-byte pieces of shared memory, piece i from (p + 16 * (i ^ r)), returned in piece order: loads staggered by r
// so that the lanes of one instruction hit distinct banks, then put back in place by selects (no local memory).
template <int N>
__device__ __forceinline__ void lds_rotated(const char* p, int r, uint4 (&out)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = lds128(p + 16 * (i ^ r));
#pragma unroll
  for (int bit = 1; bit < N; bit <<= 1) {
    const bool swap = r & bit;
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (!(i & bit)) {
        const uint4 a = out[i], b = out[i ^ bit];
        out[i] = swap ? b : a;
        out[i ^ bit] = swap ? a : b;
      }
  }
}

// Lane g's eighth (W 32-bit words) of two V rows, at a and b, zeros for a row that is not valid: 16-byte pieces
// rotated by g / 4 (so that the 8 lanes of a row hit distinct banks when a lane reads two pieces), or one 8-byte load
// per row for 32-dim heads. Both rows are loaded before either is used.
template <int W>
__device__ __forceinline__ void lds_v_rows(const char* a, const char* b, int g, bool a_valid, bool b_valid,
                                           uint32_t (&va)[W], uint32_t (&vb)[W]) {
  if constexpr (W >= 4) {
    uint4 ra[W / 4], rb[W / 4];
    lds_rotated<W / 4>(a, (g >> 2) & (W / 4 - 1), ra);
    lds_rotated<W / 4>(b, (g >> 2) & (W / 4 - 1), rb);
#pragma unroll
    for (int w = 0; w < W; ++w) {
      va[w] = a_valid ? reinterpret_cast<const uint32_t*>(ra)[w] : 0u;
      vb[w] = b_valid ? reinterpret_cast<const uint32_t*>(rb)[w] : 0u;
    }
  } else {
    static_assert(W == 2, "an eighth of a 32-dim row: 2 words");
    const uint2 ra = lds64(a), rb = lds64(b);
    va[0] = a_valid ? ra.x : 0u;
    va[1] = a_valid ? ra.y : 0u;
    vb[0] = b_valid ? rb.x : 0u;
    vb[1] = b_valid ? rb.y : 0u;
  }
}

// One chunk's share of one warp: its NT groups of 8 consecutive tokens from token `first` of the chunk (n tokens
// valid), into the warp's softmax state (run_max, run_sum: head g's, the same in the group's 4 lanes) and O^T (acc).
template <int D, int NT>
__device__ __forceinline__ void attention_chunk(const char* ks, const char* vs, const float* q, int first, int n,
                                                int G, float scale_log2, float& run_max, float& run_sum,
                                                float (&acc)[D / 16][4], bool stamp, Misc* misc) {
  constexpr int KS = D / 16;  // k-steps of the scores (and m-tiles of O^T)
  constexpr int KP = D / 32;  // 16-byte pieces of a K row per lane (its D / 4 dims)
  constexpr int VW = D / 16;  // 32-bit words of a V row per lane (its D / 8 dims)
  const int lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
  // q's A fragments: k-step k2 holds dims t4 * D/4 + 4 k2 .. + 3 of head g (rows past G: zero).
  uint32_t qa[KS][2];
#pragma unroll
  for (int k2 = 0; k2 < KS; ++k2) {
    const float4 q4 = g < G ? *reinterpret_cast<const float4*>(q + g * D + t4 * (D / 4) + 4 * k2)
                            : make_float4(0.f, 0.f, 0.f, 0.f);
    qa[k2][0] = pack_bf16(q4.x, q4.y);
    qa[k2][1] = pack_bf16(q4.z, q4.w);
  }
  float sc[NT][4];
#pragma unroll
  for (int i = 0; i < NT; ++i) {
    uint4 kr[KP];
    const int row = first + i * 8 + g;
    lds_rotated<KP>(ks + row * D * 2 + t4 * (D / 2), g & (KP - 1), kr);
    const uint32_t* kw = reinterpret_cast<const uint32_t*>(kr);
#pragma unroll
    for (int j = 0; j < 4; ++j) sc[i][j] = 0.f;
#pragma unroll
    for (int k2 = 0; k2 < KS; ++k2) mma_bf16(sc[i], qa[k2][0], 0u, qa[k2][1], 0u, kw[2 * k2], kw[2 * k2 + 1]);
  }
  if (stamp) misc->phase[2] = globaltimer_lo();  // scores
  // Online softmax of head g over this chunk's tokens of the warp (t4's lanes hold two tokens per group).
  float mx = -INFINITY;
#pragma unroll
  for (int i = 0; i < NT; ++i)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int t = first + i * 8 + 2 * t4 + e;
      sc[i][e] = t < n ? sc[i][e] * scale_log2 : -INFINITY;
      mx = fmaxf(mx, sc[i][e]);
    }
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
  const float new_max = fmaxf(run_max, mx);
  const float alpha = run_max == -INFINITY ? 0.f : exp2f(run_max - new_max);
  float sum = 0.f;
  uint32_t pb[NT];
#pragma unroll
  for (int i = 0; i < NT; ++i) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      sc[i][e] = sc[i][e] == -INFINITY ? 0.f : exp2f(sc[i][e] - new_max);
      sum += sc[i][e];
    }
    pb[i] = pack_bf16(sc[i][0], sc[i][1]);
  }
  sum += __shfl_xor_sync(0xffffffffu, sum, 1);
  sum += __shfl_xor_sync(0xffffffffu, sum, 2);
  run_sum = run_sum * alpha + sum;
  run_max = new_max;
  // O^T's columns are heads 2 t4 and 2 t4 + 1: their rescale factors from those heads' lanes.
  const float alpha0 = __shfl_sync(0xffffffffu, alpha, 8 * t4);
  const float alpha1 = __shfl_sync(0xffffffffu, alpha, 8 * t4 + 4);
#pragma unroll
  for (int mt = 0; mt < KS; ++mt) {
    acc[mt][0] *= alpha0;
    acc[mt][1] *= alpha1;
    acc[mt][2] *= alpha0;
    acc[mt][3] *= alpha1;
  }
  if (stamp) misc->phase[3] = globaltimer_lo();  // softmax
#pragma unroll
  for (int i = 0; i < NT; ++i) {
    // V rows of the group's tokens 2 t4 and 2 t4 + 1 (zero past the chunk's end: P is 0 there, stale rows might
    // not be finite), dims g * D/8 .. + D/8.
    const int t = first + i * 8 + 2 * t4;
    uint32_t va[VW], vb[VW];
    lds_v_rows<VW>(vs + t * D * 2 + g * (D / 4), vs + (t + 1) * D * 2 + g * (D / 4), g, t < n, t + 1 < n, va, vb);
#pragma unroll
    for (int mt = 0; mt < KS; ++mt)
      mma_bf16_k8(acc[mt], __byte_perm(va[mt], vb[mt], 0x5410), __byte_perm(va[mt], vb[mt], 0x7632), pb[i]);
  }
}

template <int D>
__device__ __forceinline__ void run_attention_t(const Params& p, const int* in, char* ring, uint64_t* full,
                                                uint64_t* empty, uint32_t& chunk, uint32_t& claims, char* xs,
                                                Misc* misc) {
  constexpr int CT = ATTN_CHUNK_BYTES / (2 * D), TPW = CT / NUM_CONSUMER_WARPS, NT = TPW / 8;
  constexpr int KS = D / 16;  // m-tiles of O^T
  constexpr int PIECES = D / 8;
  static_assert(TPW % 8 == 0 && D % 32 == 0 && G_MAX <= 8, "groups of 8 tokens; whole K pieces; heads fit m16");
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  const int layer = in[1];
  const int Hq = (int)p.n_q_heads, Hkv = (int)p.n_kv_heads, G = Hq / Hkv;
  const int S = (int)p.attn_splits, M = (int)p.M;
  const uint32_t NUM_STAGES = (uint32_t)p.num_stages, RING_M = (uint32_t)p.ring_magic;
  const AttnSmem sm_ = attn_smem(xs, G, D);
  const AttnSmem* sm = &sm_;
  int merged = 0;
  bool waited = false;
#ifdef ATTN_CLAIM
  for (;;) {
    const AttnItem a = take_claimed(&misc->box, claims);
    if (a.m < 0) break;  // the stage has no more items for this block
// (the last item is known only once the producer has posted the end: usually by then, as it claims the next item
// while this one runs)
#define ATTN_LAST_ITEM claimed_end_posted(&misc->box, claims)
#else
  for (int item = in[3]; item < in[4]; ++item) {
    const AttnItem a = attn_item(p, item);
    if (a.split >= a.splits) continue;  // empty: the (sequence, KV head) completes without it
#define ATTN_LAST_ITEM (item == in[4] - 1)
#endif
    const int m = a.m, kvh = a.kvh, split = a.split, splits = a.splits, newest = a.L - 1;
    // Items of several chunks: the warps work in two halves on alternate chunks, twice the tokens per warp, so that
    // each warp's chain of dependent steps (scores, softmax, P.V) has twice the independent work in it. Not for
    // 128-dim heads: their twice-as-long chunk pass would spill registers.
    const bool paired = D <= 64 && p.attn_pair_min_chunks > 0 && a.t1 - a.t0 > (p.attn_pair_min_chunks - 1) * CT;
    // This step's token's cache slot (the one qkv writes; < 0: a row without one) is an input of the step: read
    // before the dependency wait, so its K / V copy after the wait needs no block-table lookup.
    const long long newest_slot = p.slot_mapping[m];
    // Head g's softmax state over the warp's tokens so far (the same in the group's 4 lanes), and O^T.
    float run_max = -INFINITY, run_sum = 0.f;
    float acc[KS][4];
#pragma unroll
    for (int mt = 0; mt < KS; ++mt)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[mt][j] = 0.f;
    if (!waited) {
      wait_dependency(p, in[5], in[6], misc);
      waited = true;
    }
    for (int i = tid; i < G * D / 4; i += NUM_CONSUMERS)
      cp_async16(smem_addr(sm->q + 4 * i), p.q + (size_t)m * Hq * D + kvh * G * D + 4 * i);
    for (int tb = a.t0; tb < a.t1; tb += CT, ++chunk) {
      const int n = min(CT, a.t1 - tb);
      const int s = ring_slot(chunk, NUM_STAGES, RING_M);
      char* stage = ring + s * STAGE_BYTES;
      const bool has_newest = newest >= tb && newest < tb + n;
      if (tb == a.t0 && tid == 0) misc->phase[0] = globaltimer_lo();  // q asked for
      mbar_wait(&full[s], ring_use(chunk, RING_M) & 1);
      // This step's token: the producer's copy of its rows is stale (qkv had not written them); its K and V rows
      // replace them once the stage has landed.
      if (has_newest && newest_slot >= 0 && tid < 2 * PIECES) {  // 16-byte pieces
        const int kv = tid / PIECES;  // 0: K, 1: V
        const bf16* src = p.kv_cache + layer * p.kv_layer_stride + kv * p.kv_v_offset +
                          (newest_slot * Hkv + kvh) * D + (tid % PIECES) * 8;
        cp_async16(smem_addr(stage + kv * ATTN_CHUNK_BYTES + ((newest - tb) * D + (tid % PIECES) * 8) * 2), src);
      }
      if (tb == a.t0 || has_newest) {
        asm volatile("cp.async.wait_all;" ::: "memory");
        consumer_sync();
        if (tb == a.t0 && tid == 0) misc->phase[1] = globaltimer_lo();  // q, K and V in shared memory
      }
#ifdef DIAG_ATTN_NO_MATH  // timing experiments only: chunks stream and are released, nothing is computed
      if (tid == 0) misc->phase[2] = misc->phase[3] = globaltimer_lo();
      __syncwarp();
      if (lane == 0) mbar_arrive(&empty[s]);
      if (tid == 0) ++misc->attn_chunks;
      continue;
#endif
      const char* ks = stage;
      const char* vs = stage + ATTN_CHUNK_BYTES;
      const bool stamp = tb == a.t0 && tid == 0;
      if (!paired) {
        attention_chunk<D, NT>(ks, vs, sm->q, warp * TPW, n, G, p.scale_log2, run_max, run_sum, acc, stamp, misc);
      } else if ((warp >> 2) == (((tb - a.t0) / CT) & 1)) {
        attention_chunk<D, 2 * NT>(ks, vs, sm->q, (warp & 3) * 2 * TPW, n, G, p.scale_log2, run_max, run_sum, acc,
                                   stamp, misc);
      }
      // The chunk was written through the generic proxy (cp.async); the producer may refill the slot with bulk
      // copies (async proxy).
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
      __syncwarp();
      if (lane == 0) mbar_arrive(&empty[s]);
      if (tid == 0) ++misc->attn_chunks;
    }
    // (DIAG_ATTN_STAMP_WARPS_DONE, timing experiments only: "pv" stamped after the barrier below, once every warp's
    // output is in shared memory, so that "written" is the warps' combine and the stores alone)
#ifndef DIAG_ATTN_STAMP_WARPS_DONE
    if (tid == 0) misc->phase[4] = globaltimer_lo();  // probabilities x V
#endif
    // The instruction's last item: its chunks are all asked for, and what remains (its output, the split merge)
    // ends in the release fence, which waits for the SM's loads in flight; from here on the producer asks for no
    // chunk of the next instruction, as matmuls do from their last tile's epilogue (pause_release 1, m12e).
    if (tid == 0 && p.pause_release == 1 && ATTN_LAST_ITEM) pause_loads(misc);
#undef ATTN_LAST_ITEM
    asm volatile("cp.async.wait_all;" ::: "memory");  // a context of 0 tokens never waited for its q copy
    // Each warp's output, max and sum; then the warps merged in warp order.
    if (t4 == 0 && g < G) {
      sm->warp_max[warp * G_MAX + g] = run_max;
      sm->warp_sum[warp * G_MAX + g] = run_sum;
    }
#pragma unroll
    for (int mt = 0; mt < KS; ++mt) {
      float* o = sm->o_red + warp * G * D + 2 * t4 * D + g * (D / 8) + 2 * mt;  // head 2 t4, dims 2 mt, 2 mt + 1
      if (2 * t4 < G) *reinterpret_cast<float2*>(o) = make_float2(acc[mt][0], acc[mt][2]);
      if (2 * t4 + 1 < G) *reinterpret_cast<float2*>(o + D) = make_float2(acc[mt][1], acc[mt][3]);
    }
    consumer_sync();
#ifdef DIAG_ATTN_STAMP_WARPS_DONE
    if (tid == 0) misc->phase[4] = globaltimer_lo();
#endif
    // One split: the normalised output (as the merge would weight it). Several: this split's partial result,
    // unnormalised output, max (log2 domain) and sum.
    const bool single = splits == 1;
    const size_t base = (((size_t)m * Hkv + kvh) * S + split) * G;
    for (int idx = tid; idx < G * D; idx += NUM_CONSUMERS) {
      const int h = idx / D;
      float mx = -INFINITY;
#pragma unroll
      for (int w = 0; w < NUM_CONSUMER_WARPS; ++w) mx = fmaxf(mx, sm->warp_max[w * G_MAX + h]);
      float o = 0.f, sum = 0.f;
#pragma unroll
      for (int w = 0; w < NUM_CONSUMER_WARPS; ++w) {
        const float wm = sm->warp_max[w * G_MAX + h];
        const float wt = wm == -INFINITY ? 0.f : exp2f(wm - mx);
        o += wt * sm->o_red[w * G * D + idx];
        sum += wt * sm->warp_sum[w * G_MAX + h];
      }
      if (single) {
        p.attn[(size_t)m * Hq * D + kvh * G * D + idx] = __float2bfloat16((1.f / sum) * o);
      } else {
        p.o_part[base * D + idx] = o;
        if (idx % D == 0) {
          p.ml_part[(base + h) * 2] = mx;
          p.ml_part[(base + h) * 2 + 1] = sum;
        }
      }
    }
    consumer_sync();
    if (tid == 0) misc->phase[5] = globaltimer_lo();  // output or partials written
    if (single) {
      ++merged;
    } else {
      if (tid == 0) {  // acq_rel: releases this split's partials (barrier above), acquires the other splits'
        if (p.pause_release) pause_loads(misc);
        int* counter = p.arrivals + (size_t)p.num_layers * 2 * (p.hidden / 16) + ((size_t)layer * M + m) * Hkv + kvh;
        misc->flag = atom_acq_rel_add(counter, 1) == splits - 1;
      }
      consumer_sync();
      if (misc->flag) {
        merge_splits(p, m, kvh, D, splits, sm->merge_w, sm->o_red);
        ++merged;
      }
    }
    consumer_sync();
    if (tid == 0) misc->phase[6] = globaltimer_lo();  // merged (or found another split will)
  }
  // A block whose items were all empty still stamps "dependency met" (nothing of it waits on qkv).
  if (!waited) wait_dependency(p, in[5], in[6], misc);
  if (tid == 0) {
    misc->merged = merged;
    if (p.trace && p.phase_trace && waited) {  // traced: the phase stamps of the block's last non-empty item
      long long* out = p.phase_trace + ((size_t)blockIdx.x * p.max_instrs + misc->ii) * ATTN_PHASES;
      for (int k = 0; k < ATTN_PHASES; ++k) out[k] = misc->phase[k];
    }
  }
}

// `claims`: under ATTN_CLAIM the items taken from the producer's mailbox so far this step.
__device__ void run_attention(const Params& p, const int* in, char* ring, uint64_t* full, uint64_t* empty,
                              uint32_t& chunk, uint32_t& claims, char* xs, Misc* misc) {
  if (p.head_dim != ATTN_HEAD_DIM || p.n_q_heads / p.n_kv_heads > G_MAX) __trap();
  run_attention_t<ATTN_HEAD_DIM>(p, in, ring, full, empty, chunk, claims, xs, misc);
}

// ---- the kernel ---------------------------------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(NUM_THREADS, 1) llama_decode_megakernel(const Params p) {
  extern __shared__ __align__(128) char smem[];
  // [ring: num_stages x STAGE_BYTES][red][misc: mbarriers, Misc][xs: xs_bytes]
  char* ring = smem;
  float4* red = reinterpret_cast<float4*>(ring + p.num_stages * STAGE_BYTES);
  char* misc_bytes = reinterpret_cast<char*>(red) + RED_BYTES;
  uint64_t* full = reinterpret_cast<uint64_t*>(misc_bytes);
  uint64_t* empty = full + MAX_STAGES;
  Misc* misc = reinterpret_cast<Misc*>(empty + MAX_STAGES);
  static_assert(2 * MAX_STAGES * sizeof(uint64_t) + sizeof(Misc) <= MISC_BYTES, "the mbarriers and Misc fit");
  char* xs = misc_bytes + MISC_BYTES;

  const int tid = threadIdx.x;
  if (tid == 0) {
    misc->attn_chunks = 0;
    const unsigned long long stages = 5ull * p.num_layers + 2;  // embed, 5 per layer, LM head
    misc->tag_base = (uint32_t)((unsigned long long)*p.epoch % 0xFFFFu * stages % 0xFFFFu);
    misc->pause_ii = INT_MAX;
    misc->staging_ii = 0;
    misc->repolls[0] = misc->repolls[1] = 0;
    for (int s = 0; s < p.num_stages; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], NUM_CONSUMER_WARPS);
    }
#ifdef ATTN_CLAIM
    // The plan's lanes hold one sequence each; the splits' partials are laid out for MAX_ATTN_SPLITS per pair.
    if (p.M > 32 || p.attn_splits != MAX_ATTN_SPLITS || p.claim_counters == nullptr) __trap();
    for (int k = 0; k < CLAIM_BOX; ++k) {
      mbar_init(&misc->box.full[k], 1);
      mbar_init(&misc->box.empty[k], NUM_CONSUMER_WARPS);
    }
#endif
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  const int* instrs = p.instrs + (size_t)blockIdx.x * p.max_instrs * INSTR_INTS;
  const int count = p.instr_counts[blockIdx.x];
  if (tid >= NUM_CONSUMERS) {
#ifdef ATTN_CLAIM
    producer(p, instrs, count, ring, full, empty, &misc->pause_ii, &misc->box);
#else
    producer(p, instrs, count, ring, full, empty, &misc->pause_ii, nullptr);
#endif
    return;
  }

  uint32_t chunk = 0, claims = 0;
  for (int ii = 0; ii < count; ++ii) {
    const int* in = instrs + ii * INSTR_INTS;
    if (tid == 0) misc->ii = ii;
    const int op = in[0], dep_stage = in[5], dep_target = in[6], stage = in[7];
    const int prev_dep = ii > 0 ? in[5 - INSTR_INTS] : -1;  // met before this instruction starts
    if (tid == 0 && p.trace) instr_trace(p, misc)[0] = globaltimer();
    if (op == OP_EMBED) {
      wait_dependency(p, dep_stage, dep_target, misc);  // the other ops wait after issuing their first loads
      const int H = (int)p.hidden;
      for (int m = in[3]; m < in[4]; ++m) {
        const bf16* row = p.embed + (size_t)p.input_ids[m] * H;
        for (int v = tid; v < H / 8; v += NUM_CONSUMERS) {
          const uint4 x = *reinterpret_cast<const uint4*>(row + v * 8);
          if (p.tagged)
            st_tagged8(p.h + (size_t)m * H + v * 8, x, stage_tag(misc, stage));
          else
            *reinterpret_cast<uint4*>(reinterpret_cast<bf16*>(p.h) + (size_t)m * H + v * 8) = x;
        }
      }
      if (tid == 0) misc->merged = in[4] - in[3];
    } else if (op == OP_ATTN) {
      run_attention(p, in, ring, full, empty, chunk, claims, xs, misc);
    } else if (p.M <= 8) {
      run_matmul<1>(p, in, ring, full, empty, xs, red, misc, chunk, prev_dep);
    } else {
      run_matmul<2>(p, in, ring, full, empty, xs, red, misc, chunk, prev_dep);
    }
    if (tid == 0 && p.pause_release && !WRITES_TAGGED(p, op)) pause_loads(misc);
    if (tid == 0) misc->staging_ii = ii + 1;
    consumer_sync();
    // The release is cumulative: every consumer's writes precede it through the barrier above.
    if (tid == 0 && misc->merged > 0 && !WRITES_TAGGED(p, op)) {  // tagged results need no counter
      red_release_add(p.done + stage, misc->merged);
    }
    if (tid == 0 && p.pause_release) resume_loads(misc);
    if (tid == 0 && p.trace) {
      instr_trace(p, misc)[2] = globaltimer();
      if (p.phase_trace && is_matmul(op)) {  // (attention copies its own: those of its last non-empty item)
        long long* out = p.phase_trace + ((size_t)blockIdx.x * p.max_instrs + ii) * ATTN_PHASES;
        for (int k = 0; k < MATMUL_PHASES; ++k) out[k] = misc->phase[k];
        out[MATMUL_PHASES] = misc->repolls[ii & 1];  // a count, not a stamp (trace.tagged_repolls)
        misc->repolls[ii & 1] = 0;
      }
    }
  }
}
