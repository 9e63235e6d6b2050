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
