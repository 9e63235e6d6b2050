// A CPU emulation of the CUDA surface the block-attention kernel uses, so that the
// CUDA prelude (with DF_PTX_EMULATED: each PTX instruction is one small wrapper) and
// the shared kernel body compile with g++ and run here.
//
// The PTX instructions are emulated from the PTX ISA's fragment layouts, with
// g = lane / 4 and t = lane % 4 (element pairs: the lower index in the low 16 bits):
//   mma.m16n8k16 (.bf16 / .f16):  A regs {(g, 2t..), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..)}
//                                 B regs {(k=2t.., n=g), (k=2t+8.., n=g)}
//   mma.m16n8k8 .tf32:            A {(g, t), (g+8, t), (g, t+4), (g+8, t+4)}, B {(t, g), (t+4, g)}
//   C/D (both):                   {(g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)}
//   ldmatrix.m8n8.x{2,4}[.trans]: lanes 8i..8i+7 give the row addresses of matrix i;
//                                 lane l gets (l/4, 2(l%4)..) of matrix i (.trans: of its
//                                 transpose) in register i
//   cp.async 16 bytes:            lands at the matching cp.async.wait_group
// Checks on top: shared addresses inside the block's dynamic shared memory, ldmatrix
// rows and cp.async operands 16-byte aligned.
#pragma once

#include <math.h>

#include "emu_core.h"

#define __device__
#define __global__
#define __host__
#define __forceinline__ inline
#define __grid_constant__
#define __align__(n) alignas(n)
#define DF_PTX_EMULATED

typedef _Float16 __half;

struct __nv_bfloat16 {
  uint16_t bits;
};

struct uint4 {
  unsigned x, y, z, w;
};

struct df_dim3 {
  unsigned x, y, z;
};

namespace df_emu_cuda {

inline df_dim3 g_block_idx, g_block_dim, g_grid_dim;
inline unsigned char* g_smem = nullptr;
inline size_t g_smem_bytes = 0;

inline df_dim3 thread_idx() {
  const unsigned tid = df_emu::self().tid;
  return df_dim3{tid % g_block_dim.x, (tid / g_block_dim.x) % g_block_dim.y,
                 tid / (g_block_dim.x * g_block_dim.y)};
}

inline unsigned char* shared_ptr(unsigned addr, unsigned bytes) {
  if (size_t(addr) + bytes > g_smem_bytes) {
    df_emu::fail("shared-memory access outside the block's dynamic shared memory");
  }
  return g_smem + addr;
}

inline float tf32_value(unsigned bits) {
  bits &= ~0x1fffu;  // the tensor cores read 19 bits of a tf32 operand
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float half_bits(uint16_t b) {
  __half h;
  std::memcpy(&h, &b, 2);
  return float(h);
}

template <bool BF16>
inline float b16(unsigned reg, int hi) {
  const uint16_t b = uint16_t(hi ? reg >> 16 : reg & 0xffffu);
  return BF16 ? df_emu::bf16_bits_to_float(b) : half_bits(b);
}

}  // namespace df_emu_cuda

#define threadIdx (df_emu_cuda::thread_idx())
#define blockIdx (df_emu_cuda::g_block_idx)
#define blockDim (df_emu_cuda::g_block_dim)
#define gridDim (df_emu_cuda::g_grid_dim)

inline float __half2float(__half h) { return float(h); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return df_emu::bf16_bits_to_float(b.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  return __nv_bfloat16{df_emu::float_to_bf16_bits(f)};
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

inline void __syncthreads() { df_emu::tg_barrier(); }
inline void __syncwarp(unsigned = 0xffffffffu) { df_emu::simd_barrier(); }

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask) {
  return df_emu::shuffle_xor(v, unsigned(lane_mask));
}

inline size_t __cvta_generic_to_shared(const void* p) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  if (c < df_emu_cuda::g_smem || c >= df_emu_cuda::g_smem + df_emu_cuda::g_smem_bytes) {
    df_emu::fail("__cvta_generic_to_shared of an address outside shared memory");
  }
  return size_t(c - df_emu_cuda::g_smem);
}

// ---------------------------------------------------------------- PTX instructions

inline void df_ptx_cp_async16(unsigned dst, const void* src) {
  if ((dst & 15u) || (reinterpret_cast<uintptr_t>(src) & 15u)) {
    df_emu::fail("cp.async with an operand that is not 16-byte aligned");
  }
  df_emu::async_copy(df_emu_cuda::shared_ptr(dst, 16), src, 16);
}
inline void df_ptx_commit() { df_emu::async_commit(); }
inline void df_ptx_wait1() { df_emu::async_wait(1); }
inline void df_ptx_wait0() { df_emu::async_wait(0); }

template <int N, bool TRANS>
inline void df_emu_ldmatrix(unsigned* r, unsigned addr) {
  df_emu::simd_collective(
      df_emu::Op::ptx_ldmatrix, double(addr), r, nullptr, nullptr, nullptr,
      [](df_emu::SimdGroup& sg) {
        if (sg.width != 32) df_emu::fail("ldmatrix in a partial warp");
        for (int i = 0; i < N; ++i) {
          uint16_t m[8][8];
          for (int row = 0; row < 8; ++row) {
            const unsigned a = unsigned(sg.snap[8 * i + row]);
            if (a & 15u) df_emu::fail("ldmatrix row address not 16-byte aligned");
            std::memcpy(m[row], df_emu_cuda::shared_ptr(a, 16), 16);
          }
          for (int l = 0; l < 32; ++l) {
            const int r0 = l / 4, c0 = 2 * (l % 4);
            const uint16_t lo = TRANS ? m[c0][r0] : m[r0][c0];
            const uint16_t hi = TRANS ? m[c0 + 1][r0] : m[r0][c0 + 1];
            static_cast<unsigned*>(sg.mma_args[l][0])[i] = unsigned(lo) | (unsigned(hi) << 16);
          }
        }
      });
}

inline void df_ptx_ldmatrix_x4(unsigned* r, unsigned addr) { df_emu_ldmatrix<4, false>(r, addr); }
inline void df_ptx_ldmatrix_x2(unsigned* r, unsigned addr) { df_emu_ldmatrix<2, false>(r, addr); }
inline void df_ptx_ldmatrix_x2_trans(unsigned* r, unsigned addr) {
  df_emu_ldmatrix<2, true>(r, addr);
}

// D = A B + C with fp32 accumulation; A [16 x K], B [K x 8].
template <int K, typename LoadA, typename LoadB>
inline void df_emu_mma(df_emu::SimdGroup& sg, LoadA load_a, LoadB load_b) {
  if (sg.width != 32) df_emu::fail("mma.sync in a partial warp");
  float A[16][16], B[16][8], C[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    const unsigned* a = static_cast<const unsigned*>(sg.mma_args[l][1]);
    const unsigned* b = static_cast<const unsigned*>(sg.mma_args[l][2]);
    const float* c = static_cast<const float*>(sg.mma_args[l][0]);
    load_a(A, a, g, t);
    load_b(B, b, g, t);
    C[g][2 * t] = c[0];
    C[g][2 * t + 1] = c[1];
    C[g + 8][2 * t] = c[2];
    C[g + 8][2 * t + 1] = c[3];
  }
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    float* d = static_cast<float*>(sg.mma_args[l][0]);
    const int rows[4] = {g, g, g + 8, g + 8};
    const int cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
    for (int e = 0; e < 4; ++e) {
      double acc = C[rows[e]][cols[e]];
      for (int k = 0; k < K; ++k) acc += double(A[rows[e]][k]) * double(B[k][cols[e]]);
      d[e] = float(acc);
    }
  }
}

template <bool BF16>
inline void df_emu_mma_k16(float* c, const unsigned* a, const unsigned* b) {
  df_emu::simd_collective(
      df_emu::Op::ptx_mma, 0.0, c, const_cast<unsigned*>(a), const_cast<unsigned*>(b), nullptr,
      [](df_emu::SimdGroup& sg) {
        using df_emu_cuda::b16;
        df_emu_mma<16>(
            sg,
            [](float (*A)[16], const unsigned* a, int g, int t) {
              for (int h = 0; h < 2; ++h) {
                A[g][2 * t + h] = b16<BF16>(a[0], h);
                A[g + 8][2 * t + h] = b16<BF16>(a[1], h);
                A[g][2 * t + 8 + h] = b16<BF16>(a[2], h);
                A[g + 8][2 * t + 8 + h] = b16<BF16>(a[3], h);
              }
            },
            [](float (*B)[8], const unsigned* b, int g, int t) {
              for (int h = 0; h < 2; ++h) {
                B[2 * t + h][g] = b16<BF16>(b[0], h);
                B[2 * t + 8 + h][g] = b16<BF16>(b[1], h);
              }
            });
      });
}

inline void df_ptx_mma_bf16(float* c, const unsigned* a, const unsigned* b) {
  df_emu_mma_k16<true>(c, a, b);
}
inline void df_ptx_mma_f16(float* c, const unsigned* a, const unsigned* b) {
  df_emu_mma_k16<false>(c, a, b);
}

inline void df_ptx_mma_tf32(float* c, const unsigned* a, const unsigned* b) {
  df_emu::simd_collective(
      df_emu::Op::ptx_mma, 0.0, c, const_cast<unsigned*>(a), const_cast<unsigned*>(b), nullptr,
      [](df_emu::SimdGroup& sg) {
        using df_emu_cuda::tf32_value;
        df_emu_mma<8>(
            sg,
            [](float (*A)[16], const unsigned* a, int g, int t) {
              A[g][t] = tf32_value(a[0]);
              A[g + 8][t] = tf32_value(a[1]);
              A[g][t + 4] = tf32_value(a[2]);
              A[g + 8][t + 4] = tf32_value(a[3]);
            },
            [](float (*B)[8], const unsigned* b, int g, int t) {
              B[t][g] = tf32_value(b[0]);
              B[t + 4][g] = tf32_value(b[1]);
            });
      });
}

// cvt.rna.tf32.f32: round the magnitude to 10 mantissa bits, ties away from zero.
inline unsigned df_ptx_cvt_tf32(float x) {
  unsigned u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7f800000u) == 0x7f800000u) return u;  // inf / NaN kept
  return (u + 0x1000u) & ~0x1fffu;
}

// 16-byte global loads (the skinny matmul's): must be 16-byte aligned on the device.
inline uint4 df_emu_ld16(const void* p) {
  if (reinterpret_cast<uintptr_t>(p) & 15u) df_emu::fail("16-byte global load not 16-byte aligned");
  uint4 v;
  std::memcpy(&v, p, 16);
  return v;
}
inline uint4 df_ld16_stream(const void* p) { return df_emu_ld16(p); }
inline uint4 df_ld16_cached(const void* p) { return df_emu_ld16(p); }

// fma.rn.{bf16x2,f16x2}: per 16-bit half, a * b + c rounded once to the format.
template <bool BF16>
inline unsigned df_emu_fma2(unsigned a, unsigned b, unsigned c) {
  unsigned d = 0;
  for (int h = 0; h < 2; ++h) {
    const double r = double(df_emu_cuda::b16<BF16>(a, h)) * double(df_emu_cuda::b16<BF16>(b, h)) +
                     double(df_emu_cuda::b16<BF16>(c, h));
    uint16_t bits;
    if (BF16) {
      bits = df_emu::float_to_bf16_bits(float(r));
    } else {
      const __half x = __half(r);
      std::memcpy(&bits, &x, 2);
    }
    d |= unsigned(bits) << (16 * h);
  }
  return d;
}
inline unsigned df_ptx_fma_bf16x2(unsigned a, unsigned b, unsigned c) {
  return df_emu_fma2<true>(a, b, c);
}
inline unsigned df_ptx_fma_f16x2(unsigned a, unsigned b, unsigned c) {
  return df_emu_fma2<false>(a, b, c);
}

namespace mlx::core::cu {
// Shapes and strides travel by value (cuda::std::array<.., MAX_NDIM> in MLX).
struct Shape {
  int32_t v[10];
  int32_t operator[](int i) const { return v[i]; }
};
struct Strides {
  int64_t v[10];
  int64_t operator[](int i) const { return v[i]; }
};
}  // namespace mlx::core::cu
