// Block attention: the CUDA prelude (compiled by NVRTC through mx.fast.cuda_kernel,
// which already includes cuda_bf16.h, cuda_fp16.h and cooperative_groups.h).
//
// Same names and meanings as prelude_metal.h. The matrix product is one
// mma.sync.m16n8k16 (bf16 / fp16 operands, fp32 accumulation) or, for fp32 inputs,
// three tf32 m16n8k8 products per 8-wide k step on a big + small split of each
// operand (error near fp32's). The C fragment is the PTX m16n8 accumulator layout:
// lane holds rows lane/4 and lane/4 + 8, columns 2 * (lane % 4) + {0, 1}; the lanes of
// one row differ in bits 0 and 1.

#define DF_TG
#define DF_DEV
#define DF_THR
#define DF_UNROLL _Pragma("unroll")
#define DF_NEG (-1.0e30f)

typedef long long df_i64;
typedef unsigned char df_byte;

__device__ __forceinline__ void df_barrier() {
  __syncthreads();
}

__device__ __forceinline__ void df_simd_barrier() {
  __syncwarp();
}

__device__ __forceinline__ float df_exp2(float x) {
  return exp2f(x);
}

__device__ __forceinline__ float df_log2(float x) {
  return log2f(x);
}

__device__ __forceinline__ float df_fmax(float a, float b) {
  return fmaxf(a, b);
}

__device__ __forceinline__ float df_row_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float df_row_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

__device__ __forceinline__ float df_lane_sum(float x) {
  for (int m = 16; m > 0; m >>= 1) {
    x += __shfl_xor_sync(0xffffffffu, x, m);
  }
  return x;
}

__device__ __forceinline__ float df_rsqrt(float x) {
  return rsqrtf(x);
}

__device__ __forceinline__ float df_cos(float x) {
  return cosf(x);
}

__device__ __forceinline__ float df_sin(float x) {
  return sinf(x);
}

__device__ __forceinline__ float df_to_float(float x) {
  return x;
}
__device__ __forceinline__ float df_to_float(__half x) {
  return __half2float(x);
}
__device__ __forceinline__ float df_to_float(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T>
__device__ __forceinline__ T df_from_float(float x);
template <>
__device__ __forceinline__ float df_from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half df_from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 df_from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// @section tiles: copies and matrix fragments (block attention, matmul)
template <typename T>
__device__ __forceinline__ bool df_aligned16(const T* p) {
  return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0;
}

template <typename T>
__device__ __forceinline__ void df_copy16(T* dst, const T* src) {
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
}

__device__ __forceinline__ unsigned df_smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// Each PTX instruction the prelude uses sits in one wrapper, so that a CPU emulation
// of the instruction (tests/emulation/cuda_emu.h, from the PTX ISA's fragment
// layouts) can stand in for it while everything else here compiles unchanged.
#ifndef DF_PTX_EMULATED
__device__ __forceinline__ void df_ptx_cp_async16(unsigned dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void df_ptx_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
__device__ __forceinline__ void df_ptx_wait1() {
  asm volatile("cp.async.wait_group 1;\n" ::: "memory");
}
__device__ __forceinline__ void df_ptx_wait0() {
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}
__device__ __forceinline__ void df_ptx_ldmatrix_x4(unsigned* r, unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void df_ptx_ldmatrix_x2(unsigned* r, unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(addr));
}
__device__ __forceinline__ void df_ptx_ldmatrix_x2_trans(unsigned* r, unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(addr));
}
__device__ __forceinline__ void df_ptx_mma_bf16(float* c, const unsigned* a, const unsigned* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void df_ptx_mma_f16(float* c, const unsigned* a, const unsigned* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void df_ptx_mma_tf32(float* c, const unsigned* a, const unsigned* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ unsigned df_ptx_cvt_tf32(float x) {
  unsigned r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
}
#endif

template <typename T>
__device__ __forceinline__ void df_copy16_async(T* dst, const T* src) {
  df_ptx_cp_async16(df_smem_addr(dst), src);
}
__device__ __forceinline__ void df_async_commit() {
  df_ptx_commit();
}
__device__ __forceinline__ void df_async_wait1() {
  df_ptx_wait1();
}
__device__ __forceinline__ void df_async_wait0() {
  df_ptx_wait0();
}

__device__ __forceinline__ int df_c_row(unsigned lane, int r) {
  return int(lane >> 2) + 8 * r;
}

__device__ __forceinline__ int df_c_col(unsigned lane, int j) {
  return int(lane & 3u) * 2 + j;
}

// 16-bit operands: A in 4 registers, B in 2 (PTX m16n8k16 fragment layouts).
// fp32 operands: the raw values, split into tf32 big + small parts at the product.
template <typename T>
struct df_frag_a {
  unsigned x[4];
};
template <>
struct df_frag_a<float> {
  float x[8];  // [k half][a0..a3 of m16n8k8.tf32]
};

template <typename T>
struct df_frag_b {
  unsigned x[2];
};
template <>
struct df_frag_b<float> {
  float x[4];  // [k half][b0, b1 of m16n8k8.tf32]
};

struct df_frag_c {
  float x[4];
};

#define DF_C(c, r, j) ((c).x[(r) * 2 + (j)])

__device__ __forceinline__ void df_frag_zero(df_frag_c& c) {
  c.x[0] = c.x[1] = c.x[2] = c.x[3] = 0.0f;
}

__device__ __forceinline__ unsigned df_pack2(const void* lo, const void* hi) {
  return unsigned(*reinterpret_cast<const unsigned short*>(lo)) |
      (unsigned(*reinterpret_cast<const unsigned short*>(hi)) << 16);
}

// A: 16 rows x 16 k, row-major at p with row stride ld.
template <typename T>
__device__ __forceinline__ void df_load_a(df_frag_a<T>& a, const T* p, int ld, unsigned lane) {
#ifdef DF_NO_LDMATRIX
  const int g = lane >> 2, t = (lane & 3) * 2;
  a.x[0] = *reinterpret_cast<const unsigned*>(p + g * ld + t);
  a.x[1] = *reinterpret_cast<const unsigned*>(p + (g + 8) * ld + t);
  a.x[2] = *reinterpret_cast<const unsigned*>(p + g * ld + t + 8);
  a.x[3] = *reinterpret_cast<const unsigned*>(p + (g + 8) * ld + t + 8);
#else
  df_ptx_ldmatrix_x4(a.x, df_smem_addr(p + (lane & 15) * ld + (lane >> 4) * 8));
#endif
}
template <>
__device__ __forceinline__ void df_load_a<float>(df_frag_a<float>& a, const float* p, int ld,
                                                 unsigned lane) {
  const int g = lane >> 2, t = lane & 3;
  DF_UNROLL for (int h = 0; h < 2; ++h) {
    a.x[4 * h + 0] = p[g * ld + 8 * h + t];
    a.x[4 * h + 1] = p[(g + 8) * ld + 8 * h + t];
    a.x[4 * h + 2] = p[g * ld + 8 * h + t + 4];
    a.x[4 * h + 3] = p[(g + 8) * ld + 8 * h + t + 4];
  }
}

// B[k][n] = p[n * ld + k]: 16 k x 8 n, stored n-major (rows of K).
template <typename T>
__device__ __forceinline__ void df_load_bt(df_frag_b<T>& b, const T* p, int ld, unsigned lane) {
#ifdef DF_NO_LDMATRIX
  const int g = lane >> 2, t = (lane & 3) * 2;
  b.x[0] = *reinterpret_cast<const unsigned*>(p + g * ld + t);
  b.x[1] = *reinterpret_cast<const unsigned*>(p + g * ld + t + 8);
#else
  df_ptx_ldmatrix_x2(b.x, df_smem_addr(p + (lane & 7) * ld + ((lane >> 3) & 1) * 8));
#endif
}
template <>
__device__ __forceinline__ void df_load_bt<float>(df_frag_b<float>& b, const float* p, int ld,
                                                  unsigned lane) {
  const int g = lane >> 2, t = lane & 3;
  DF_UNROLL for (int h = 0; h < 2; ++h) {
    b.x[2 * h + 0] = p[g * ld + 8 * h + t];
    b.x[2 * h + 1] = p[g * ld + 8 * h + t + 4];
  }
}

// B[k][n] = p[k * ld + n]: 16 k x 8 n, stored k-major (rows of V).
template <typename T>
__device__ __forceinline__ void df_load_b(df_frag_b<T>& b, const T* p, int ld, unsigned lane) {
#ifdef DF_NO_LDMATRIX
  const int g = lane >> 2, t = (lane & 3) * 2;
  b.x[0] = df_pack2(p + t * ld + g, p + (t + 1) * ld + g);
  b.x[1] = df_pack2(p + (t + 8) * ld + g, p + (t + 9) * ld + g);
#else
  df_ptx_ldmatrix_x2_trans(b.x, df_smem_addr(p + (lane & 15) * ld));
#endif
}
template <>
__device__ __forceinline__ void df_load_b<float>(df_frag_b<float>& b, const float* p, int ld,
                                                 unsigned lane) {
  const int g = lane >> 2, t = lane & 3;
  DF_UNROLL for (int h = 0; h < 2; ++h) {
    b.x[2 * h + 0] = p[(8 * h + t) * ld + g];
    b.x[2 * h + 1] = p[(8 * h + t + 4) * ld + g];
  }
}

// c += a * b
__device__ __forceinline__ void df_mma(df_frag_c& c, df_frag_a<__nv_bfloat16>& a,
                                       df_frag_b<__nv_bfloat16>& b) {
  df_ptx_mma_bf16(c.x, a.x, b.x);
}

__device__ __forceinline__ void df_mma(df_frag_c& c, df_frag_a<__half>& a, df_frag_b<__half>& b) {
  df_ptx_mma_f16(c.x, a.x, b.x);
}

__device__ __forceinline__ void df_mma(df_frag_c& c, df_frag_a<float>& a, df_frag_b<float>& b) {
  DF_UNROLL for (int h = 0; h < 2; ++h) {
    unsigned ab[4], as[4], bb[2], bs[2];
    DF_UNROLL for (int i = 0; i < 4; ++i) {
      ab[i] = df_ptx_cvt_tf32(a.x[4 * h + i]);
      as[i] = df_ptx_cvt_tf32(a.x[4 * h + i] - __uint_as_float(ab[i]));
    }
    DF_UNROLL for (int i = 0; i < 2; ++i) {
      bb[i] = df_ptx_cvt_tf32(b.x[2 * h + i]);
      bs[i] = df_ptx_cvt_tf32(b.x[2 * h + i] - __uint_as_float(bb[i]));
    }
    df_ptx_mma_tf32(c.x, as, bb);
    df_ptx_mma_tf32(c.x, ab, bs);
    df_ptx_mma_tf32(c.x, ab, bb);
  }
}

// @section matmul
// ---------------------------------------------------------------- skinny matmul
// Only the matmul kernels take this section (source.prelude(backend, "matmul")).
// (matmul_body.h) Lane (g, t) = (lane / 4, lane % 4) reads piece t (PL consecutive k)
// of W rows g and g + 8 and of x row g of each 8-row fragment. For the 16-k step h, its
// fragment slots s = 0..3 hold piece elements 4 h + s. They stand for the logical k that
// the mma layout gives the lane: 2 t + s % 2 + 8 (s / 2) (m16n8k16), t + 4 s (the two
// tf32 m16n8k8 halves). A and B use the same map, so the products are the same sum.

#define DF_ALIGN16 __align__(16)

__device__ __forceinline__ int df_mm_row(unsigned lane) {
  return int(lane >> 2);
}

__device__ __forceinline__ int df_mm_part(unsigned lane) {
  return int(lane & 3u);
}

#ifndef DF_PTX_EMULATED
// Weights are read once: streaming loads (evict first) leave the caches to x.
__device__ __forceinline__ uint4 df_ld16_stream(const void* p) {
  uint4 v;
  asm volatile("ld.global.cs.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}
__device__ __forceinline__ uint4 df_ld16_cached(const void* p) {
  return *reinterpret_cast<const uint4*>(p);
}
__device__ __forceinline__ unsigned df_ptx_fma_bf16x2(unsigned a, unsigned b, unsigned c) {
  unsigned d;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}
__device__ __forceinline__ unsigned df_ptx_fma_f16x2(unsigned a, unsigned b, unsigned c) {
  unsigned d;
  asm("fma.rn.f16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}
#endif

// PL elements of a weight row; `valid` of them exist (the rest read as zero).
template <int PL, typename T>
__device__ __forceinline__ void df_mm_load_piece(T* dst, const T* src, int valid, bool vec) {
  if (vec && valid >= PL) {
    DF_UNROLL for (int i = 0; i < int(PL * sizeof(T) / 16); ++i) {
      reinterpret_cast<uint4*>(dst)[i] = df_ld16_stream(src + i * int(16 / sizeof(T)));
    }
  } else {
    DF_UNROLL for (int e = 0; e < PL; ++e) {
      dst[e] = e < valid ? src[e] : df_from_float<T>(0.0f);
    }
  }
}

// Four packed words of a quantized weight row (zeros when !valid).
__device__ __forceinline__ void df_mm_load_words(unsigned* dst, const unsigned* src, bool valid,
                                                 bool vec) {
  if (valid && vec) {
    const uint4 v = df_ld16_stream(src);
    dst[0] = v.x;
    dst[1] = v.y;
    dst[2] = v.z;
    dst[3] = v.w;
  } else {
    DF_UNROLL for (int i = 0; i < 4; ++i) {
      dst[i] = valid ? src[i] : 0u;
    }
  }
}

// A operand of one 16-k step from the four slots of rows g (lo) and g + 8 (hi).
template <typename T>
__device__ __forceinline__ void df_mm_a(df_frag_a<T>& a, const T* lo, const T* hi) {
  a.x[0] = df_pack2(lo, lo + 1);
  a.x[1] = df_pack2(hi, hi + 1);
  a.x[2] = df_pack2(lo + 2, lo + 3);
  a.x[3] = df_pack2(hi + 2, hi + 3);
}
__device__ __forceinline__ void df_mm_a(df_frag_a<float>& a, const float* lo, const float* hi) {
  DF_UNROLL for (int h = 0; h < 2; ++h) {
    a.x[4 * h + 0] = lo[2 * h];
    a.x[4 * h + 1] = hi[2 * h];
    a.x[4 * h + 2] = lo[2 * h + 1];
    a.x[4 * h + 3] = hi[2 * h + 1];
  }
}

// The lane's piece of one x row (the B operand of NSTEP steps).
template <typename T, int NSTEP>
struct df_mm_x {
  DF_ALIGN16 T v[4 * NSTEP];
};

template <typename T, int NSTEP>
__device__ __forceinline__ void df_mm_load_x(df_mm_x<T, NSTEP>& xr, const T* x, int K, int M,
                                             int m0, int kc, int ke, bool vec, unsigned lane) {
  constexpr int L = 4 * NSTEP;
  const int m = m0 + int(lane >> 2);
  const int k = kc + int(lane & 3u) * L;
  const int valid = m < M ? ke - k : 0;
  const T* src = x + df_i64(m) * K + k;
  if (vec && valid >= L) {
    DF_UNROLL for (int i = 0; i < int(L * sizeof(T) / 16); ++i) {
      reinterpret_cast<uint4*>(xr.v)[i] = df_ld16_cached(src + i * int(16 / sizeof(T)));
    }
  } else {
    DF_UNROLL for (int e = 0; e < L; ++e) {
      xr.v[e] = e < valid ? src[e] : df_from_float<T>(0.0f);
    }
  }
}

template <typename T, int BITS>
__device__ __forceinline__ constexpr bool df_mm_packed();

// B operand of step h; BITS: the weights' map (df_mm_dequant), 0 when dense.
template <int BITS, typename T, int NSTEP>
__device__ __forceinline__ void df_mm_b(df_frag_b<T>& b, const df_mm_x<T, NSTEP>& xr, int h) {
  if constexpr (df_mm_packed<T, BITS>()) {
    const int e = BITS == 4 ? 8 * (h >> 1) + 2 * (h & 1) : 4 * h;
    constexpr int D2 = BITS == 4 ? 4 : 2;
    b.x[0] = df_pack2(&xr.v[e], &xr.v[e + D2]);
    b.x[1] = df_pack2(&xr.v[e + 1], &xr.v[e + 1 + D2]);
  } else {
    b.x[0] = df_pack2(&xr.v[4 * h], &xr.v[4 * h + 1]);
    b.x[1] = df_pack2(&xr.v[4 * h + 2], &xr.v[4 * h + 3]);
  }
}
template <int BITS, int NSTEP>
__device__ __forceinline__ void df_mm_b(df_frag_b<float>& b, const df_mm_x<float, NSTEP>& xr,
                                        int h) {
  DF_UNROLL for (int i = 0; i < 4; ++i) {
    b.x[i] = xr.v[4 * h + i];
  }
}

// Quantized weights. Where T's 16-bit format holds q exactly next to a power of two
// (f16: 1024 + q for 4 and 8 bits; bf16: 128 + q for 4 bits), two weights are
// dequantized at once in packed 16-bit maths: one logic op puts q0 and q1 into the
// mantissas of (2^p + q0, 2^p + q1), an exact fma takes 2^p off, a second fma gives
// scale * q + bias rounded once to T. The pairs a mask can pick from one word are
// (nibble j, j + 4) / (byte j, j + 2), so there the slots of step h hold those pairs
// (df_mm_b reads x through the same map). Otherwise (fp32, bf16 8-bit): fp32 maths.
template <typename T>
struct df_mm_packed_math {
  static constexpr bool ok4 = false, ok8 = false;
};
template <>
struct df_mm_packed_math<__half> {
  static constexpr bool ok4 = true, ok8 = true;
  static constexpr unsigned magic = 0x64006400u, neg = 0xe400e400u, one = 0x3c003c00u;
  static __device__ __forceinline__ unsigned fma(unsigned a, unsigned b, unsigned c) {
    return df_ptx_fma_f16x2(a, b, c);
  }
};
template <>
struct df_mm_packed_math<__nv_bfloat16> {
  static constexpr bool ok4 = true, ok8 = false;
  static constexpr unsigned magic = 0x43004300u, neg = 0xc300c300u, one = 0x3f803f80u;
  static __device__ __forceinline__ unsigned fma(unsigned a, unsigned b, unsigned c) {
    return df_ptx_fma_bf16x2(a, b, c);
  }
};

template <typename T, int BITS>
__device__ __forceinline__ constexpr bool df_mm_packed() {
  return BITS == 4 ? df_mm_packed_math<T>::ok4 : (BITS == 8 ? df_mm_packed_math<T>::ok8 : false);
}

// A group's scale and bias for one row, as fp32 and as a T pair.
template <typename T>
struct df_mm_qs {
  float s, b;
  unsigned s2, b2;
};

template <typename T>
__device__ __forceinline__ df_mm_qs<T> df_mm_qscale(float s, float b) {
  df_mm_qs<T> q;
  q.s = s;
  q.b = b;
  q.s2 = q.b2 = 0u;
  if constexpr (sizeof(T) == 2) {
    const T ts = df_from_float<T>(s), tb = df_from_float<T>(b);
    q.s2 = df_pack2(&ts, &ts);
    q.b2 = df_pack2(&tb, &tb);
  }
  return q;
}

// A operand of step h from four packed words of rows g (lo) and g + 8 (hi).
template <int BITS, typename T>
__device__ __forceinline__ void df_mm_dequant(df_frag_a<T>& a, const unsigned* lo,
                                              const unsigned* hi, int h, const df_mm_qs<T>& ql,
                                              const df_mm_qs<T>& qh) {
  if constexpr (df_mm_packed<T, BITS>()) {
    using PM = df_mm_packed_math<T>;
    constexpr unsigned PAIR = BITS == 4 ? 0x000f000fu : 0x00ff00ffu;
    const unsigned wl = BITS == 4 ? lo[h >> 1] >> (8 * (h & 1)) : lo[h];
    const unsigned wh = BITS == 4 ? hi[h >> 1] >> (8 * (h & 1)) : hi[h];
    a.x[0] = PM::fma(PM::fma((wl & PAIR) | PM::magic, PM::one, PM::neg), ql.s2, ql.b2);
    a.x[1] = PM::fma(PM::fma((wh & PAIR) | PM::magic, PM::one, PM::neg), qh.s2, qh.b2);
    a.x[2] = PM::fma(PM::fma(((wl >> BITS) & PAIR) | PM::magic, PM::one, PM::neg), ql.s2, ql.b2);
    a.x[3] = PM::fma(PM::fma(((wh >> BITS) & PAIR) | PM::magic, PM::one, PM::neg), qh.s2, qh.b2);
  } else {
    constexpr int EPW = 32 / BITS;
    constexpr unsigned MASK = (1u << BITS) - 1u;
    T vl[4], vh[4];
    DF_UNROLL for (int s = 0; s < 4; ++s) {
      const int e = 4 * h + s;
      const int sh = BITS * (e % EPW);
      // q as a float without an int conversion: 2^23 + q has q in its mantissa.
      const float fl = __uint_as_float(0x4b000000u | ((lo[e / EPW] >> sh) & MASK)) - 8388608.0f;
      const float fh = __uint_as_float(0x4b000000u | ((hi[e / EPW] >> sh) & MASK)) - 8388608.0f;
      vl[s] = df_from_float<T>(fl * ql.s + ql.b);
      vh[s] = df_from_float<T>(fh * qh.s + qh.b);
    }
    df_mm_a(a, vl, vh);
  }
}
