// From a fused q/k/v product to attention's inputs, in one pass: per head, RMS-normalise
// q and k (where the model has q_norm / k_norm), rotate them (RoPE, non-traditional) at
// their positions, and write q [B, Hq, L, D] and k, v as one array [B, 2 Hkv, L, D] (k's
// heads, then v's: a static cache stores them so, written with one scatter). The body is
// shared by Metal, CUDA and the CPU emulator.
//
// It computes and rounds as MLX's own kernels do (mlx/backend/*/rms_norm, rope), so the
// result is theirs but for the order of one sum: rms_norm writes w * T(x * rsqrt(mean(
// x^2) + eps)), rope reads T and writes T(x1 cos - x2 sin), T(x1 sin + x2 cos) at angle
// (scale * position) * inv_freq, inv_freq = exp2(-(i / (D / 2)) * log2(base)) or
// 1 / freqs[i].
//
// One simdgroup per (row, head); lane l holds elements l, l + 32, ...: those of the first
// half of the head pair with the ones D / 2 further on.
//
// Names supplied around this body: template T, D (head dim), NORM (0 / 1); inputs
// y [B * L, (Hq + 2 Hkv) * D] (row-contiguous), qw / kw [D] (T), freqs [D / 2] (fp32,
// read where log2(base) is 0), pos (int32 [1]: position of each sequence's first row),
// params (int32: rows, L, Hq, Hkv, first head to write), fparams (fp32: eps, position
// scale, log2(base)); outputs q [B, Hq, L, D], kv [B, 2 Hkv, L, D]; df_gid (global thread
// index).

constexpr int E = D / 32;  // elements per lane
constexpr int HALF = E / 2;
static_assert(D % 64 == 0, "head dim must be a multiple of 64");

const int rows = params[0];
const int L = params[1];
const int Hq = params[2];
const int Hkv = params[3];
const int first = params[4];
const int H = Hq + 2 * Hkv;
const int lane = int(df_gid & 31u);
const int unit = int(df_gid >> 5);
const int per_row = H - first;
const int row = unit / per_row;
const int h = first + (unit - row * per_row);
if (row < rows) {  // the same for the whole simdgroup: its shuffles see every lane
  const int b = row / L;
  const int l = row - b * L;
  const DF_DEV T* src = y + df_i64(row) * (H * D) + h * D;
  float x[E];
  DF_UNROLL for (int j = 0; j < E; ++j) {
    x[j] = df_to_float(src[j * 32 + lane]);
  }
  if (h < Hq + Hkv) {  // q or k
    if (NORM) {
      float ss = 0.0f;
      DF_UNROLL for (int j = 0; j < E; ++j) {
        ss += x[j] * x[j];
      }
      const float inv = df_rsqrt(df_lane_sum(ss) / float(D) + fparams[0]);
      const DF_DEV T* w = h < Hq ? qw : kw;
      DF_UNROLL for (int j = 0; j < E; ++j) {
        const T normed = df_from_float<T>(x[j] * inv);
        x[j] = df_to_float(df_from_float<T>(df_to_float(w[j * 32 + lane]) * df_to_float(normed)));
      }
    }
    const float p = fparams[1] * float(pos[0] + l);
    const float log2_base = fparams[2];
    DF_UNROLL for (int j = 0; j < HALF; ++j) {
      const int i = j * 32 + lane;
      const float inv_freq = log2_base != 0.0f ? df_exp2(-(float(i) / float(D / 2)) * log2_base)
                                               : 1.0f / freqs[i];
      const float theta = p * inv_freq;
      const float c = df_cos(theta);
      const float s = df_sin(theta);
      const float x1 = x[j];
      const float x2 = x[j + HALF];
      x[j] = x1 * c - x2 * s;
      x[j + HALF] = x1 * s + x2 * c;
    }
  }
  DF_DEV T* dst = h < Hq ? q + (df_i64(b * Hq + h) * L + l) * D
                         : kv + (df_i64(b * 2 * Hkv + h - Hq) * L + l) * D;
  DF_UNROLL for (int j = 0; j < E; ++j) {
    dst[j * 32 + lane] = df_from_float<T>(x[j]);
  }
}
