"""What slows the megakernel's consumer warps: a shared-memory pass like the RMSNorm's normalising pass, timed on
every SM while the block's ninth (producer) warp does one of four things:

- `idle`: nothing (it exits at once);
- `spin`: polls a shared-memory word in a tight loop, as the producer does on `pause_ii` while the consumers release;
- `try-wait`: waits on an mbarrier with `mbarrier.try_wait`, as it does for ring slots;
- `stream`: streams its own 8 MB of global memory through a 4-stage ring of 32 KB chunks with bulk copies, two in
  flight, as it does for weights (every SM at once: HBM-bound).

The consumer pass, per round: each of 256 threads loads `vecs` 16-byte pieces of a row and of a weight vector
from shared memory, scales and rounds them with the kernel's own `rmsnorm_pair`, stores the piece back, then the 8
warps meet at a barrier (`lds`); or the same arithmetic on registers without the loads and stores (`alu`). `vecs` 1
is the batch-1 pass (2048 values), 16 the batch-16 one per thread.

DECODE_NOTES session 17: in the megakernel that pass costs 3-5x what its instruction count predicts (2 % of a step
at batch 1, 4 % at 16), as attention's first-chunk phases do. This asks whether the producer's activity is why.

    python scripts/probe_consumer_issue.py --out probe.json      # needs nvcc and a Hopper GPU
"""

from __future__ import annotations

import re
from pathlib import Path

from cuda_probe import build_and_run, probe_cli

MODES = ("idle", "spin", "try-wait", "stream")
CONSUMERS = ("lds", "alu")

SOURCE = r"""
#include <cstdio>
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#define CONSUMERS 256
#define STAGES 4
#define CHUNK 32768
#define REGION (8 << 20)  // bytes each block streams, round and round

__device__ __forceinline__ uint32_t sa(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile("{\n.reg .pred done;\nWAIT:\nmbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
               "@!done bra WAIT;\n}" ::"r"(sa(bar)), "r"(parity) : "memory");
}

RMSNORM_PAIR

struct Result {
  long long cycles, ns, chunks;
};

template <bool LDS, int VECS>
__global__ void __launch_bounds__(CONSUMERS + 32, 1) probe(const char* src, int mode, int rounds, float r,
                                                           Result* out) {
  extern __shared__ __align__(1024) char smem[];
  char* ring = smem;                                 // STAGES x CHUNK
  char* xs = smem + STAGES * CHUNK;                  // CONSUMERS x VECS x 16 bytes of rows (64 KB at VECS 16)
  char* gs = xs + CONSUMERS * VECS * 16;             // 4 KB of norm weights (2048 bf16), shared by the rows
  __shared__ __align__(8) uint64_t full[STAGES], done_bar;
  __shared__ volatile int done_flag;
  const int tid = threadIdx.x, lane = tid & 31;
  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(sa(&full[s])));
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(sa(&done_bar)));
    done_flag = 0;
  }
  for (int i = tid; i < CONSUMERS * VECS * 4; i += blockDim.x)  // bf16 ones: the pass keeps them ones
    reinterpret_cast<uint32_t*>(xs)[i] = 0x3F803F80u;
  for (int i = tid; i < CONSUMERS * 4; i += blockDim.x) reinterpret_cast<uint32_t*>(gs)[i] = 0x3F803F80u;
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  __syncthreads();
  if (tid >= CONSUMERS) {  // the producer warp
    if (mode == 1) {
      while (!done_flag) {
      }
    } else if (mode == 2) {
      mbar_wait(&done_bar, 0);
    } else if (mode == 3) {
      const char* region = src + (size_t)blockIdx.x * REGION;
      long long chunk = 0;
      for (; !done_flag; ++chunk) {
        const int s = chunk % STAGES;
        if (chunk >= 2) mbar_wait(&full[(chunk - 2) % STAGES], ((chunk - 2) / STAGES) & 1);  // 2 in flight
        if (lane == 0) {
          asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(sa(&full[s])), "r"(CHUNK)
                       : "memory");
          const char* from = region + (chunk * CHUNK) % REGION;
          for (int half = 0; half < 2; ++half)
            asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                         ::"r"(sa(ring + s * CHUNK + half * (CHUNK / 2))), "l"(from + half * (CHUNK / 2)),
                         "r"(CHUNK / 2), "r"(sa(&full[s])) : "memory");
        }
        __syncwarp();
      }
      for (long long c = chunk - 2 < 0 ? 0 : chunk - 2; c < chunk; ++c)  // drain: nothing in flight at exit
        mbar_wait(&full[c % STAGES], (c / STAGES) & 1);
      if (lane == 0) out[blockIdx.x].chunks = chunk;
    }
    return;
  }
  // The consumers.
  uint4 keep[VECS];
  if (!LDS)
    for (int v = 0; v < VECS; ++v) keep[v] = reinterpret_cast<const uint4*>(xs)[tid + v * CONSUMERS];
  asm volatile("bar.sync 1, %0;" ::"n"(CONSUMERS));
  long long t0 = clock64(), n0;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(n0));
  for (int round = 0; round < rounds; ++round) {
#pragma unroll
    for (int v = 0; v < VECS; ++v) {
      uint4* at = reinterpret_cast<uint4*>(xs) + tid + v * CONSUMERS;
      const uint4 x = LDS ? *at : keep[v];
      const uint4 g = LDS ? reinterpret_cast<const uint4*>(gs)[(tid + v * 32) % CONSUMERS] : keep[(v + 1) % VECS];
      const uint4 y = {rmsnorm_pair(x.x, g.x, r), rmsnorm_pair(x.y, g.y, r), rmsnorm_pair(x.z, g.z, r),
                       rmsnorm_pair(x.w, g.w, r)};
      if (LDS) *at = y; else keep[v] = y;
    }
    asm volatile("bar.sync 1, %0;" ::"n"(CONSUMERS));
  }
  long long n1;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(n1));
  const long long cycles = clock64() - t0;
  if (!LDS && tid == 0) {  // keep the register pass alive
    uint32_t acc = 0;
    for (int v = 0; v < VECS; ++v) acc ^= keep[v].x;
    if (acc == 0x12345678u) out[blockIdx.x].chunks = -1;
  }
  if (tid == 0) {
    out[blockIdx.x].cycles = cycles;
    out[blockIdx.x].ns = n1 - n0;
    done_flag = 1;
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(sa(&done_bar)) : "memory");
  }
}

#define CHECK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { \
  printf("error %s at line %d\n", cudaGetErrorString(e), __LINE__); return 1; } } while (0)

template <bool LDS, int VECS>
int run(const char* consumer, const char* src, Result* out, int sms, const char* const* modes) {
  const int smem = STAGES * CHUNK + CONSUMERS * VECS * 16 + CONSUMERS * 16;
  CHECK(cudaFuncSetAttribute(probe<LDS, VECS>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const int rounds = 2000;
  for (int mode = 0; mode < 4; ++mode) {
    for (int rep = 0; rep < 2; ++rep) {  // the first launch warms up
      CHECK(cudaMemset(out, 0, sms * sizeof(Result)));
      probe<LDS, VECS><<<sms, CONSUMERS + 32, smem>>>(src, mode, rounds, 1.0f, out);
      CHECK(cudaGetLastError());
      CHECK(cudaDeviceSynchronize());
    }
    Result host[1024];
    CHECK(cudaMemcpy(host, out, sms * sizeof(Result), cudaMemcpyDeviceToHost));
    double cycles = 0, ns = 0, chunks = 0;
    for (int b = 0; b < sms; ++b) {
      cycles += host[b].cycles;
      ns += host[b].ns;
      chunks += host[b].chunks;
    }
    const double mean_ns = ns / sms;
    printf("consumer=%s vecs=%d mode=%s cycles_per_round=%.1f ns_per_round=%.1f stream_gbps=%.1f\n", consumer, VECS,
           modes[mode], cycles / sms / rounds, mean_ns / rounds, chunks * CHUNK / mean_ns);
  }
  return 0;
}

int main() {
  int sms;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  char* src;
  Result* out;
  CHECK(cudaMalloc(&src, (size_t)sms * REGION));
  CHECK(cudaMemset(src, 0, (size_t)sms * REGION));
  CHECK(cudaMalloc(&out, sms * sizeof(Result)));
  const char* const modes[4] = {"idle", "spin", "try-wait", "stream"};
  if (run<true, 1>("lds", src, out, sms, modes) || run<true, 16>("lds", src, out, sms, modes) ||
      run<false, 1>("alu", src, out, sms, modes) || run<false, 16>("alu", src, out, sms, modes))
    return 1;
  return 0;
}
"""

KERNEL = Path(__file__).resolve().parents[1] / "tokenmill" / "kernels" / "megakernel" / "llama_decode.cu"


def source() -> str:
    """The program, with the megakernel's own `rmsnorm_pair` (so the probe times the code the kernel runs)."""
    kernel = KERNEL.read_text()
    match = re.search(r"__device__ __forceinline__ uint32_t rmsnorm_pair\(.*?\n}\n", kernel, re.S)
    if match is None:
        raise SystemExit(f"rmsnorm_pair not found in {KERNEL}")
    return SOURCE.replace("RMSNORM_PAIR", match.group(0))


LINE = re.compile(r"consumer=(\w+) vecs=(\d+) mode=([\w-]+) cycles_per_round=([\d.]+) ns_per_round=([\d.]+) "
                  r"stream_gbps=([\d.]+)")


def parse(stdout: str) -> list[dict]:
    """One row per (consumer, vecs, mode) the program printed."""
    rows = []
    for match in LINE.finditer(stdout):
        consumer, vecs, mode, cycles, ns, gbps = match.groups()
        rows.append(dict(consumer=consumer, vecs=int(vecs), mode=mode, cycles_per_round=float(cycles),
                         ns_per_round=float(ns), stream_gbps=float(gbps)))
    return rows


def table(rows: list[dict]) -> str:
    """Cycles per round against the same pass with an idle producer."""
    idle = {(r["consumer"], r["vecs"]): r["cycles_per_round"] for r in rows if r["mode"] == "idle"}
    lines = [f"{'consumer':8} {'vecs':>4} {'producer':9} {'cycles/round':>12} {'vs idle':>8} {'stream GB/s':>11}"]
    for r in rows:
        base = idle.get((r["consumer"], r["vecs"]))
        ratio = f"{r['cycles_per_round'] / base:.2f}" if base else "-"
        lines.append(f"{r['consumer']:8} {r['vecs']:>4} {r['mode']:9} {r['cycles_per_round']:>12.1f} {ratio:>8} "
                     f"{r['stream_gbps']:>11.1f}")
    return "\n".join(lines)


def main() -> None:
    probe_cli(__doc__.splitlines()[0],
              lambda: {"rows": parse(build_and_run(source(), ("-arch=sm_90a", "-O3", "-std=c++17")))},
              lambda result: table(result["rows"]))


if __name__ == "__main__":
    main()
