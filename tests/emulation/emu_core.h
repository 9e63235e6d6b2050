// The core of the CPU emulators (metal_emu.h, cuda_emu.h): one threadgroup (CUDA:
// thread block) at a time, its threads as coroutines.
//
// Execution model: a threadgroup's threads are coroutines on one OS thread, switched
// at every point where Metal threads communicate: threadgroup_barrier,
// simdgroup_barrier, simd_shuffle*, simd_sum/max and simdgroup_multiply_accumulate.
// A simdgroup is 32 consecutive threads. Each collective checks that every thread it
// needs arrives at the same kind of collective (a divergent barrier is an error, not a
// hang), and a threadgroup whose threads all wait on each other is reported as a
// deadlock.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#if !defined(__x86_64__) && !defined(__aarch64__)
#include <ucontext.h>
#endif

namespace df_emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "emulator: %s\n", what);
  std::fflush(stderr);
  std::_Exit(3);
}

// ---------------------------------------------------------------- context switch
#if defined(__x86_64__) || defined(__aarch64__)
extern "C" void df_emu_switch(void** save_sp, void* next_sp);
#if defined(__x86_64__)
asm(R"(
.text
.globl df_emu_switch
.type df_emu_switch,@function
df_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size df_emu_switch,.-df_emu_switch
)");
#else
asm(R"(
.text
.globl df_emu_switch
.type df_emu_switch,%function
df_emu_switch:
  sub sp, sp, #176
  stp x19, x20, [sp, #0]
  stp x21, x22, [sp, #16]
  stp x23, x24, [sp, #32]
  stp x25, x26, [sp, #48]
  stp x27, x28, [sp, #64]
  stp x29, x30, [sp, #80]
  stp d8, d9, [sp, #96]
  stp d10, d11, [sp, #112]
  stp d12, d13, [sp, #128]
  stp d14, d15, [sp, #144]
  mov x9, sp
  str x9, [x0]
  mov sp, x1
  ldp x19, x20, [sp, #0]
  ldp x21, x22, [sp, #16]
  ldp x23, x24, [sp, #32]
  ldp x25, x26, [sp, #48]
  ldp x27, x28, [sp, #64]
  ldp x29, x30, [sp, #80]
  ldp d8, d9, [sp, #96]
  ldp d10, d11, [sp, #112]
  ldp d12, d13, [sp, #128]
  ldp d14, d15, [sp, #144]
  add sp, sp, #176
  ret
.size df_emu_switch,.-df_emu_switch
)");
#endif
#endif

struct Thread;
void thread_entry();

enum class Op : int { none, tg_barrier, simd_barrier, simd_exchange, simd_mma, ptx_ldmatrix, ptx_mma };

struct Thread {
  unsigned tid = 0;
  bool done = false;
  // waiting: resume once *wait_on != wait_value
  const unsigned long* wait_on = nullptr;
  unsigned long wait_value = 0;
#if defined(__x86_64__) || defined(__aarch64__)
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
  unsigned char* stack = nullptr;  // owned by the stack pool, reused across threadgroups
  // pending asynchronous copies: (dst, src, bytes, group); group -1 = not committed
  struct Copy {
    void* dst;
    const void* src;
    int bytes;
    long group;
  };
  std::vector<Copy> copies;
  long next_group = 0;
};

struct SimdGroup {
  Op op = Op::none;
  int width = 32;  // lanes present (fewer in the last simdgroup of a partial threadgroup)
  int arrived = 0;
  unsigned long gen = 0;
  double slot[32];
  double snap[32];
  void* mma_args[32][4];
};

struct Group {
  std::vector<Thread> threads;
  std::vector<SimdGroup> simd;
  unsigned n_threads = 0;
  int tg_arrived = 0;
  unsigned long tg_gen = 0;
  Thread* current = nullptr;
#if defined(__x86_64__) || defined(__aarch64__)
  void* sched_sp = nullptr;
#else
  ucontext_t sched_uc;
#endif
  void (*body)(unsigned tid) = nullptr;
};

inline Group*& group() {
  static Group* g = nullptr;
  return g;
}

inline Thread& self() {
  return *group()->current;
}

inline void yield_to_scheduler() {
  Group* g = group();
  Thread* t = g->current;
#if defined(__x86_64__) || defined(__aarch64__)
  df_emu_switch(&t->sp, g->sched_sp);
#else
  swapcontext(&t->uc, &g->sched_uc);
#endif
}

inline void wait_until_changed(const unsigned long* gen, unsigned long seen) {
  Thread& t = self();
  t.wait_on = gen;
  t.wait_value = seen;
  while (*gen == seen) {
    yield_to_scheduler();
  }
  t.wait_on = nullptr;
}

#if defined(__x86_64__) || defined(__aarch64__)
extern "C" inline void df_emu_trampoline() {
  thread_entry();
}
#endif

inline void thread_entry() {
  Group* g = group();
  Thread* t = g->current;
  g->body(t->tid);
  t->done = true;
  if (!t->copies.empty()) {
    fail("thread finished with asynchronous copies never waited for");
  }
  yield_to_scheduler();
  fail("finished thread resumed");
}

#if !defined(__x86_64__) && !defined(__aarch64__)
inline void uc_entry() {
  thread_entry();
}
#endif

// Runs one threadgroup of n_threads threads to completion.
inline void run_group(unsigned n_threads, void (*body)(unsigned)) {
  static Group g;
  // Stacks are reused across threadgroups and never cleared: a coroutine touches
  // only the top few pages of its stack.
  static std::vector<unsigned char*> stacks;
  const size_t stack_bytes = 256 * 1024;
  while (stacks.size() < n_threads) {
    stacks.push_back(new unsigned char[stack_bytes]);
  }
  g.threads.clear();
  g.threads.resize(n_threads);
  g.simd.assign((n_threads + 31) / 32, SimdGroup());
  for (unsigned s = 0; s < g.simd.size(); ++s) {
    g.simd[s].width = int(n_threads - 32 * s < 32 ? n_threads - 32 * s : 32);
  }
  g.n_threads = n_threads;
  g.tg_arrived = 0;
  g.body = body;
  group() = &g;
  for (unsigned i = 0; i < n_threads; ++i) {
    Thread& t = g.threads[i];
    t.tid = i;
    t.stack = stacks[i];
#if defined(__x86_64__)
    uintptr_t top = (reinterpret_cast<uintptr_t>(t.stack) + stack_bytes) & ~uintptr_t(15);
    void** sp = reinterpret_cast<void**>(top);
    *--sp = nullptr;  // fake return address of the trampoline
    *--sp = reinterpret_cast<void*>(&df_emu_trampoline);
    for (int r = 0; r < 6; ++r) *--sp = nullptr;  // rbp rbx r12-r15
    sp -= 1;                                        // mxcsr + x87 control word
    unsigned int csr[2];
    asm volatile("stmxcsr %0" : "=m"(csr[0]));
    asm volatile("fnstcw %0" : "=m"(csr[1]));
    std::memcpy(sp, csr, 8);
    t.sp = sp;
#elif defined(__aarch64__)
    uintptr_t top = (reinterpret_cast<uintptr_t>(t.stack) + stack_bytes) & ~uintptr_t(15);
    unsigned char* sp = reinterpret_cast<unsigned char*>(top) - 176;
    std::memset(sp, 0, 176);
    void* lr = reinterpret_cast<void*>(&df_emu_trampoline);
    std::memcpy(sp + 88, &lr, 8);  // x30
    t.sp = sp;
#else
    getcontext(&t.uc);
    t.uc.uc_stack.ss_sp = t.stack;
    t.uc.uc_stack.ss_size = stack_bytes;
    t.uc.uc_link = nullptr;
    makecontext(&t.uc, uc_entry, 0);
#endif
  }
  unsigned alive = n_threads;
  while (alive > 0) {
    bool progressed = false;
    for (unsigned i = 0; i < n_threads; ++i) {
      Thread& t = g.threads[i];
      if (t.done || (t.wait_on != nullptr && *t.wait_on == t.wait_value)) {
        continue;
      }
      g.current = &t;
#if defined(__x86_64__) || defined(__aarch64__)
      df_emu_switch(&g.sched_sp, t.sp);
#else
      swapcontext(&g.sched_uc, &t.uc);
#endif
      progressed = true;
      if (t.done) {
        --alive;
        if (g.tg_arrived > 0) {
          fail("a thread finished while others wait at threadgroup_barrier");
        }
        if (g.simd[t.tid / 32].arrived > 0) {
          fail("a thread finished while its simdgroup waits in a collective");
        }
      }
    }
    if (!progressed) {
      fail("deadlock: every thread of the threadgroup waits");
    }
  }
  group() = nullptr;
}

// Threadgroup barrier: every thread of the threadgroup must arrive.
inline void tg_barrier() {
  Group* g = group();
  const unsigned long seen = g->tg_gen;
  for (unsigned i = 0; i < g->n_threads; ++i) {
    const Thread& t = g->threads[i];
    if (t.done) {
      fail("threadgroup_barrier reached after some thread finished");
    }
  }
  if (++g->tg_arrived == int(g->n_threads)) {
    g->tg_arrived = 0;
    ++g->tg_gen;
    return;
  }
  // Another kind of collective pending in this thread's simdgroup means divergence.
  wait_until_changed(&g->tg_gen, seen);
}

// A simdgroup collective: every lane deposits `value` (and optional pointers); the
// last lane to arrive runs `complete`, then all lanes continue.
template <typename F>
inline void simd_collective(Op op, double value, void* p0, void* p1, void* p2, void* p3,
                            F complete) {
  Group* g = group();
  Thread& t = self();
  SimdGroup& sg = g->simd[t.tid / 32];
  const unsigned lane = t.tid % 32;
  if (sg.arrived == 0) {
    sg.op = op;
  } else if (sg.op != op) {
    fail("simdgroup lanes diverged: different collectives at the same time");
  }
  sg.slot[lane] = value;
  sg.mma_args[lane][0] = p0;
  sg.mma_args[lane][1] = p1;
  sg.mma_args[lane][2] = p2;
  sg.mma_args[lane][3] = p3;
  const unsigned long seen = sg.gen;
  if (++sg.arrived == sg.width) {
    if (op == Op::simd_mma && sg.width != 32) {
      fail("simdgroup matrix product in a partial simdgroup");
    }
    std::memcpy(sg.snap, sg.slot, sizeof(sg.slot));
    complete(sg);
    sg.arrived = 0;
    sg.op = Op::none;
    ++sg.gen;
    return;
  }
  wait_until_changed(&sg.gen, seen);
}

inline unsigned lane_id() {
  return self().tid % 32;
}

// Asynchronous copies (used through DF_ASYNC_HOOKS): data moves only at a wait, so a
// read of threadgroup memory before the wait sees stale data.
inline void async_copy(void* dst, const void* src, int bytes) {
  self().copies.push_back({dst, src, bytes, -1});
}
inline void async_commit() {
  Thread& t = self();
  for (auto& c : t.copies) {
    if (c.group < 0) c.group = t.next_group;
  }
  ++t.next_group;
}
inline void async_wait(int keep) {
  Thread& t = self();
  const long limit = t.next_group - keep;  // groups < limit must be complete
  std::vector<Thread::Copy> rest;
  for (auto& c : t.copies) {
    if (c.group >= 0 && c.group < limit) {
      std::memcpy(c.dst, c.src, c.bytes);
    } else {
      rest.push_back(c);
    }
  }
  t.copies.swap(rest);
}


// bfloat16 <-> float: round to nearest even (NaN stays NaN), as GPUs convert.
inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    return uint16_t((u >> 16) | 0x40u);
  }
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float bf16_bits_to_float(uint16_t b) {
  uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Register exchange within a simdgroup (Metal simd_shuffle_xor, CUDA __shfl_xor_sync).
template <typename T>
inline T shuffle_xor(T x, unsigned mask) {
  const unsigned lane = lane_id();
  simd_collective(Op::simd_exchange, double(x), nullptr, nullptr, nullptr, nullptr,
                  [](SimdGroup&) {});
  return T(group()->simd[self().tid / 32].snap[(lane ^ mask) & 31u]);
}

inline void simd_barrier() {
  simd_collective(Op::simd_barrier, 0.0, nullptr, nullptr, nullptr, nullptr, [](SimdGroup&) {});
}

}  // namespace df_emu
