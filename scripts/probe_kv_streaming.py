"""How fast one block per SM can stream KV-cache-shaped data through a shared-memory ring, by the kind of copy:

- `head-box`: the megakernel's attention copies today: TMA tensor boxes of one KV head's rows of one 16-token KV
  block (64 dims x 16 rows, 128 B per row at a 1 KB stride: 2 KB per box, 16 boxes per 32 KB chunk); the 8 SMs
  of a group read the 8 heads of the same blocks;
- `block-box`: TMA boxes of every head of a KV block (64 x 8 x 16: 16 KB, contiguous), 2 per chunk;
- `bulk`: plain bulk copies (cp.async.bulk) of 16 KB contiguous KV blocks, 2 per chunk.

Each block streams its own 8 MB (256 chunks of 32 KB) with at most `in flight` chunks outstanding, a consumer warp
releasing each chunk as it lands; the table gives the aggregate GB/s and the copy bandwidth of a device-to-device
copy in the same run. DECODE_NOTES session 16: the megakernel's attention streams the KV cache at ~2.5 TB/s at
batch 16 x 4k where the fused Triton kernel reaches ~4; this asks whether the copy kind sets that.

    python scripts/probe_kv_streaming.py --out probe.json      # needs nvcc and a Hopper GPU
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from cuda_probe import build_and_run

SOURCE = r"""
#include <cstdio>
#include <cstdint>
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#define STAGES 6
#define CHUNK 32768
#define BLOCK_BYTES 16384  // a KV block: 16 tokens x 8 heads x 64 dims x 2 bytes

__device__ __forceinline__ uint32_t sa(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile("{\n.reg .pred done;\nWAIT:\nmbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
               "@!done bra WAIT;\n}" ::"r"(sa(bar)), "r"(parity) : "memory");
}

__device__ __forceinline__ void tma_load_3d(char* dst, const CUtensorMap* map, int c0, int c1, int c2, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];"
      ::"r"(sa(dst)), "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(sa(bar)) : "memory");
}

template <int MODE>
__global__ void __launch_bounds__(64, 1) stream_kv(const __grid_constant__ CUtensorMap head_map,
                                                  const __grid_constant__ CUtensorMap block_map, const char* kv,
                                                  int chunks, int inflight) {
  extern __shared__ __align__(1024) char ring[];
  __shared__ __align__(8) uint64_t full[STAGES], empty[STAGES];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) {
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(sa(&full[s])));
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(sa(&empty[s])));
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (warp == 0) {
    // head-box: SM i reads head i % 8 of blocks [group * chunks * 16, ...), group = i / 8, 16 blocks per chunk;
    // block-box / bulk: SM i reads whole blocks [i * chunks * 2, ...), 2 per chunk.
    const int head = blockIdx.x % 8, group = blockIdx.x / 8;
    for (int k = 0; k < chunks; ++k) {
      const int s = k % STAGES;
      mbar_wait(&empty[s], ((k / STAGES) & 1) ^ 1);
      if (k >= inflight) mbar_wait(&full[(k - inflight) % STAGES], ((k - inflight) / STAGES) & 1);
      if (lane == 0)
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(sa(&full[s])), "r"(CHUNK)
                     : "memory");
      __syncwarp();
      char* dst = ring + s * CHUNK;
      if (MODE == 0 && lane < 16) {
        tma_load_3d(dst + lane * 2048, &head_map, 0, head, ((group * chunks + k) * 16 + lane) * 16, &full[s]);
      } else if (MODE == 1 && lane < 2) {
        tma_load_3d(dst + lane * BLOCK_BYTES, &block_map, 0, 0, ((blockIdx.x * chunks + k) * 2 + lane) * 16, &full[s]);
      } else if (MODE == 2 && lane < 2) {
        const char* src = kv + ((size_t)(blockIdx.x * chunks + k) * 2 + lane) * BLOCK_BYTES;
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                     ::"r"(sa(dst + lane * BLOCK_BYTES)), "l"(src), "r"(BLOCK_BYTES), "r"(sa(&full[s])) : "memory");
      }
    }
  } else if (lane == 0) {
    for (int k = 0; k < chunks; ++k) {
      const int s = k % STAGES;
      mbar_wait(&full[s], (k / STAGES) & 1);
      asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(sa(&empty[s])) : "memory");
    }
  }
}

static CUtensorMap encode(void* base, unsigned long long rows, unsigned heads_per_box) {
  static PFN_cuTensorMapEncodeTiled_v12000 encode_tiled = nullptr;
  if (!encode_tiled) {  // from the driver through the runtime: no -lcuda at link time
    cudaDriverEntryPointQueryResult found;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", (void**)&encode_tiled, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess || found != cudaDriverEntryPointSuccess) {
      fprintf(stderr, "cuTensorMapEncodeTiled not found\n");
      exit(1);
    }
  }
  CUtensorMap map;
  cuuint64_t dims[3] = {64, 8, rows};
  cuuint64_t strides[2] = {128, 1024};
  cuuint32_t box[3] = {64, heads_per_box, 16}, elem[3] = {1, 1, 1};
  CUresult r = encode_tiled(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, base, dims, strides, box, elem,
                                      CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE,
                                      CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) { fprintf(stderr, "cuTensorMapEncodeTiled failed: %d\n", (int)r); exit(1); }
  return map;
}

int main() {
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  const int chunks = 256;
  const size_t blocks = (size_t)((sms + 7) / 8) * chunks * 16 > (size_t)sms * chunks * 2
                            ? (size_t)((sms + 7) / 8) * chunks * 16 : (size_t)sms * chunks * 2;
  char* kv;
  if (cudaMalloc(&kv, blocks * BLOCK_BYTES) != cudaSuccess) { fprintf(stderr, "cudaMalloc failed\n"); return 1; }
  cudaMemset(kv, 1, blocks * BLOCK_BYTES);
  const CUtensorMap head_map = encode(kv, blocks * 16, 1), block_map = encode(kv, blocks * 16, 8);
  const int smem = STAGES * CHUNK;
  cudaFuncSetAttribute(stream_kv<0>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  cudaFuncSetAttribute(stream_kv<1>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  cudaFuncSetAttribute(stream_kv<2>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  cudaEvent_t a, b;
  cudaEventCreate(&a); cudaEventCreate(&b);
  // Copy bandwidth (read + write) of a device-to-device copy of 1 GB, for the ratio.
  char* dst; cudaMalloc(&dst, (size_t)1 << 30);
  float best = 1e9f, ms;
  for (int r = 0; r < 5; ++r) {
    cudaEventRecord(a); cudaMemcpy(dst, kv, (size_t)1 << 30, cudaMemcpyDeviceToDevice); cudaEventRecord(b);
    cudaEventSynchronize(b); cudaEventElapsedTime(&ms, a, b); if (ms < best) best = ms;
  }
  printf("copy %.1f\n", 2.0 * (1 << 30) / best / 1e6);
  const char* names[3] = {"head-box", "block-box", "bulk"};
  for (int inflight = 2; inflight <= 4; inflight += 2)
    for (int mode = 0; mode < 3; ++mode) {
      best = 1e9f;
      for (int r = 0; r < 5; ++r) {
        cudaEventRecord(a);
        if (mode == 0) stream_kv<0><<<sms, 64, smem>>>(head_map, block_map, kv, chunks, inflight);
        if (mode == 1) stream_kv<1><<<sms, 64, smem>>>(head_map, block_map, kv, chunks, inflight);
        if (mode == 2) stream_kv<2><<<sms, 64, smem>>>(head_map, block_map, kv, chunks, inflight);
        cudaEventRecord(b);
        cudaEventSynchronize(b); cudaEventElapsedTime(&ms, a, b); if (ms < best) best = ms;
      }
      const cudaError_t e = cudaGetLastError();
      if (e != cudaSuccess) { fprintf(stderr, "CUDA error: %s\n", cudaGetErrorString(e)); return 1; }
      printf("mode %s %d %.1f\n", names[mode], inflight, (double)sms * chunks * CHUNK / best / 1e6);
    }
  return 0;
}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the table here (JSON)")
    args = parser.parse_args()
    stdout = build_and_run(SOURCE, ("-arch=sm_90a", "-O3", "-std=c++17"))
    copy = float(re.search(r"^copy ([\d.]+)$", stdout, re.M).group(1))
    rows = [{"copy": kind, "in_flight": int(n), "gb_per_s": float(gbs)}
            for kind, n, gbs in re.findall(r"^mode (\S+) (\d+) ([\d.]+)$", stdout, re.M)]
    print(f"copy bandwidth {copy:.0f} GB/s (device-to-device, read + write)")
    print(f"{'copy':>10} {'in flight':>9} {'GB/s':>8} {'of copy':>8}")
    for r in rows:
        print(f"{r['copy']:>10} {r['in_flight']:>9} {r['gb_per_s']:8.0f} {r['gb_per_s'] / copy:8.2f}")
    if args.out:
        args.out.write_text(json.dumps({"copy_gb_per_s": copy, "rows": rows}, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
