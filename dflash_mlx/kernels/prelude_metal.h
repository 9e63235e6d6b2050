// Block attention: the Metal prelude.
//
// The kernel bodies (block_attention_body.h, combine_body.h) are shared with the CUDA
// backend and the CPU emulator. They use only what a prelude defines:
//   address spaces  DF_TG (threadgroup memory), DF_DEV (device memory), DF_THR (thread)
//   DF_UNROLL, df_i64, df_byte
//   df_barrier()                 threadgroup-wide barrier over threadgroup memory
//   df_simd_barrier()            simdgroup-wide barrier over threadgroup memory
//   df_exp2, df_log2, df_fmax    fp32 math
//   df_row_max, df_row_sum       reduce over the lanes that hold one row of a C fragment
//   df_to_float, df_from_float   element conversions
//   df_aligned16, df_copy16, df_copy16_async, df_async_commit, df_async_wait1,
//   df_async_wait0               16-byte global -> threadgroup copies
//   df_frag_a/_b/_c, df_frag_zero, df_load_a, df_load_bt, df_load_b, df_mma, DF_C,
//   df_c_row, df_c_col           a 16x8 += 16x16 * 16x8 simdgroup matrix product with
//                                fp32 accumulation; the C fragment gives each lane the
//                                elements (df_c_row(lane, r), df_c_col(lane, j)),
//                                r, j in {0, 1}
//
// Here the product is built from 8x8 simdgroup_matrix<float> tiles; a lane's two
// thread_elements() of an 8x8 tile sit in one row, in adjacent columns (the layout
// MLX's steel kernels rely on), so the lanes holding one row differ in bits 0 and 3.

#include <metal_simdgroup>
#include <metal_simdgroup_matrix>
#include <metal_stdlib>

using namespace metal;

#define DF_TG threadgroup
#define DF_DEV device
#define DF_THR thread
#define DF_UNROLL _Pragma("clang loop unroll(full)")
#define DF_NEG (-1.0e30f)

typedef long df_i64;
typedef unsigned char df_byte;

inline void df_barrier() {
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

inline void df_simd_barrier() {
  simdgroup_barrier(mem_flags::mem_threadgroup);
}

inline float df_exp2(float x) {
  return metal::exp2(x);
}

inline float df_log2(float x) {
  return metal::log2(x);
}

inline float df_fmax(float a, float b) {
  return metal::max(a, b);
}

inline float df_row_max(float x) {
  x = metal::max(x, simd_shuffle_xor(x, ushort(1)));
  return metal::max(x, simd_shuffle_xor(x, ushort(8)));
}

inline float df_row_sum(float x) {
  x += simd_shuffle_xor(x, ushort(1));
  return x + simd_shuffle_xor(x, ushort(8));
}

template <typename T>
inline float df_to_float(T x) {
  return static_cast<float>(x);
}

template <typename T>
inline T df_from_float(float x) {
  return static_cast<T>(x);
}

// Element-wise copies: no alignment requirement, so every address qualifies.
template <typename T>
inline bool df_aligned16(const DF_DEV T* p) {
  return true;
}

template <typename T>
inline void df_copy16(DF_TG T* dst, const DF_DEV T* src) {
  DF_UNROLL for (int i = 0; i < int(16 / sizeof(T)); ++i) {
    dst[i] = src[i];
  }
}

#ifndef DF_ASYNC_HOOKS
// Metal has no asynchronous copy here: the copy completes at once.
template <typename T>
inline void df_copy16_async(DF_TG T* dst, const DF_DEV T* src) {
  df_copy16(dst, src);
}
inline void df_async_commit() {}
inline void df_async_wait1() {}
inline void df_async_wait0() {}
#endif

inline int df_c_row(uint lane, int r) {
  return int((lane & 16u) >> 2) + int((lane >> 1) & 3u) + 8 * r;
}

inline int df_c_col(uint lane, int j) {
  return int((lane & 8u) >> 1) + int(lane & 1u) * 2 + j;
}

template <typename T>
struct df_frag_a {
  simdgroup_matrix<float, 8, 8> m[2][2];  // [row half][k half]
};

template <typename T>
struct df_frag_b {
  simdgroup_matrix<float, 8, 8> m[2];  // [k half]
};

struct df_frag_c {
  simdgroup_matrix<float, 8, 8> m[2];  // [row half]
};

#define DF_C(c, r, j) ((c).m[(r)].thread_elements()[(j)])

inline void df_frag_zero(DF_THR df_frag_c& c) {
  DF_UNROLL for (int r = 0; r < 2; ++r) {
    c.m[r].thread_elements()[0] = 0.0f;
    c.m[r].thread_elements()[1] = 0.0f;
  }
}

// A: 16 rows x 16 k, row-major at p with row stride ld.
template <typename T>
inline void df_load_a(DF_THR df_frag_a<T>& a, const DF_TG T* p, int ld, uint lane) {
  const int r0 = df_c_row(lane, 0);
  const int c0 = df_c_col(lane, 0);
  DF_UNROLL for (int rh = 0; rh < 2; ++rh) {
    DF_UNROLL for (int kh = 0; kh < 2; ++kh) {
      const DF_TG T* src = p + (rh * 8 + r0) * ld + kh * 8 + c0;
      a.m[rh][kh].thread_elements()[0] = static_cast<float>(src[0]);
      a.m[rh][kh].thread_elements()[1] = static_cast<float>(src[1]);
    }
  }
}

// B[k][n] = p[n * ld + k]: 16 k x 8 n, stored n-major (rows of K).
template <typename T>
inline void df_load_bt(DF_THR df_frag_b<T>& b, const DF_TG T* p, int ld, uint lane) {
  const int k0 = df_c_row(lane, 0);
  const int n0 = df_c_col(lane, 0);
  DF_UNROLL for (int kh = 0; kh < 2; ++kh) {
    b.m[kh].thread_elements()[0] = static_cast<float>(p[n0 * ld + kh * 8 + k0]);
    b.m[kh].thread_elements()[1] = static_cast<float>(p[(n0 + 1) * ld + kh * 8 + k0]);
  }
}

// B[k][n] = p[k * ld + n]: 16 k x 8 n, stored k-major (rows of V).
template <typename T>
inline void df_load_b(DF_THR df_frag_b<T>& b, const DF_TG T* p, int ld, uint lane) {
  const int k0 = df_c_row(lane, 0);
  const int n0 = df_c_col(lane, 0);
  DF_UNROLL for (int kh = 0; kh < 2; ++kh) {
    const DF_TG T* src = p + (kh * 8 + k0) * ld + n0;
    b.m[kh].thread_elements()[0] = static_cast<float>(src[0]);
    b.m[kh].thread_elements()[1] = static_cast<float>(src[1]);
  }
}

// c += a * b
template <typename T>
inline void df_mma(DF_THR df_frag_c& c, DF_THR df_frag_a<T>& a, DF_THR df_frag_b<T>& b) {
  DF_UNROLL for (int rh = 0; rh < 2; ++rh) {
    DF_UNROLL for (int kh = 0; kh < 2; ++kh) {
      simdgroup_multiply_accumulate(c.m[rh], a.m[rh][kh], b.m[kh], c.m[rh]);
    }
  }
}
