// The CUDA names a warp-wide device function uses, on the host: the 32 lanes run as cooperative contexts in one
// thread, switched round robin at every warp-wide exchange (shuffles, ballots), so code with warp-uniform control
// flow runs as on a GPU. For checking such functions against their Python reference in CI (no GPU there).
#pragma once
#include <ucontext.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <functional>
#include <vector>

#define __device__
#define __forceinline__ inline
using std::max;
using std::min;

struct Dim {
  unsigned x;
};
static Dim threadIdx;  // the running lane's (set at each switch)
static Dim gridDim;

namespace warp {
static ucontext_t lanes[32], caller;
static int running = 0;
static long long exchange[32];

// Every lane reaches this point before any goes on (all lanes run the same exchanges: warp-uniform code).
inline void converge() {
  const int me = running, next = (me + 1) % 32;
  running = next;
  threadIdx.x = next;
  swapcontext(&lanes[me], &lanes[next]);
  threadIdx.x = me;
  running = me;
}

// Runs body(lane) as the 32 lanes of one warp; returns once lane 0 has returned.
inline void run(const std::function<void(int)>& body) {
  static std::vector<char> stacks(32 * (256 << 10));
  static const std::function<void(int)>* current;
  current = &body;
  for (int lane = 0; lane < 32; ++lane) {
    getcontext(&lanes[lane]);
    lanes[lane].uc_stack.ss_sp = stacks.data() + lane * (256 << 10);
    lanes[lane].uc_stack.ss_size = 256 << 10;
    lanes[lane].uc_link = &caller;
    makecontext(&lanes[lane], (void (*)())+[] {
      const int lane = running;
      (*current)(lane);
      converge();  // the last exchange: lane 0 resumes after it, returns to the caller; the rest stay parked
    }, 0);
  }
  running = 0;
  threadIdx.x = 0;
  swapcontext(&caller, &lanes[0]);
}
}  // namespace warp

template <class T>
T __shfl_sync(unsigned, T v, int src) {
  const int me = threadIdx.x;
  warp::exchange[me] = (long long)v;
  warp::converge();
  const T r = (T)warp::exchange[src & 31];
  warp::converge();
  return r;
}

template <class T>
T __shfl_xor_sync(unsigned mask, T v, int off) {
  return __shfl_sync(mask, v, (int)threadIdx.x ^ off);
}

inline unsigned __ballot_sync(unsigned, bool pred) {
  const int me = threadIdx.x;
  warp::exchange[me] = pred;
  warp::converge();
  unsigned bits = 0;
  for (int j = 0; j < 32; ++j) bits |= (unsigned)(warp::exchange[j] != 0) << j;
  warp::converge();
  return bits;
}

inline int __clz(unsigned x) { return x ? __builtin_clz(x) : 32; }
