// Shared by the CPU kernels (lstm_cpu.cc, nearest_cpu.cc): splitting a call's work over
// XLA's intra-op thread pool without ever waiting on a task no thread has started.
#ifndef RQVAE_JAX_NATIVE_PARALLEL_H_
#define RQVAE_JAX_NATIVE_PARALLEL_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace rqvae_native {

// Runs fn(0) .. fn(n - 1), fn(k) for k >= 1 offered to XLA's intra-op pool. Whichever
// thread claims a task first runs it: after its own, the caller claims and runs every task
// no pool thread has started, then waits only for tasks already running. So a busy (or
// absent) pool never deadlocks the call, it only makes it serial.
template <typename Fn>
void run_in_parallel(xla::ffi::ThreadPool& pool, int64_t n, Fn fn) {
  struct Shared {
    explicit Shared(int64_t n) : claimed(n), done(n) {
      for (int64_t i = 0; i < n; ++i) {
        claimed[i].store(false);
        done[i].store(false);
      }
    }
    std::vector<std::atomic<bool>> claimed, done;
  };
  auto shared = std::make_shared<Shared>(n);
  for (int64_t k = 1; k < n; ++k) {
    pool.Schedule([shared, k, fn]() {
      if (!shared->claimed[k].exchange(true)) {
        fn(k);
        shared->done[k].store(true, std::memory_order_release);
      }
    });
  }
  fn(0);
  for (int64_t k = 1; k < n; ++k) {
    if (!shared->claimed[k].exchange(true)) {
      fn(k);
    } else {
      while (!shared->done[k].load(std::memory_order_acquire)) std::this_thread::yield();
    }
  }
}

}  // namespace rqvae_native

#endif  // RQVAE_JAX_NATIVE_PARALLEL_H_
