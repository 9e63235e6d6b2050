// Skinny matmul: y[m][n] = sum_k x[m][k] * W[n][k] for M <= 32 rows of x (a verify
// block), reading each weight once for all rows. The body is shared by Metal, CUDA and
// the CPU emulator; DF_MM_PASS selects pass 1 (the products) or pass 2 (the split-K sum).
//
// Pass 1: a simdgroup owns RT tiles of 16 rows of W (16 RT outputs n) and walks its
// part of a split's K range in chunks of KC = 4 * PL: lane (g, t) = (df_mm_row,
// df_mm_part) reads PL consecutive k of rows g and g + 8 of each tile, 16 bytes of W
// per row (PL = 8 bf16/f16, 4 fp32, 32 4-bit or 16 8-bit weights), UNROLL chunks in
// flight. The product runs on the matrix
// units with W as the 16-row A operand and x^T as the 8-column B operand (one per 8 rows
// of x), fp32 accumulation. Which k of its piece a lane's fragment slots hold is the
// prelude's business (df_mm_a / df_mm_load_x / df_mm_b agree on it): any permutation of
// k gives the same sum. Quantized W (mx.quantize's affine layout: element e of a row in
// bits [BITS * (e % (32 / BITS)), ...) of word e / (32 / BITS), w = scale * q + bias per
// group of GS) is dequantized by the prelude (df_mm_dequant), which owns that map too.
//
// Names supplied around this body (kernels/matmul.py):
//   macros DF_MM_PASS (1 or 2), DF_MM_QUANT (0: W dense, of type T; 1: uint32 words)
//   template T (x, y), BITS (4 or 8; 0 when dense), GS, MF
//   (8-row fragments of x: ceil(M / 8)), NW (simdgroups along N per threadgroup), RT
//   (row tiles per simdgroup: each x fragment serves RT tiles), WK (simdgroups along K,
//   summed through threadgroup memory df_mm_red[SMEM_WORDS]), UNROLL,
//   SPLIT (pass 1 writes fp32 partials), HAS_BIAS
//   inputs x [M, K], w [N, K] or [N, K * BITS / 32], scales / biases [N, K / GS] (T;
//   one-element dummies when dense), bias [N] (dummy without HAS_BIAS), params int32
//   (M, N, K, k_split, nsplit)
//   outputs y [M, N] (T; any leading shape of M rows), part [nsplit, M, N] (fp32); the
//   unused one is a one-element dummy
//   df_lane, df_warp, df_tgx, df_tgy, df_gid, df_mm_red (from the entry); df_* / DF_*
//   (prelude)

const int M = params[0];
const int N = params[1];
const int K = params[2];
const int k_split = params[3];
const int nsplit = params[4];

#if DF_MM_PASS == 1

#if DF_MM_QUANT
constexpr int PL = 128 / BITS;  // 16 bytes of words
constexpr int EPW = 32 / BITS;  // weights per uint32 word
#else
constexpr int PL = int(16 / sizeof(T));
constexpr int EPW = 1;
#endif
constexpr int NSTEP = PL / 4;  // 16-k matrix steps per chunk
constexpr int KC = 4 * PL;     // k per chunk: 4 lanes side by side
static_assert(MF >= 1 && MF <= 4, "1..32 rows of x");

const int g = df_mm_row(df_lane);
const int t = df_mm_part(df_lane);
const int wr = int(df_warp) % NW;  // this simdgroup's rows among the NW row groups
const int wk = int(df_warp) / NW;  // its part of the split among WK simdgroups
const int n0 = (int(df_tgx) * NW + wr) * 16 * RT;
const int split = int(df_tgy);
const int sb = split * k_split;
const int se = sb + k_split < K ? sb + k_split : K;
// Simdgroups along K share this threadgroup's split in whole chunks: [kb, ke).
const int wchunks = ((se - sb + KC - 1) / KC + WK - 1) / WK;
const int kw0 = sb + wk * wchunks * KC;
const int kb = kw0 < se ? kw0 : se;
const int ke = kw0 + wchunks * KC < se ? kw0 + wchunks * KC : se;
// Rows of W (and x) start 16-byte aligned: the vector loads apply.
const bool vec_ok = K % PL == 0 && df_aligned16(w);
const bool x_vec = K % int(16 / sizeof(T)) == 0 && df_aligned16(x);
const int KW = K / EPW;  // row stride of w in its own elements
#if DF_MM_QUANT
const int KG = K / GS;  // row stride of scales / biases
#endif

// Row tile r of this simdgroup: lane rows n0 + 16 r + g (lo) and + 8 (hi).
df_frag_c c[RT][MF];
DF_UNROLL for (int r = 0; r < RT; ++r) {
  DF_UNROLL for (int f = 0; f < MF; ++f) {
    df_frag_zero(c[r][f]);
  }
}

if (n0 < N) {  // the whole simdgroup: collectives stay convergent
  for (int kc = kb; kc < ke; kc += UNROLL * KC) {
    // Issue every weight load of the UNROLL chunks first (the bytes that matter).
#if DF_MM_QUANT
    unsigned wlo[UNROLL][RT][4], whi[UNROLL][RT][4];
#else
    DF_ALIGN16 T wlo[UNROLL][RT][PL];
    DF_ALIGN16 T whi[UNROLL][RT][PL];
#endif
    DF_UNROLL for (int u = 0; u < UNROLL; ++u) {
      const int k = kc + u * KC + t * PL;
      DF_UNROLL for (int r = 0; r < RT; ++r) {
        const int nl = n0 + 16 * r + g;
        const int nh = nl + 8;
#if DF_MM_QUANT
        df_mm_load_words(wlo[u][r], w + df_i64(nl) * KW + k / EPW, nl < N && k < ke, vec_ok);
        df_mm_load_words(whi[u][r], w + df_i64(nh) * KW + k / EPW, nh < N && k < ke, vec_ok);
#else
        df_mm_load_piece<PL>(wlo[u][r], w + df_i64(nl) * KW + k, nl < N ? ke - k : 0, vec_ok);
        df_mm_load_piece<PL>(whi[u][r], w + df_i64(nh) * KW + k, nh < N ? ke - k : 0, vec_ok);
#endif
      }
    }
    DF_UNROLL for (int u = 0; u < UNROLL; ++u) {
      const int kcu = kc + u * KC;
      if (kcu < ke) {
        df_frag_a<T> a[RT][NSTEP];
        DF_UNROLL for (int r = 0; r < RT; ++r) {
#if DF_MM_QUANT
          const int k = kcu + t * PL;
          const int gi = k / GS;
          const int nl = n0 + 16 * r + g;
          const int nh = nl + 8;
          const bool lo_in = nl < N && k < ke;
          const bool hi_in = nh < N && k < ke;
          const df_mm_qs<T> q_lo = df_mm_qscale<T>(
              lo_in ? df_to_float(scales[df_i64(nl) * KG + gi]) : 0.0f,
              lo_in ? df_to_float(biases[df_i64(nl) * KG + gi]) : 0.0f);
          const df_mm_qs<T> q_hi = df_mm_qscale<T>(
              hi_in ? df_to_float(scales[df_i64(nh) * KG + gi]) : 0.0f,
              hi_in ? df_to_float(biases[df_i64(nh) * KG + gi]) : 0.0f);
          DF_UNROLL for (int h = 0; h < NSTEP; ++h) {
            df_mm_dequant<BITS>(a[r][h], wlo[u][r], whi[u][r], h, q_lo, q_hi);
          }
#else
          DF_UNROLL for (int h = 0; h < NSTEP; ++h) {
            df_mm_a(a[r][h], &wlo[u][r][4 * h], &whi[u][r][4 * h]);
          }
#endif
        }
        // Each x fragment is read once for the RT row tiles.
        DF_UNROLL for (int f = 0; f < MF; ++f) {
          df_mm_x<T, NSTEP> xr;
          df_mm_load_x(xr, x, K, M, 8 * f, kcu, ke, x_vec, df_lane);
          DF_UNROLL for (int h = 0; h < NSTEP; ++h) {
            df_frag_b<T> bf;
            df_mm_b<BITS>(bf, xr, h);
            DF_UNROLL for (int r = 0; r < RT; ++r) {
              df_mma(c[r][f], a[r][h], bf);
            }
          }
        }
      }
    }
  }
}

// Simdgroups along K: their sums meet in threadgroup memory, simdgroup wk = 0 adds them.
if (WK > 1) {
  constexpr int FR = RT * MF * 4;  // floats per lane
  if (wk > 0 && n0 < N) {
    DF_TG float* dst = df_mm_red + ((wk - 1) * NW + wr) * FR * 32 + int(df_lane);
    DF_UNROLL for (int r = 0; r < RT; ++r) {
      DF_UNROLL for (int f = 0; f < MF; ++f) {
        DF_UNROLL for (int e = 0; e < 4; ++e) {
          dst[((r * MF + f) * 4 + e) * 32] = DF_C(c[r][f], e >> 1, e & 1);
        }
      }
    }
  }
  df_barrier();
  if (wk == 0 && n0 < N) {
    for (int o = 1; o < WK; ++o) {
      const DF_TG float* src = df_mm_red + ((o - 1) * NW + wr) * FR * 32 + int(df_lane);
      DF_UNROLL for (int r = 0; r < RT; ++r) {
        DF_UNROLL for (int f = 0; f < MF; ++f) {
          DF_UNROLL for (int e = 0; e < 4; ++e) {
            DF_C(c[r][f], e >> 1, e & 1) += src[((r * MF + f) * 4 + e) * 32];
          }
        }
      }
    }
  }
}

// C fragment: element (i, j) of lane is output n0 + 16 r + df_c_row(lane, i), row
// 8 f + df_c_col(lane, j) of x.
if (n0 < N && wk == 0) {
  DF_UNROLL for (int r = 0; r < RT; ++r) {
    DF_UNROLL for (int f = 0; f < MF; ++f) {
      DF_UNROLL for (int i = 0; i < 2; ++i) {
        const int n = n0 + 16 * r + df_c_row(df_lane, i);
        DF_UNROLL for (int j = 0; j < 2; ++j) {
          const int m = 8 * f + df_c_col(df_lane, j);
          if (n < N && m < M) {
            const float v = DF_C(c[r][f], i, j);
            if (SPLIT) {
              part[(df_i64(split) * M + m) * N + n] = v;
            } else {
              const float bv = HAS_BIAS ? df_to_float(bias[n]) : 0.0f;
              y[df_i64(m) * N + n] = df_from_float<T>(v + bv);
            }
          }
        }
      }
    }
  }
}

#else  // pass 2: y[m][n] = sum over splits of part[s][m][n] (+ bias[n])

const int idx = int(df_gid);
if (idx < M * N) {
  const int n = idx % N;
  float acc = HAS_BIAS ? df_to_float(bias[n]) : 0.0f;
  for (int s = 0; s < nsplit; ++s) {
    acc += part[df_i64(s) * M * N + idx];
  }
  y[idx] = df_from_float<T>(acc);
}

#endif
