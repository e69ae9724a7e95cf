"""What a cold instruction cache costs on this GPU: straight-line code regions of 8-256 KB, each run three times by
one warp per SM sub-partition, cycles per instruction for the first (cold), second and third run; once on an idle
GPU and once while a streaming kernel keeps HBM busy. Prints a table and writes JSON.

The megakernel's text is ~170 KB; this tells whether its short phases could be losing their time to instruction
fetch (DECODE_NOTES, session 16: they are not, its hot path fits).

    python scripts/probe_instruction_fetch.py --out probe.json      # needs nvcc and a CUDA GPU
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from cuda_probe import build_and_run

SIZES = (512, 2048, 8192, 16384)  # instructions per region, 16 bytes each


def region(n: int) -> str:
    # Eight interleaved chains of dependent multiply-adds: ptxas can neither fold nor drop them.
    body = "\n".join(f'"mad.lo.u32 %{i % 8}, %{i % 8}, %{(i + 1) % 8}, %{(i + 3) % 8};\\n\\t"' for i in range(n))
    regs = ", ".join(f'"+r"(r[{k}])' for k in range(8))
    return f"__device__ __noinline__ void region_{n}(unsigned (&r)[8]) {{\n  asm volatile({body} : {regs});\n}}\n"


def source() -> str:
    cases = "\n".join(f"      case {j}: region_{n}(r); break;" for j, n in enumerate(SIZES))
    return "#include <cstdio>\n#include <cuda_runtime.h>\n" + "".join(region(n) for n in SIZES) + f"""
__global__ void stream(const float4* src, float4* dst, size_t n) {{
  float4 acc = make_float4(0, 0, 0, 0);
  for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {{
    const float4 v = __ldcs(src + i);
    acc.x += v.x; acc.y += v.y; acc.z += v.z; acc.w += v.w;
  }}
  if (acc.x == 12345.f) dst[0] = acc;
}}

__global__ void probe(long long* out, int which) {{
  unsigned r[8] = {{threadIdx.x, 1, 2, 3, 4, 5, 6, 7}};
  for (int k = 0; k < 3; ++k) {{
    __syncwarp();
    const long long t0 = clock64();
    switch (which) {{
{cases}
    }}
    __syncwarp();
    if ((threadIdx.x & 31) == 0) out[(blockIdx.x * 4 + (threadIdx.x >> 5)) * 3 + k] = clock64() - t0;
  }}
  if (r[0] == 0xFFFFFFFFu) out[0] = r[1] + r[2] + r[3] + r[4] + r[5] + r[6] + r[7];
}}

int main() {{
  const int sizes[] = {{{", ".join(map(str, SIZES))}}};
  const size_t n = (size_t)1 << 28;  // 4 GB: the stream outlasts every probe launch
  long long* out; float4 *src, *dst;
  cudaMalloc(&out, 16 * 3 * sizeof(long long)); cudaMalloc(&src, n * 16); cudaMalloc(&dst, 16);
  cudaMemset(src, 0, n * 16);
  cudaStream_t s1, s2;
  cudaStreamCreateWithFlags(&s1, cudaStreamNonBlocking); cudaStreamCreateWithFlags(&s2, cudaStreamNonBlocking);
  for (int busy = 0; busy < 2; ++busy)
    for (int j = 0; j < {len(SIZES)}; ++j) {{
      if (busy) {{
        stream<<<120, 1024, 0, s2>>>(src, dst, n);
        for (volatile int spin = 0; spin < 2000000; ++spin) {{}}
      }}
      probe<<<4, 128, 0, s1>>>(out, j);
      cudaDeviceSynchronize();
      long long h[16 * 3];
      cudaMemcpy(h, out, sizeof(h), cudaMemcpyDeviceToHost);
      double c[3] = {{0, 0, 0}};
      for (int w = 0; w < 16; ++w) for (int k = 0; k < 3; ++k) c[k] += h[w * 3 + k] / 16.0;
      printf("%d %d %.3f %.3f %.3f\\n", busy, sizes[j], c[0] / sizes[j], c[1] / sizes[j], c[2] / sizes[j]);
    }}
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) {{ fprintf(stderr, "CUDA error: %s\\n", cudaGetErrorString(e)); return 1; }}
  return 0;
}}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90a")
    parser.add_argument("--out", type=Path, help="write the table here (JSON)")
    args = parser.parse_args()
    stdout = build_and_run(source(), (f"-arch={args.arch}", "-O3"))
    rows = []
    for line in stdout.splitlines():
        if re.fullmatch(r"[01] \d+ [\d.]+ [\d.]+ [\d.]+", line):
            busy, n, *cycles = line.split()
            rows.append({"hbm_busy": busy == "1", "instructions": int(n), "kib": int(n) * 16 // 1024,
                         "cycles_per_instruction": [float(c) for c in cycles]})
    print(f"{'HBM':>5} {'region':>8} {'first':>7} {'second':>7} {'third':>7}   cycles per instruction")
    for r in rows:
        first, second, third = r["cycles_per_instruction"]
        print(f"{'busy' if r['hbm_busy'] else 'idle':>5} {r['kib']:>5} KB {first:7.2f} {second:7.2f} {third:7.2f}")
    if args.out:
        args.out.write_text(json.dumps({"arch": args.arch, "rows": rows}, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
