// The custom kernels: the Metal prelude.
//
// The kernel bodies (block_attention_body.h, combine_body.h, matmul_body.h, qkv_body.h) are
// shared with the CUDA backend and the CPU emulator. They use only what a prelude defines:
//   address spaces  DF_TG (threadgroup memory), DF_DEV (device memory), DF_THR (thread)
//   DF_UNROLL, df_i64, df_byte
//   df_barrier()                 threadgroup-wide barrier over threadgroup memory
//   df_simd_barrier()            simdgroup-wide barrier over threadgroup memory
//   df_exp2, df_log2, df_fmax    fp32 math
//   df_row_max, df_row_sum       reduce over the lanes that hold one row of a C fragment
//   df_lane_sum                  sum over the 32 lanes of a simdgroup
//   df_rsqrt, df_cos, df_sin     fp32 math as MLX's rms_norm and rope compute it
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

inline float df_lane_sum(float x) {
  return simd_sum(x);
}

inline float df_rsqrt(float x) {
  return metal::precise::rsqrt(x);
}

inline float df_cos(float x) {
  return metal::fast::cos(x);
}

inline float df_sin(float x) {
  return metal::fast::sin(x);
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
// @section tiles: copies and matrix fragments (block attention, matmul)
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

// @section matmul
// ---------------------------------------------------------------- skinny matmul
// Only the matmul kernels take this section (source.prelude(backend, "matmul")).
// (matmul_body.h) Lane (g, t) = (df_c_row(lane, 0), df_c_col(lane, 0) / 2) reads piece t
// (PL consecutive k) of W rows g and g + 8. For the 16-k step h its A slots s = 0..3
// hold piece elements 4 h + s, standing for logical k 2 t + s % 2 + 8 (s / 2) (the
// columns its thread_elements() cover). A lane's B elements (logical k r, r + 8 of x
// rows c0, c0 + 1) are fetched from wherever that map puts them, so A and B agree.
// Loads are element-wise: no alignment assumption about MLX's buffer offsets.

#define DF_ALIGN16

inline int df_mm_row(uint lane) {
  return df_c_row(lane, 0);
}

inline int df_mm_part(uint lane) {
  return df_c_col(lane, 0) / 2;
}

template <int PL, typename T>
inline void df_mm_load_piece(DF_THR T* dst, const DF_DEV T* src, int valid, bool vec) {
  DF_UNROLL for (int e = 0; e < PL; ++e) {
    dst[e] = e < valid ? src[e] : df_from_float<T>(0.0f);
  }
}

inline void df_mm_load_words(DF_THR uint* dst, const DF_DEV uint* src, bool valid, bool vec) {
  DF_UNROLL for (int i = 0; i < 4; ++i) {
    dst[i] = valid ? src[i] : 0u;
  }
}

template <typename T>
inline void df_mm_a(DF_THR df_frag_a<T>& a, const DF_THR T* lo, const DF_THR T* hi) {
  DF_UNROLL for (int kh = 0; kh < 2; ++kh) {
    DF_UNROLL for (int j = 0; j < 2; ++j) {
      a.m[0][kh].thread_elements()[j] = static_cast<float>(lo[2 * kh + j]);
      a.m[1][kh].thread_elements()[j] = static_cast<float>(hi[2 * kh + j]);
    }
  }
}

template <typename T, int NSTEP>
struct df_mm_x {
  T v[4 * NSTEP];  // [step][k half][column]
};

template <typename T, int NSTEP>
inline void df_mm_load_x(DF_THR df_mm_x<T, NSTEP>& xr, const DF_DEV T* x, int K, int M, int m0,
                         int kc, int ke, bool vec, uint lane) {
  constexpr int L = 4 * NSTEP;
  const int r = df_c_row(lane, 0);
  const int c = df_c_col(lane, 0);
  DF_UNROLL for (int h = 0; h < NSTEP; ++h) {
    DF_UNROLL for (int kh = 0; kh < 2; ++kh) {
      // logical k = 8 kh + r: piece r / 2, slot r % 2 + 2 kh
      const int k = kc + (r >> 1) * L + 4 * h + (r & 1) + 2 * kh;
      DF_UNROLL for (int j = 0; j < 2; ++j) {
        const int m = m0 + c + j;
        xr.v[4 * h + 2 * kh + j] =
            m < M && k < ke ? x[long(m) * K + k] : df_from_float<T>(0.0f);
      }
    }
  }
}

// B operand of step h (every weight format uses the same map here).
template <int BITS, typename T, int NSTEP>
inline void df_mm_b(DF_THR df_frag_b<T>& b, const DF_THR df_mm_x<T, NSTEP>& xr, int h) {
  DF_UNROLL for (int kh = 0; kh < 2; ++kh) {
    DF_UNROLL for (int j = 0; j < 2; ++j) {
      b.m[kh].thread_elements()[j] = static_cast<float>(xr.v[4 * h + 2 * kh + j]);
    }
  }
}

// Quantized weights: q * scale + bias in fp32, straight into the fp32 matrix tiles.
template <typename T>
struct df_mm_qs {
  float s, b;
};

template <typename T>
inline df_mm_qs<T> df_mm_qscale(float s, float b) {
  df_mm_qs<T> q;
  q.s = s;
  q.b = b;
  return q;
}

// A operand of step h from four packed words of rows g (lo) and g + 8 (hi).
template <int BITS, typename T>
inline void df_mm_dequant(DF_THR df_frag_a<T>& a, const DF_THR uint* lo, const DF_THR uint* hi,
                          int h, df_mm_qs<T> ql, df_mm_qs<T> qh) {
  constexpr int EPW = 32 / BITS;
  constexpr uint MASK = (1u << BITS) - 1u;
  DF_UNROLL for (int kh = 0; kh < 2; ++kh) {
    DF_UNROLL for (int j = 0; j < 2; ++j) {
      const int e = 4 * h + 2 * kh + j;
      const int sh = BITS * (e % EPW);
      a.m[0][kh].thread_elements()[j] = float((lo[e / EPW] >> sh) & MASK) * ql.s + ql.b;
      a.m[1][kh].thread_elements()[j] = float((hi[e / EPW] >> sh) & MASK) * qh.s + qh.b;
    }
  }
}
