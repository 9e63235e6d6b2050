// A CPU emulation of the parts of the Metal execution model that the block-attention
// kernel uses, so that the Metal prelude and the shared kernel body compile unchanged
// with g++ and run here. simdgroup_matrix<float, 8, 8> keeps, per lane, the two
// elements Metal gives to thread_elements(): row (lane & 16) / 4 + (lane / 2) % 4,
// columns (lane & 8) / 2 + 2 (lane & 1) + {0, 1}.
#pragma once

#include "emu_core.h"

// ------------------------------------------------------------------ Metal surface
typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef _Float16 half;
typedef half float16_t;

struct uint3 {
  uint x, y, z;
};

// bfloat16 with round-to-nearest-even conversion from float (as Metal's bfloat).
struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  bfloat16_t(float f) : bits(df_emu::float_to_bf16_bits(f)) {}
  operator float() const { return df_emu::bf16_bits_to_float(bits); }
};

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };

namespace metal {

template <typename T, int N>
struct vec {
  T v[N];
  T& operator[](int i) { return v[i]; }
  const T& operator[](int i) const { return v[i]; }
};

inline float exp2(float x) { return std::exp2(x); }
namespace precise {
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
}  // namespace precise
namespace fast {
inline float cos(float x) { return std::cos(x); }
inline float sin(float x) { return std::sin(x); }
}  // namespace fast
inline float log2(float x) { return std::log2(x); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline float min(float a, float b) { return std::fmin(a, b); }
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }

inline void threadgroup_barrier(mem_flags) {
  df_emu::tg_barrier();
}

inline void simdgroup_barrier(mem_flags) {
  df_emu::simd_barrier();
}

template <typename T>
inline T simd_shuffle_xor(T x, ushort mask) {
  return df_emu::shuffle_xor(x, mask);
}

template <typename T>
inline T simd_shuffle(T x, ushort src) {
  double out = 0.0;
  df_emu::simd_collective(df_emu::Op::simd_exchange, double(x), nullptr, nullptr, nullptr,
                          nullptr, [](df_emu::SimdGroup&) {});
  out = df_emu::group()->simd[df_emu::self().tid / 32].snap[src & 31u];
  return T(out);
}

template <typename T>
inline T simd_sum(T x) {
  df_emu::simd_collective(df_emu::Op::simd_exchange, double(x), nullptr, nullptr, nullptr,
                          nullptr, [](df_emu::SimdGroup&) {});
  const double* s = df_emu::group()->simd[df_emu::self().tid / 32].snap;
  T acc = T(0);
  for (int i = 0; i < 32; ++i) acc += T(s[i]);
  return acc;
}

template <typename T>
inline T simd_max(T x) {
  df_emu::simd_collective(df_emu::Op::simd_exchange, double(x), nullptr, nullptr, nullptr,
                          nullptr, [](df_emu::SimdGroup&) {});
  const double* s = df_emu::group()->simd[df_emu::self().tid / 32].snap;
  T acc = T(s[0]);
  for (int i = 1; i < 32; ++i) acc = T(s[i]) > acc ? T(s[i]) : acc;
  return acc;
}

template <typename T, int Cols, int Rows>
struct simdgroup_matrix {
  static_assert(Cols == 8 && Rows == 8, "emulated simdgroup_matrix is 8x8");
  vec<T, 2> elems;
  vec<T, 2>& thread_elements() { return elems; }
  const vec<T, 2>& thread_elements() const { return elems; }
};

inline int emu_row(unsigned lane) { return int((lane & 16u) >> 2) + int((lane >> 1) & 3u); }
inline int emu_col(unsigned lane) { return int((lane & 8u) >> 1) + int(lane & 1u) * 2; }

// d = a * b + c over the whole simdgroup.
template <typename T>
inline void simdgroup_multiply_accumulate(simdgroup_matrix<T, 8, 8>& d,
                                          const simdgroup_matrix<T, 8, 8>& a,
                                          const simdgroup_matrix<T, 8, 8>& b,
                                          const simdgroup_matrix<T, 8, 8>& c) {
  df_emu::simd_collective(
      df_emu::Op::simd_mma, 0.0, &d, const_cast<simdgroup_matrix<T, 8, 8>*>(&a),
      const_cast<simdgroup_matrix<T, 8, 8>*>(&b), const_cast<simdgroup_matrix<T, 8, 8>*>(&c),
      [](df_emu::SimdGroup& sg) {
        float A[8][8], B[8][8], C[8][8];
        for (unsigned l = 0; l < 32; ++l) {
          const int r = emu_row(l), c0 = emu_col(l);
          for (int j = 0; j < 2; ++j) {
            A[r][c0 + j] = float(static_cast<simdgroup_matrix<T, 8, 8>*>(sg.mma_args[l][1])->elems[j]);
            B[r][c0 + j] = float(static_cast<simdgroup_matrix<T, 8, 8>*>(sg.mma_args[l][2])->elems[j]);
            C[r][c0 + j] = float(static_cast<simdgroup_matrix<T, 8, 8>*>(sg.mma_args[l][3])->elems[j]);
          }
        }
        float Dm[8][8];
        for (int i = 0; i < 8; ++i) {
          for (int j = 0; j < 8; ++j) {
            float acc = C[i][j];
            for (int k = 0; k < 8; ++k) acc = std::fma(A[i][k], B[k][j], acc);
            Dm[i][j] = acc;
          }
        }
        for (unsigned l = 0; l < 32; ++l) {
          const int r = emu_row(l), c0 = emu_col(l);
          auto* dl = static_cast<simdgroup_matrix<T, 8, 8>*>(sg.mma_args[l][0]);
          for (int j = 0; j < 2; ++j) dl->elems[j] = T(Dm[r][c0 + j]);
        }
      });
}

}  // namespace metal

// Metal address-space and function qualifiers have no meaning here.
#define device
#define threadgroup
#define constant
#define thread
#define METAL_FUNC inline
