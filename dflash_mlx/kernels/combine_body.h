// Block attention, pass 2: merge the per-split partial results of pass 1.
// One thread per output element; the body is shared by Metal, CUDA and the emulator.
//
// Names supplied around this body: template T; inputs opart [rows, nsplit, D],
// lse [rows, nsplit] (fp32, base-2 log-sum-exp of the scaled scores; rows in [B, Hq, Lq]
// order), params (int32: rows, nsplit, D, Lq, Hq); output out [B, Lq, Hq, D] (T: heads
// last, as pass 1 writes it); df_gid (global thread index).

const int rows = params[0];
const int nsplit = params[1];
const int D = params[2];
const int Lq = params[3];
const int Hq = params[4];
const int row = int(df_gid) / D;
const int d = int(df_gid) - row * D;
if (row < rows) {
  const df_i64 base = df_i64(row) * nsplit;
  float mx = DF_NEG;
  for (int s = 0; s < nsplit; ++s) {
    mx = df_fmax(mx, lse[base + s]);
  }
  float acc = 0.0f;
  float wsum = 0.0f;
  for (int s = 0; s < nsplit; ++s) {
    const float w = df_exp2(lse[base + s] - mx);
    wsum += w;
    acc += w * opart[(base + s) * D + d];
  }
  const int i = row % Lq;
  const int bh = row / Lq;
  const df_i64 hrow = (df_i64(bh / Hq) * Lq + i) * Hq + bh % Hq;  // heads last
  out[hrow * D + d] = df_from_float<T>(acc / wsum);
}
