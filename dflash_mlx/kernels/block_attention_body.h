// Block attention, pass 1: the kernel body shared by Metal, CUDA and the CPU emulator.
//
// One threadgroup = one (row block, KV split, batch * KV head). The row block holds
// 16 * WM rows of the Lq * G queries that share one KV head (row r = g * Lq + i: head
// g of the group, query i); simdgroup w owns rows [16 w, 16 w + 16). Every simdgroup
// reads each K/V tile from threadgroup memory, so all G query heads of a KV head share
// one load of it. Online softmax in base 2 with fp32 statistics and accumulators; P is
// rounded to T for the P.V product (the same as the matrix units' operands).
//
// Names supplied around this body (see kernels/source.py):
//   template constants T, D, BN (keys per tile), WM (simdgroups), NBUF (1 or 2 tile
//   buffers), SPLIT (write partials for the combine pass), SMEM_WORDS
//   inputs q [B, Hq, Lq, D], k / v [B, Hkv, S, D] (any strides: q_strides, k_strides,
//   v_strides), params (int32), fparams (float32)
//   outputs out [B, Lq, Hq, D] (T: heads last, the layout o_proj reads), opart [rows,
//   nsplit, D], lse [rows, nsplit] (fp32), rows in [B, Hq, Lq] order
//   df_tid, df_lane, df_warp, df_tgx, df_tgy, df_tgz, df_smem (from the entry)
//   everything named df_* / DF_* (from the prelude)

const int Lq = params[0];
const int G = params[1];
const int S = params[2];
const int Hkv = params[3];
const int nsplit = params[6];
const int causal = params[7];
const int window = params[8];  // 0: none
// First key any query can see. Computed from S here, not taken from the host (params[4]
// is its value for the buffer's length): with a device-side key count (static caches)
// the window moves with S, and a host value would put every key before it out of range.
const int kv_lo = window > 0 && S - Lq - window + 1 > 0 ? S - Lq - window + 1 : 0;
const float scale_log2 = fparams[0];
// Keys per split: the plan's, or (0) an even share of the keys the device says are
// there, in whole tiles: a static buffer's plan is made for its capacity, and splits
// sized for that would leave the splits past the valid keys idle.
const int split_len = params[5] > 0 ? params[5]
    : ((S - kv_lo + nsplit - 1) / nsplit + BN - 1) / BN * BN;

constexpr int VEC = int(16 / sizeof(T));  // elements per 16-byte copy
constexpr int LDK = D + VEC;              // padded row strides (bank-conflict free)
constexpr int BM = 16 * WM;
constexpr int NT = 32 * WM;
constexpr int LDP = BN + VEC;
constexpr int CHUNKS = D / VEC;
constexpr int SMEM_NEED = int(sizeof(T)) * (BM * LDK + 2 * NBUF * BN * LDK + WM * 16 * LDP);
static_assert(SMEM_NEED <= 4 * SMEM_WORDS, "threadgroup memory too small");
static_assert(D % 16 == 0 && BN % 16 == 0, "D and BN must be multiples of 16");

const int M = Lq * G;
const int Hq = Hkv * G;
const int row0 = int(df_tgx) * BM;
const int split = int(df_tgy);
const int bh = int(df_tgz);
const int b = bh / Hkv;
const int hk = bh - b * Hkv;

DF_TG T* qs = (DF_TG T*)(df_smem);
DF_TG T* ks = qs + BM * LDK;
DF_TG T* vs = ks + NBUF * BN * LDK;
DF_TG T* ps = vs + NBUF * BN * LDK + int(df_warp) * 16 * LDP;

// Queries of this row block -> threadgroup memory (zeros past the last row).
{
  const df_i64 s0 = q_strides[0], s1 = q_strides[1], s2 = q_strides[2], s3 = q_strides[3];
  const bool fast = s3 == 1 && s0 % VEC == 0 && s1 % VEC == 0 && s2 % VEC == 0 && df_aligned16(q);
  for (int c = int(df_tid); c < BM * CHUNKS; c += NT) {
    const int rl = c / CHUNKS;
    const int d0 = (c - rl * CHUNKS) * VEC;
    const int r = row0 + rl;
    DF_TG T* dst = qs + rl * LDK + d0;
    if (r < M) {
      const int g = r / Lq;
      const int i = r - g * Lq;
      const df_i64 off = df_i64(b) * s0 + df_i64(hk * G + g) * s1 + df_i64(i) * s2;
      if (fast) {
        df_copy16(dst, q + off + d0);
      } else {
        for (int e = 0; e < VEC; ++e) {
          dst[e] = q[off + df_i64(d0 + e) * s3];
        }
      }
    } else {
      for (int e = 0; e < VEC; ++e) {
        dst[e] = df_from_float<T>(0.0f);
      }
    }
  }
}

const df_i64 ks0 = k_strides[0], ks1 = k_strides[1], ks2 = k_strides[2], ks3 = k_strides[3];
const df_i64 vs0 = v_strides[0], vs1 = v_strides[1], vs2 = v_strides[2], vs3 = v_strides[3];
const df_i64 k_base = df_i64(b) * ks0 + df_i64(hk) * ks1;
const df_i64 v_base = df_i64(b) * vs0 + df_i64(hk) * vs1;
const bool kv_fast = ks3 == 1 && vs3 == 1 && ks0 % VEC == 0 && ks1 % VEC == 0 &&
    ks2 % VEC == 0 && vs0 % VEC == 0 && vs1 % VEC == 0 && vs2 % VEC == 0 && df_aligned16(k) &&
    df_aligned16(v);

const int k_begin = kv_lo + split * split_len;
const int k_end = k_begin + split_len < S ? k_begin + split_len : S;
const int n_tiles = k_end > k_begin ? (k_end - k_begin + BN - 1) / BN : 0;
const bool warp_active = row0 + int(df_warp) * 16 < M;

df_frag_c o[D / 8];
DF_UNROLL for (int n = 0; n < D / 8; ++n) {
  df_frag_zero(o[n]);
}
float m_i[2] = {DF_NEG, DF_NEG};
float l_i[2] = {0.0f, 0.0f};

// Software pipeline in two phases per tile t: "copy tile t into buffer t % NBUF" and
// "compute tile t - 1". With two buffers the copy of tile t is issued first and overlaps
// the compute of tile t - 1; with one buffer it waits until tile t - 1 is consumed.
for (int step = 0; step < 2 * (n_tiles + 1); ++step) {
  const int t = step >> 1;
  const bool copy_phase = (step & 1) == (NBUF == 2 ? 0 : 1);
  if (copy_phase) {
    if (t < n_tiles) {
      const int kt = k_begin + t * BN;
      DF_TG T* kd = ks + (t % NBUF) * BN * LDK;
      DF_TG T* vd = vs + (t % NBUF) * BN * LDK;
      for (int c = int(df_tid); c < BN * CHUNKS; c += NT) {
        const int kr = c / CHUNKS;
        const int d0 = (c - kr * CHUNKS) * VEC;
        const int key = kt + kr;
        DF_TG T* kdst = kd + kr * LDK + d0;
        DF_TG T* vdst = vd + kr * LDK + d0;
        if (key < k_end) {
          const df_i64 ko = k_base + df_i64(key) * ks2;
          const df_i64 vo = v_base + df_i64(key) * vs2;
          if (kv_fast) {
            df_copy16_async(kdst, k + ko + d0);
            df_copy16_async(vdst, v + vo + d0);
          } else {
            for (int e = 0; e < VEC; ++e) {
              kdst[e] = k[ko + df_i64(d0 + e) * ks3];
              vdst[e] = v[vo + df_i64(d0 + e) * vs3];
            }
          }
        } else {
          // Keys past the split: zeros, so that P = 0 never meets a stale NaN in V.
          for (int e = 0; e < VEC; ++e) {
            kdst[e] = df_from_float<T>(0.0f);
            vdst[e] = df_from_float<T>(0.0f);
          }
        }
      }
      df_async_commit();
    }
  } else if (t > 0) {
    if (NBUF == 2 && t < n_tiles) {
      df_async_wait1();
    } else {
      df_async_wait0();
    }
    df_barrier();
    const int tc = t - 1;
    const int k0 = k_begin + tc * BN;
    const DF_TG T* kb = ks + (tc % NBUF) * BN * LDK;
    const DF_TG T* vb = vs + (tc % NBUF) * BN * LDK;
    if (warp_active) {
      // S = Q K^T for this simdgroup's 16 rows and the tile's BN keys.
      df_frag_c s[BN / 8];
      DF_UNROLL for (int n = 0; n < BN / 8; ++n) {
        df_frag_zero(s[n]);
      }
      const DF_TG T* qw = qs + int(df_warp) * 16 * LDK;
      DF_UNROLL for (int kk = 0; kk < D / 16; ++kk) {
        df_frag_a<T> a;
        df_load_a(a, qw + kk * 16, LDK, df_lane);
        DF_UNROLL for (int n = 0; n < BN / 8; ++n) {
          df_frag_b<T> bf;
          df_load_bt(bf, kb + n * 8 * LDK + kk * 16, LDK, df_lane);
          df_mma(s[n], a, bf);
        }
      }
      // Mask, online softmax; P -> this simdgroup's slice of threadgroup memory.
      DF_UNROLL for (int r = 0; r < 2; ++r) {
        const int rw = df_c_row(df_lane, r);
        const int row = row0 + int(df_warp) * 16 + rw;
        const int qpos = S - Lq + (row % Lq);
        const bool row_ok = row < M;
        float mx = DF_NEG;
        DF_UNROLL for (int n = 0; n < BN / 8; ++n) {
          DF_UNROLL for (int j = 0; j < 2; ++j) {
            const int key = k0 + n * 8 + df_c_col(df_lane, j);
            const bool vis = row_ok && key < k_end && (causal == 0 || key <= qpos) &&
                (window == 0 || key > qpos - window);
            const float sv = vis ? DF_C(s[n], r, j) * scale_log2 : DF_NEG;
            DF_C(s[n], r, j) = sv;
            mx = df_fmax(mx, sv);
          }
        }
        mx = df_row_max(mx);
        const float m_new = df_fmax(m_i[r], mx);
        const float alpha = df_exp2(m_i[r] - m_new);
        m_i[r] = m_new;
        float rs = 0.0f;
        DF_UNROLL for (int n = 0; n < BN / 8; ++n) {
          DF_UNROLL for (int j = 0; j < 2; ++j) {
            const float sv = DF_C(s[n], r, j);
            const float p = sv > 0.5f * DF_NEG ? df_exp2(sv - m_new) : 0.0f;
            rs += p;
            ps[rw * LDP + n * 8 + df_c_col(df_lane, j)] = df_from_float<T>(p);
          }
        }
        l_i[r] = l_i[r] * alpha + rs;
        DF_UNROLL for (int n = 0; n < D / 8; ++n) {
          DF_C(o[n], r, 0) *= alpha;
          DF_C(o[n], r, 1) *= alpha;
        }
      }
      df_simd_barrier();
      // O += P V
      DF_UNROLL for (int kk = 0; kk < BN / 16; ++kk) {
        df_frag_a<T> a;
        df_load_a(a, ps + kk * 16, LDP, df_lane);
        DF_UNROLL for (int n = 0; n < D / 8; ++n) {
          df_frag_b<T> bf;
          df_load_b(bf, vb + kk * 16 * LDK + n * 8, LDK, df_lane);
          df_mma(o[n], a, bf);
        }
      }
    }
    df_barrier();
  }
}

// Rows of this simdgroup -> output (or this split's partial result and its log-sum-exp).
if (warp_active) {
  DF_UNROLL for (int r = 0; r < 2; ++r) {
    const float l = df_row_sum(l_i[r]);
    const int row = row0 + int(df_warp) * 16 + df_c_row(df_lane, r);
    if (row < M) {
      const int g = row / Lq;
      const int i = row - g * Lq;
      const df_i64 orow = (df_i64(b) * Hq + hk * G + g) * Lq + i;
      const float inv = l > 0.0f ? 1.0f / l : 0.0f;
      if (SPLIT) {
        const df_i64 prow = orow * nsplit + split;
        DF_UNROLL for (int n = 0; n < D / 8; ++n) {
          DF_UNROLL for (int j = 0; j < 2; ++j) {
            opart[prow * D + n * 8 + df_c_col(df_lane, j)] = DF_C(o[n], r, j) * inv;
          }
        }
        if (df_c_col(df_lane, 0) == 0) {
          lse[prow] = l > 0.0f ? m_i[r] + df_log2(l) : DF_NEG;
        }
      } else {
        const df_i64 hrow = (df_i64(b) * Lq + i) * Hq + hk * G + g;  // heads last
        DF_UNROLL for (int n = 0; n < D / 8; ++n) {
          DF_UNROLL for (int j = 0; j < 2; ++j) {
            out[hrow * D + n * 8 + df_c_col(df_lane, j)] =
                df_from_float<T>(DF_C(o[n], r, j) * inv);
          }
        }
      }
    }
  }
}
