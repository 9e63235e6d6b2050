// A residual add and the RMS norm after it, in one pass: h = x + r (rounded to T, as
// MLX's add), y = w * T(h * rsqrt(mean(h^2) + eps)) (as MLX's rms_norm computes and
// rounds it, but for the order of the sum). Writes both: h goes on down the residual
// stream, y into the next projection. The body is shared by Metal, CUDA and the CPU
// emulator.
//
// One threadgroup of THREADS (<= 1024) per row; thread t holds elements t + j THREADS,
// j < PER, in registers: every load of a pass is issued before its first store (a store
// between loads could alias them, and would make each load wait for the one before).
//
// Names supplied around this body: template T, THREADS, PER (ceil(H / THREADS)); inputs
// x, r [rows, H] (row-contiguous), w [H] (T), params (int32: rows, H), fparams (fp32:
// eps); outputs h, y [rows, H]; df_tid, df_lane, df_warp, df_row (from the entry),
// df_red (threadgroup float[THREADS / 32]).

const int H = params[1];
const df_i64 base = df_i64(df_row) * H;
float v[PER];
DF_UNROLL for (int j = 0; j < PER; ++j) {
  const int i = int(df_tid) + j * THREADS;
  v[j] = i < H ? df_to_float(df_from_float<T>(df_to_float(x[base + i]) + df_to_float(r[base + i])))
               : 0.0f;
}
float ss = 0.0f;
DF_UNROLL for (int j = 0; j < PER; ++j) {
  const int i = int(df_tid) + j * THREADS;
  if (i < H) {
    h[base + i] = df_from_float<T>(v[j]);
  }
  ss += v[j] * v[j];
}
ss = df_lane_sum(ss);
if (df_lane == 0u) {
  df_red[df_warp] = ss;
}
df_barrier();
float total = 0.0f;
DF_UNROLL for (int j = 0; j < THREADS / 32; ++j) {
  total += df_red[j];
}
const float inv = df_rsqrt(total / float(H) + fparams[0]);
float wv[PER];
DF_UNROLL for (int j = 0; j < PER; ++j) {
  const int i = int(df_tid) + j * THREADS;
  wv[j] = i < H ? df_to_float(w[i]) : 0.0f;
}
DF_UNROLL for (int j = 0; j < PER; ++j) {
  const int i = int(df_tid) + j * THREADS;
  if (i < H) {
    y[base + i] = df_from_float<T>(wv[j] * df_to_float(df_from_float<T>(v[j] * inv)));
  }
}
