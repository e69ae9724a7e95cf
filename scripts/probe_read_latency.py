"""How long a read of data that sits in L2 takes while weight chunks stream: the question under every megakernel
handoff (DECODE_NOTES m13e, sessions 18-20: "a consumer's load waits behind its SM's weight chunks in flight").

Every SM runs one block shaped like the megakernel's: 256 consumer threads and a producer warp that can stream its
own 8 MB of global memory through a 4-stage ring of 32 KB bulk copies (evict-first, `inflight` chunks asked for
and not landed, as the kernel's producer does). Even-numbered blocks measure, odd ones only load; the mode says
whose producers stream:

- `none`: nobody (the read's latency on an idle GPU);
- `own`: only the measuring blocks' producers (their own chunks in flight, half the SMs loading HBM);
- `others`: only the other blocks' (HBM busy, the measuring SM's own queue empty);
- `all`: every block's (the megakernel's situation).

After 20 us of streaming each measuring block times three reads of L2-resident data:
`chase` (thread 0: dependent 4-byte `ld.relaxed.gpu` loads over its own 8 KB table: one round trip each),
`stage 8 KB` (the 256 consumers copy one shared 8 KB row with cp.async.cg, wait and meet at a barrier: batch 1's
tagged h row) and `stage 64 KB` (16 pieces each: batch 16's staged rows). If `own` is as slow as `all` and `others`
as fast as `none`, the wait is the SM's own queue; if `others` is as slow as `all`, it is the memory system's.

Then the handoff itself: block 1 writes 8 KB that the measuring blocks wait for, 64 rounds, timed from the writer's
first store to each reader's last piece staged (globaltimer on both sides), with nobody, everybody, everybody but the
readers or everybody but the writer streaming; the mean over readers and the last reader's (the one a stage waits
for). `tagged`: words carrying the round in their high halves, polled four ways: `copy` (cp.async pieces re-read
32 ns after a stale read: the kernel's batch-1 staging), `copy-256ns` (the same, 256 ns apart), `warp-first` (lane
0 of each warp polls one piece with register loads before the warp copies) and `registers` (every thread polls its
pieces with register loads). `counter`: plain data, a release fence and a flag that the readers poll before
staging: `acquire` (acquire loads back to back, the kernel's way), `acquire-64ns`, `relaxed-fence` (relaxed loads,
one fence once the flag is seen). `settled`: as `counter`, but the readers wait 5 us after the flag and time only
the staging (the read of a just-written row, without the handoff).

    python scripts/probe_read_latency.py --out probe.json      # needs nvcc and a Hopper GPU
"""

from __future__ import annotations

import re

from cuda_probe import build_and_run, probe_cli

MODES = ("none", "own", "others", "all")
INFLIGHT = (1, 2, 4)

SOURCE = r"""
#include <cstdio>
#include <cstdint>
#include <cuda_runtime.h>

#define CONSUMERS 256
#define STAGES 4
#define CHUNK 32768
#define REGION (8 << 20)     // bytes each streaming block reads, round and round
#define CHASE_WORDS 2048     // 8 KB per measuring block
#define CHASE_LOADS 400
#define STAGE_REPS 64
#define WARMUP_NS 20000

__device__ __forceinline__ uint32_t sa(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }
__device__ __forceinline__ long long now() {
  long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile("{\n.reg .pred done;\nWAIT:\nmbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
               "@!done bra WAIT;\n}" ::"r"(sa(bar)), "r"(parity) : "memory");
}
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, %0;" ::"n"(CONSUMERS) : "memory"); }
__device__ __forceinline__ void cp16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(sa(dst)), "l"(src) : "memory");
}

__device__ __forceinline__ uint4 ld_relaxed4(const uint32_t* p) {
  uint4 w;
  asm volatile("ld.relaxed.gpu.global.v4.b32 {%0, %1, %2, %3}, [%4];"
               : "=r"(w.x), "=r"(w.y), "=r"(w.z), "=r"(w.w) : "l"(p) : "memory");
  return w;
}
__device__ __forceinline__ bool carries(uint4 w, uint32_t tag) {
  return (w.x >> 16 == tag) & (w.y >> 16 == tag) & (w.z >> 16 == tag) & (w.w >> 16 == tag);
}

struct Result {
  long long chase_ns, stage8_ns, stage64_ns, chunks, stream_ns;
};

// The producer warp: its block's 8 MB through the ring, 16 bulk-copied 2 KB rows per 32 KB chunk (evict-first, as
// the kernel's weights), `inflight` chunks asked for and not landed, until `stop` reaches `stop_at`. The chunks read.
__device__ long long stream_until_stopped(const char* src, char* ring, uint64_t* full, int inflight, const int* stop,
                                     int stop_at) {
  const int lane = threadIdx.x & 31;
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  const char* region = src + (size_t)blockIdx.x * REGION;
  long long chunk = 0;
  for (;; ++chunk) {
    const int stopped = lane == 0 ? *(volatile const int*)stop : 0;
    if (__shfl_sync(0xffffffffu, stopped, 0) >= stop_at) break;
    const int s = chunk % STAGES;
    if (chunk >= inflight) mbar_wait(&full[(chunk - inflight) % STAGES], ((chunk - inflight) / STAGES) & 1);
    if (lane == 0) {
      asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(sa(&full[s])), "r"(CHUNK)
                   : "memory");
      const char* from = region + (chunk * CHUNK) % REGION;
      for (int part = 0; part < 16; ++part)
        asm volatile(
            "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], "
            "%4;" ::"r"(sa(ring + s * CHUNK + part * 2048)), "l"(from + part * 2048), "r"(2048), "r"(sa(&full[s])),
            "l"(policy) : "memory");
    }
    __syncwarp();
  }
  for (long long c = chunk - inflight < 0 ? 0 : chunk - inflight; c < chunk; ++c)  // drain before exiting
    mbar_wait(&full[c % STAGES], (c / STAGES) & 1);
  return chunk;
}

// Times `pieces` 16-byte pieces per consumer of `row` into shared memory, STAGE_REPS times; thread 0's mean.
__device__ long long time_staging(const char* row, char* xs, int pieces) {
  const int tid = threadIdx.x;
  consumers_sync();
  const long long t0 = now();
  for (int rep = 0; rep < STAGE_REPS; ++rep) {
    for (int i = 0; i < pieces; ++i) cp16(xs + (i * CONSUMERS + tid) * 16, row + (i * CONSUMERS + tid) * 16);
    asm volatile("cp.async.wait_all;" ::: "memory");
    consumers_sync();
  }
  return (now() - t0) / STAGE_REPS;
}

__global__ void __launch_bounds__(CONSUMERS + 32, 1) probe(const char* src, const uint32_t* chase, const char* row,
                                                           int mode, int inflight, int* stop, int measurers,
                                                           Result* out) {
  extern __shared__ __align__(1024) char smem[];
  char* ring = smem;                  // STAGES x CHUNK
  char* xs = smem + STAGES * CHUNK;   // 64 KB of staged rows
  __shared__ __align__(8) uint64_t full[STAGES];
  const int tid = threadIdx.x, lane = tid & 31;
  const bool measurer = blockIdx.x % 2 == 0;
  const bool streams = measurer ? (mode == 1 || mode == 3) : (mode == 2 || mode == 3);
  if (tid == 0)
    for (int s = 0; s < STAGES; ++s) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(sa(&full[s])));
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  __syncthreads();
  if (tid >= CONSUMERS) {  // the producer warp
    if (!streams) return;
    const long long t0 = now();
    const long long chunks = stream_until_stopped(src, ring, full, inflight, stop, measurers);
    if (lane == 0) {
      out[blockIdx.x].chunks = chunks;
      out[blockIdx.x].stream_ns = now() - t0;
    }
    return;
  }
  if (!measurer) return;
  // Warm L2 with what is timed (the streams' evict-first lines leave it there), then let the streams settle.
  const uint32_t* table = chase + (size_t)(blockIdx.x / 2) * CHASE_WORDS;
  for (int i = tid; i < CHASE_WORDS; i += CONSUMERS) asm volatile("prefetch.global.L2 [%0];" ::"l"(table + i));
  time_staging(row, xs, 16);
  if (tid == 0) {
    const long long t0 = now();
    while (now() - t0 < WARMUP_NS) {
    }
  }
  consumers_sync();
  if (tid == 0) {
    uint32_t i = 0;
    const long long t0 = now();
    for (int k = 0; k < CHASE_LOADS; ++k)
      asm volatile("ld.relaxed.gpu.global.b32 %0, [%1];" : "=r"(i) : "l"(table + i) : "memory");
    out[blockIdx.x].chase_ns = (now() - t0) / CHASE_LOADS;
    if (i == 0xFFFFFFFFu) out[blockIdx.x].chunks = -1;  // keeps the chain
  }
  const long long stage8 = time_staging(row, xs, 2);
  const long long stage64 = time_staging(row, xs, 16);
  if (tid == 0) {
    out[blockIdx.x].stage8_ns = stage8;
    out[blockIdx.x].stage64_ns = stage64;
    atomicAdd(stop, 1);
  }
}

// ---- handoff: one block writes 8 KB, the measuring blocks wait for it and read it ------------------------------
// kind 0 (tagged, as batch 1's h): 2048 words whose high halves carry the round, each consumer polling its 32 bytes
// as `poll` says: 0 cp.async pieces re-read 32 ns after a stale read (stage_x's way), 1 the same 256 ns apart, 2 lane
// 0 of each warp first polls one piece with register loads (then every thread its own, as in 0), 3 every thread its
// own pieces with register loads. kind 1 (counter, as o's and down's inputs): plain data, a release fence and a
// flag; thread 0 of each reader polls the flag (poll 0 acquire loads back to back, as wait_dependency does; 1 the
// same 64 ns apart; 2 relaxed loads, then one acquire fence), then the readers stage the 8 KB with cp.async. kind 2
// (settled): as 1, but the readers wait 5 us after seeing the flag and time only the staging (a just-written row's
// read, without the handoff). Streams: 0 nobody, 1 everybody, 2 everybody but the readers, 3 everybody but the
// writer. Times, from the writer's first store to each reader's last piece staged, land in
// seen[round * readers + reader] - wrote[round] (kind 2: wrote is 0, seen the staging's time).

#define HANDOFF_ROUNDS 64
#define WRITER 1

__global__ void __launch_bounds__(CONSUMERS + 32, 1) handoff(const char* src, uint32_t* words, int* flag, int* done,
                                                             int kind, int poll, int mode, int inflight, int* stop,
                                                             int readers, long long* wrote, long long* seen) {
  extern __shared__ __align__(1024) char smem[];
  char* ring = smem;
  uint32_t* staged = reinterpret_cast<uint32_t*>(smem + STAGES * CHUNK);  // 8 KB
  __shared__ __align__(8) uint64_t full[STAGES];
  const int tid = threadIdx.x, lane = tid & 31;
  const bool reader = blockIdx.x % 2 == 0, writer = blockIdx.x == WRITER;
  const bool streams = mode == 1 || (mode == 2 && !reader) || (mode == 3 && !writer);
  if (tid == 0)
    for (int s = 0; s < STAGES; ++s) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(sa(&full[s])));
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  __syncthreads();
  if (tid >= CONSUMERS) {
    if (streams) stream_until_stopped(src, ring, full, inflight, stop, readers);
    return;
  }
  if (writer) {
    for (int r = 1; r <= HANDOFF_ROUNDS; ++r) {
      if (tid == 0) {
        int d;
        do asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(d) : "l"(done) : "memory");
        while (d < readers * (r - 1));
        const long long t0 = now();
        while (now() - t0 < (r == 1 ? WARMUP_NS : 3000)) {  // the readers are polling by now
        }
        wrote[r - 1] = kind == 2 ? 0 : now();
      }
      consumers_sync();
      uint32_t* mine = words + tid * 8;
      const uint32_t w = ((uint32_t)r << 16) | (uint32_t)tid;
      if (kind == 0) {  // (the tagged words)
        asm volatile("st.relaxed.gpu.global.v4.b32 [%0], {%1, %1, %1, %1};" ::"l"(mine), "r"(w) : "memory");
        asm volatile("st.relaxed.gpu.global.v4.b32 [%0], {%1, %1, %1, %1};" ::"l"(mine + 4), "r"(w) : "memory");
      } else {
        reinterpret_cast<uint4*>(mine)[0] = make_uint4(w, w, w, w);
        reinterpret_cast<uint4*>(mine)[1] = make_uint4(w, w, w, w);
        consumers_sync();
        if (tid == 0) {
          asm volatile("fence.acq_rel.gpu;" ::: "memory");
          asm volatile("st.relaxed.gpu.global.b32 [%0], %1;" ::"l"(flag), "r"(r) : "memory");
        }
      }
    }
    return;
  }
  if (!reader) return;
  const int me = blockIdx.x / 2;
  for (int r = 1; r <= HANDOFF_ROUNDS; ++r) {
    const uint32_t tag = (uint32_t)r;
    long long started = 0;
    if (kind == 0 && poll == 3) {
      while (true) {
        const uint4 a = ld_relaxed4(words + tid * 8), b = ld_relaxed4(words + tid * 8 + 4);
        if (carries(a, tag) & carries(b, tag)) {
          reinterpret_cast<uint4*>(staged + tid * 8)[0] = a;
          reinterpret_cast<uint4*>(staged + tid * 8)[1] = b;
          break;
        }
        __nanosleep(32);
      }
    } else if (kind == 0) {
      if (poll == 2 && lane == 0)
        while (!carries(ld_relaxed4(words + (tid + 31) * 8), tag)) __nanosleep(32);  // the warp's last piece
      __syncwarp();
      while (true) {
        cp16(staged + tid * 8, words + tid * 8);
        cp16(staged + tid * 8 + 4, words + tid * 8 + 4);
        asm volatile("cp.async.wait_all;" ::: "memory");
        bool fresh = true;
        for (int k = 0; k < 8; ++k) fresh &= staged[tid * 8 + k] >> 16 == tag;
        if (fresh) break;
        __nanosleep(poll == 1 ? 256 : 32);
      }
    } else {
      if (tid == 0) {
        int f;
        if (kind == 1 && poll == 2) {  // relaxed polls, one fence after the flag is seen
          do asm volatile("ld.relaxed.gpu.global.b32 %0, [%1];" : "=r"(f) : "l"(flag) : "memory");
          while (f < r);
          asm volatile("fence.acq_rel.gpu;" ::: "memory");
        } else {
          while (true) {
            asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(f) : "l"(flag) : "memory");
            if (f >= r) break;
            if (kind == 1 && poll == 1) __nanosleep(64);
          }
        }
        if (kind == 2) {
          const long long t0 = now();
          while (now() - t0 < 5000) {
          }
          started = now();
        }
      }
      consumers_sync();
      cp16(staged + tid * 8, words + tid * 8);
      cp16(staged + tid * 8 + 4, words + tid * 8 + 4);
      asm volatile("cp.async.wait_all;" ::: "memory");
    }
    consumers_sync();
    if (tid == 0) {
      seen[(size_t)(r - 1) * readers + me] = now() - started;
      atomicAdd(done, 1);
    }
  }
  if (tid == 0) atomicAdd(stop, 1);
}

#define CHECK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { \
  printf("error %s at line %d\n", cudaGetErrorString(e), __LINE__); return 1; } } while (0)

int main() {
  int sms;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const int measurers = (sms + 1) / 2;
  char *src, *row;
  uint32_t* chase;
  int* stop;
  Result* out;
  CHECK(cudaMalloc(&src, (size_t)sms * REGION));
  CHECK(cudaMemset(src, 0, (size_t)sms * REGION));
  CHECK(cudaMalloc(&row, 65536));
  CHECK(cudaMemset(row, 0, 65536));
  // Each measuring block's table: one cycle over its 64 lines of 128 bytes, in a scrambled order (absolute word
  // indices into its own table).
  uint32_t* host_chase = new uint32_t[(size_t)measurers * CHASE_WORDS]();
  for (int m = 0; m < measurers; ++m) {
    int line = 0;
    for (int k = 0; k < 64; ++k) {
      const int next = (line + 37) % 64;
      host_chase[(size_t)m * CHASE_WORDS + line * 32] = next * 32;
      line = next;
    }
  }
  CHECK(cudaMalloc(&chase, (size_t)measurers * CHASE_WORDS * 4));
  CHECK(cudaMemcpy(chase, host_chase, (size_t)measurers * CHASE_WORDS * 4, cudaMemcpyHostToDevice));
  CHECK(cudaMalloc(&stop, sizeof(int)));
  CHECK(cudaMalloc(&out, sms * sizeof(Result)));
  const int smem = STAGES * CHUNK + 65536;
  CHECK(cudaFuncSetAttribute(probe, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const char* const modes[4] = {"none", "own", "others", "all"};
  const int inflights[3] = {1, 2, 4};
  for (int f = 0; f < 3; ++f)
    for (int mode = 0; mode < 4; ++mode) {
      if (mode == 0 && f > 0) continue;  // nothing streams: in-flight depth means nothing
      Result host[1024];
      for (int rep = 0; rep < 2; ++rep) {  // the first launch warms up
        CHECK(cudaMemset(stop, 0, sizeof(int)));
        CHECK(cudaMemset(out, 0, sms * sizeof(Result)));
        probe<<<sms, CONSUMERS + 32, smem>>>(src, chase, row, mode, inflights[f], stop, measurers, out);
        CHECK(cudaGetLastError());
        CHECK(cudaDeviceSynchronize());
      }
      CHECK(cudaMemcpy(host, out, sms * sizeof(Result), cudaMemcpyDeviceToHost));
      double chase_ns = 0, stage8 = 0, stage64 = 0, bytes = 0, stream_ns = 0;
      int streamers = 0;
      for (int b = 0; b < sms; ++b) {
        if (b % 2 == 0) {
          chase_ns += host[b].chase_ns;
          stage8 += host[b].stage8_ns;
          stage64 += host[b].stage64_ns;
        }
        if (host[b].stream_ns > 0) {
          bytes += (double)host[b].chunks * CHUNK;
          stream_ns = stream_ns > host[b].stream_ns ? stream_ns : host[b].stream_ns;
          ++streamers;
        }
      }
      printf("mode=%s inflight=%d chase_ns=%.1f stage8_ns=%.1f stage64_ns=%.1f streamers=%d stream_gbps=%.1f\n",
             modes[mode], mode == 0 ? 0 : inflights[f], chase_ns / measurers, stage8 / measurers,
             stage64 / measurers, streamers, stream_ns > 0 ? bytes / stream_ns : 0.0);
    }

  // The handoffs.
  uint32_t* words;
  int *flag, *done;
  long long *wrote, *seen;
  CHECK(cudaMalloc(&words, 8192));
  CHECK(cudaMalloc(&flag, sizeof(int)));
  CHECK(cudaMalloc(&done, sizeof(int)));
  CHECK(cudaMalloc(&wrote, HANDOFF_ROUNDS * sizeof(long long)));
  CHECK(cudaMalloc(&seen, (size_t)HANDOFF_ROUNDS * measurers * sizeof(long long)));
  CHECK(cudaFuncSetAttribute(handoff, cudaFuncAttributeMaxDynamicSharedMemorySize, STAGES * CHUNK + 8192));
  long long* host_wrote = new long long[HANDOFF_ROUNDS];
  long long* host_seen = new long long[(size_t)HANDOFF_ROUNDS * measurers];
  const char* const handoff_modes[4] = {"none", "all", "all-but-readers", "all-but-writer"};
  const char* const kinds[3] = {"tagged", "counter", "settled"};
  const char* const polls[4] = {"copy", "copy-256ns", "warp-first", "registers"};
  // (kind, poll): the tagged polls, then the counter and the settled read
  const char* const counter_polls[3] = {"acquire", "acquire-64ns", "relaxed-fence"};
  const int cases[8][2] = {{0, 0}, {0, 1}, {0, 2}, {0, 3}, {1, 0}, {1, 1}, {1, 2}, {2, 0}};
  for (int c = 0; c < 8; ++c)
    for (int f = 0; f < 2; ++f)
      for (int mode = 0; mode < 4; ++mode) {
        const int kind = cases[c][0], poll = cases[c][1];
        if (mode == 0 && f > 0) continue;
        for (int rep = 0; rep < 2; ++rep) {
          CHECK(cudaMemset(words, 0, 8192));
          CHECK(cudaMemset(flag, 0, sizeof(int)));
          CHECK(cudaMemset(done, 0, sizeof(int)));
          CHECK(cudaMemset(stop, 0, sizeof(int)));
          handoff<<<sms, CONSUMERS + 32, STAGES * CHUNK + 8192>>>(src, words, flag, done, kind, poll, mode,
                                                                 inflights[f], stop, measurers, wrote, seen);
          CHECK(cudaGetLastError());
          CHECK(cudaDeviceSynchronize());
        }
        CHECK(cudaMemcpy(host_wrote, wrote, HANDOFF_ROUNDS * sizeof(long long), cudaMemcpyDeviceToHost));
        CHECK(cudaMemcpy(host_seen, seen, (size_t)HANDOFF_ROUNDS * measurers * sizeof(long long),
                         cudaMemcpyDeviceToHost));
        double mean = 0, last = 0;  // over rounds: the readers' mean, and the last reader's
        for (int r = 0; r < HANDOFF_ROUNDS; ++r) {
          long long sum = 0, latest = 0;
          for (int m = 0; m < measurers; ++m) {
            const long long d = host_seen[(size_t)r * measurers + m] - host_wrote[r];
            sum += d;
            latest = latest > d ? latest : d;
          }
          mean += (double)sum / measurers;
          last += latest;
        }
        printf("handoff=%s poll=%s mode=%s inflight=%d mean_ns=%.1f last_ns=%.1f\n", kinds[kind],
               kind == 0 ? polls[poll] : kind == 1 ? counter_polls[poll] : "-", handoff_modes[mode],
               mode == 0 ? 0 : inflights[f], mean / HANDOFF_ROUNDS, last / HANDOFF_ROUNDS);
      }
  return 0;
}
"""

LINE = re.compile(r"mode=(\w+) inflight=(\d+) chase_ns=([\d.]+) stage8_ns=([\d.]+) stage64_ns=([\d.]+) "
                  r"streamers=(\d+) stream_gbps=([\d.]+)")
HANDOFF_LINE = re.compile(r"handoff=(\w+) poll=([\w-]+) mode=([\w-]+) inflight=(\d+) mean_ns=([\d.]+) "
                          r"last_ns=([\d.]+)")


def parse(stdout: str) -> dict[str, list[dict]]:
    """The reads (one row per mode and in-flight depth) and the handoffs (per kind, mode and depth)."""
    reads = []
    for match in LINE.finditer(stdout):
        mode, inflight, chase, stage8, stage64, streamers, gbps = match.groups()
        reads.append(dict(mode=mode, inflight=int(inflight), chase_ns=float(chase), stage8_ns=float(stage8),
                          stage64_ns=float(stage64), streamers=int(streamers), stream_gbps=float(gbps)))
    handoffs = [dict(kind=kind, poll=poll, mode=mode, inflight=int(inflight), mean_ns=float(mean),
                     last_ns=float(last))
                for kind, poll, mode, inflight, mean, last in HANDOFF_LINE.findall(stdout)]
    return {"rows": reads, "handoffs": handoffs}


def table(result: dict[str, list[dict]]) -> str:
    """Each read's time and its ratio to the same read with nothing streaming; then the handoffs."""
    rows = result["rows"]
    idle = next((r for r in rows if r["mode"] == "none"), None)
    lines = [f"{'streams':8} {'in flight':>9} {'chase ns':>9} {'x idle':>7} {'8 KB ns':>8} {'x idle':>7} "
             f"{'64 KB ns':>9} {'x idle':>7} {'HBM GB/s':>9}"]
    for r in rows:
        def ratio(key: str) -> str:
            return f"{r[key] / idle[key]:.2f}" if idle and idle[key] else "-"
        lines.append(f"{r['mode']:8} {r['inflight'] or '-':>9} {r['chase_ns']:>9.0f} {ratio('chase_ns'):>7} "
                     f"{r['stage8_ns']:>8.0f} {ratio('stage8_ns'):>7} {r['stage64_ns']:>9.0f} "
                     f"{ratio('stage64_ns'):>7} {r['stream_gbps']:>9.0f}")
    if result["handoffs"]:
        lines.append("")
        lines.append(f"{'handoff':8} {'poll':11} {'streams':16} {'in flight':>9} {'mean ns':>8} "
                     f"{'last reader ns':>14}")
        for h in result["handoffs"]:
            lines.append(f"{h['kind']:8} {h['poll']:11} {h['mode']:16} {h['inflight'] or '-':>9} "
                         f"{h['mean_ns']:>8.0f} {h['last_ns']:>14.0f}")
    return "\n".join(lines)


def main() -> None:
    probe_cli(__doc__.splitlines()[0], lambda: parse(build_and_run(SOURCE, ("-arch=sm_90a", "-O3", "-std=c++17"))),
              table)


if __name__ == "__main__":
    main()
