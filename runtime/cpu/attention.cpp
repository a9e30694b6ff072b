#include "runtime/cpu/attention.h"

#include "runtime/cpu/simd_exp.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace moeforge::cpu {
namespace {

// Query and key tiles are kTile x kTile. Wider tiles (up to 256 keys or query rows, measured with
// B=4, T=256, H=8, Hkv=2, D=64) made no measurable difference: the time is in the tile sgemms
// either way. A query tile at i0 meets key tiles j0 <= i0 only; without a document or window
// mask only the diagonal one is masked.
constexpr int64_t kTile = 64;

// Below this many multiply-adds (of one score matrix) the work stays on the calling thread.
constexpr int64_t kParallelWork = int64_t{1} << 18;

// Shapes of one call, and the strides of a time step in the (B, T, H, D) / (B, T, Hkv, D) layouts.
struct Dims {
  int64_t B, T, H, Hkv, D;
  int64_t group() const { return H / Hkv; }
  int64_t q_ld() const { return H * D; }
  int64_t kv_ld() const { return Hkv * D; }
  // Multiply-adds of the causal score matrices of all heads.
  int64_t work() const { return B * H * T * (T + 1) / 2 * D; }
};

Dims dims_of(const Tensor& q, const Tensor& k) { return {q.dim(0), q.dim(1), q.dim(2), k.dim(2), q.dim(3)}; }

// Number of causally unmasked keys of row r of the tile pair (i0, j0) with `cols` keys: key j0 + c
// is visible to query i0 + r when j0 + c <= i0 + r.
inline int64_t visible_cols(int64_t i0, int64_t j0, int64_t r, int64_t cols) { return std::min(cols, i0 + r - j0 + 1); }

// The first key each query sees (b * T + i -> a position in row b), or empty for plain causal
// attention: the start of the query's document, moved up to i - window + 1 by a window.
std::vector<int32_t> first_keys(const Dims& d, const ops::AttentionMask& mask) {
  std::vector<int32_t> first;
  if (mask.plain()) return first;
  first.assign(static_cast<size_t>(d.B * d.T), 0);
  if (mask.cu_seqlens.defined()) {
    const int32_t* cu = mask.cu_seqlens.data<int32_t>();
    for (int64_t s = 0; s + 1 < mask.cu_seqlens.numel(); ++s)
      for (int64_t r = cu[s]; r < cu[s + 1]; ++r) first[r] = static_cast<int32_t>(cu[s] - r / d.T * d.T);
  }
  if (mask.window > 0)
    for (int64_t r = 0; r < d.B * d.T; ++r)
      first[r] = static_cast<int32_t>(std::max<int64_t>(first[r], r % d.T - mask.window + 1));
  return first;
}

// c (m, n) = alpha * a (m, kk) · op(b) + beta * c, row-major with leading dimensions.
inline void sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t kk, float alpha, const float* a,
                  int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
              static_cast<blasint>(m), static_cast<blasint>(n), static_cast<blasint>(kk), alpha, a,
              static_cast<blasint>(lda), b, static_cast<blasint>(ldb), beta, c, static_cast<blasint>(ldc));
}

// One query tile of one head: rows [i0, i0 + rows) of head h, against keys 0..i0 + rows - 1, or
// from first[i0] on (first: row b's first visible keys, or nullptr for plain causal attention).
// s (kTile, kTile), o (kTile, D), m and l (kTile) are the thread's scratch.
void forward_tile(const Dims& d, const float* q, const float* k, const float* v, float scale, float* out, float* lse,
                  const int32_t* first, int64_t b, int64_t h, int64_t i0, float* s, float* o, float* m, float* l) {
  const int64_t rows = std::min(kTile, d.T - i0);
  const int64_t g = h / d.group();
  const float* qi = q + ((b * d.T + i0) * d.H + h) * d.D;  // (rows, D), ld H*D
  const float* kb = k + (b * d.T * d.Hkv + g) * d.D;       // (T, D), ld Hkv*D
  const float* vb = v + (b * d.T * d.Hkv + g) * d.D;
  std::fill(o, o + rows * d.D, 0.0f);
  std::fill(m, m + rows, -std::numeric_limits<float>::infinity());
  std::fill(l, l + rows, 0.0f);

  // A row may see no key of a tile (a mask): it skips the tile. Every row sees its own key, so m
  // is finite at the end.
  for (int64_t j0 = first ? first[i0] / kTile * kTile : 0; j0 < i0 + rows; j0 += kTile) {
    const int64_t cols = std::min(kTile, i0 + rows - j0);
    // s (rows, cols) = scale * q_i · k_jᵀ
    sgemm(false, true, rows, cols, d.D, scale, qi, d.q_ld(), kb + j0 * d.kv_ld(), d.kv_ld(), 0.0f, s, kTile);
    for (int64_t r = 0; r < rows; ++r) {
      float* sr = s + r * kTile;
      const int64_t lo = first ? std::max<int64_t>(0, first[i0 + r] - j0) : 0;
      const int64_t vis = visible_cols(i0, j0, r, cols);
      if (lo >= vis) {  // no key of this tile
        std::fill(sr, sr + cols, 0.0f);
        continue;
      }
      float mx = m[r];
#pragma omp simd reduction(max : mx)
      for (int64_t c = lo; c < vis; ++c) mx = std::max(mx, sr[c]);
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t c = lo; c < vis; ++c) {
        sr[c] = simd_exp(sr[c] - mx);
        sum += sr[c];
      }
      std::fill(sr, sr + lo, 0.0f);  // masked keys contribute exactly 0
      std::fill(sr + vis, sr + cols, 0.0f);
      // Online softmax: the accumulator and the sum were relative to the old max m[r].
      const float corr = std::exp(m[r] - mx);
      if (corr != 1.0f) {
        float* orow = o + r * d.D;
        for (int64_t x = 0; x < d.D; ++x) orow[x] *= corr;
      }
      l[r] = l[r] * corr + sum;
      m[r] = mx;
    }
    // o (rows, D) += p (rows, cols) · v_j (cols, D)
    sgemm(false, false, rows, d.D, cols, 1.0f, s, kTile, vb + j0 * d.kv_ld(), d.kv_ld(), 1.0f, o, d.D);
  }

  float* lse_row = lse + (b * d.H + h) * d.T + i0;
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = 1.0f / l[r];
    const float* orow = o + r * d.D;
    float* dst = out + ((b * d.T + i0 + r) * d.H + h) * d.D;
    for (int64_t x = 0; x < d.D; ++x) dst[x] = orow[x] * inv;
    lse_row[r] = m[r] + std::log(l[r]);
  }
}

// Everything of kv head g of batch b: dk, dv of that head and dq of the query heads of its group.
// first as in forward_tile. di (group, T), p and ds (kTile, kTile) are the thread's scratch.
void backward_group(const Dims& d, const float* q, const float* k, const float* v, const float* out, const float* lse,
                    const float* dout, float scale, float* dq, float* dk, float* dv, const int32_t* first, int64_t b,
                    int64_t g, float* di, float* p, float* ds) {
  const int64_t G = d.group();
  const int64_t q_ld = d.q_ld(), kv_ld = d.kv_ld();
  const int64_t h_first = g * G;

  // di[hi][t] = dout_t · out_t, the rowsum(dO ∘ O) of FlashAttention-2 (= sum_s P_ts dP_ts).
  // Also clear the outputs this item owns, which the tile loop accumulates into.
  for (int64_t t = 0; t < d.T; ++t) {
    for (int64_t hi = 0; hi < G; ++hi) {
      const int64_t off = ((b * d.T + t) * d.H + h_first + hi) * d.D;
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (int64_t x = 0; x < d.D; ++x) acc += dout[off + x] * out[off + x];
      di[hi * d.T + t] = acc;
      std::fill(dq + off, dq + off + d.D, 0.0f);
    }
    const int64_t kv_off = ((b * d.T + t) * d.Hkv + g) * d.D;
    std::fill(dk + kv_off, dk + kv_off + d.D, 0.0f);
    std::fill(dv + kv_off, dv + kv_off + d.D, 0.0f);
  }

  for (int64_t j0 = 0; j0 < d.T; j0 += kTile) {
    const int64_t cols = std::min(kTile, d.T - j0);
    const int64_t kv_off = ((b * d.T + j0) * d.Hkv + g) * d.D;
    const float* kj = k + kv_off;  // (cols, D), ld Hkv*D
    const float* vj = v + kv_off;
    float* dkj = dk + kv_off;
    float* dvj = dv + kv_off;
    for (int64_t hi = 0; hi < G; ++hi) {
      const int64_t h = h_first + hi;
      // Queries before j0 see none of these keys; query tiles start at j0. With a mask they end
      // where the first query of a tile starts after these keys (first never decreases).
      for (int64_t i0 = j0; i0 < d.T; i0 += kTile) {
        if (first && first[i0] >= j0 + cols) break;
        const int64_t rows = std::min(kTile, d.T - i0);
        const int64_t q_off = ((b * d.T + i0) * d.H + h) * d.D;
        const float* qi = q + q_off;  // (rows, D), ld H*D
        const float* doi = dout + q_off;
        float* dqi = dq + q_off;
        const float* lse_i = lse + (b * d.H + h) * d.T + i0;
        const float* di_i = di + hi * d.T + i0;

        // p (rows, cols) = exp(scale * q_i · k_jᵀ - lse), 0 where masked
        sgemm(false, true, rows, cols, d.D, scale, qi, q_ld, kj, kv_ld, 0.0f, p, kTile);
        for (int64_t r = 0; r < rows; ++r) {
          float* pr = p + r * kTile;
          const int64_t lo = first ? std::min(cols, std::max<int64_t>(0, first[i0 + r] - j0)) : 0;
          const int64_t vis = std::max(lo, visible_cols(i0, j0, r, cols));
          const float lr = lse_i[r];
#pragma omp simd
          for (int64_t c = lo; c < vis; ++c) pr[c] = simd_exp(pr[c] - lr);
          std::fill(pr, pr + lo, 0.0f);
          std::fill(pr + vis, pr + cols, 0.0f);
        }
        // dv_j (cols, D) += pᵀ · dout_i
        sgemm(true, false, cols, d.D, rows, 1.0f, p, kTile, doi, q_ld, 1.0f, dvj, kv_ld);
        // ds (rows, cols) = p ∘ (dout_i · v_jᵀ - di)
        sgemm(false, true, rows, cols, d.D, 1.0f, doi, q_ld, vj, kv_ld, 0.0f, ds, kTile);
        for (int64_t r = 0; r < rows; ++r) {
          const float* pr = p + r * kTile;
          float* dsr = ds + r * kTile;
          const float dr = di_i[r];
#pragma omp simd
          for (int64_t c = 0; c < cols; ++c) dsr[c] = pr[c] * (dsr[c] - dr);
        }
        // dq_i (rows, D) += scale * ds · k_j;  dk_j (cols, D) += scale * dsᵀ · q_i
        sgemm(false, false, rows, d.D, cols, scale, ds, kTile, kj, kv_ld, 1.0f, dqi, q_ld);
        sgemm(true, false, cols, d.D, rows, scale, ds, kTile, qi, q_ld, 1.0f, dkj, kv_ld);
      }
    }
  }
}

}  // namespace

void attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, float scale, const Tensor& out,
                   const Tensor& lse, const ops::AttentionMask& mask) {
  const Dims d = dims_of(q, k);
  if (d.B * d.T * d.H == 0) return;
  const std::vector<int32_t> first = first_keys(d, mask);
  const float* pq = q.data<float>();
  const float* pk = k.data<float>();
  const float* pv = v.data<float>();
  float* pout = out.data<float>();
  float* plse = lse.data<float>();
  const int64_t nt = (d.T + kTile - 1) / kTile;
  const int64_t heads = d.B * d.H;
#pragma omp parallel if (d.work() > kParallelWork)
  {
    std::vector<float> s(kTile * kTile), o(kTile * d.D), m(kTile), l(kTile);
    // Later query tiles see more keys: hand them out first so the dynamic schedule balances.
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < nt * heads; ++item) {
      const int64_t it = nt - 1 - item / heads;
      const int64_t bh = item % heads;
      const int64_t b = bh / d.H;
      forward_tile(d, pq, pk, pv, scale, pout, plse, first.empty() ? nullptr : first.data() + b * d.T, b, bh % d.H,
                   it * kTile, s.data(), o.data(), m.data(), l.data());
    }
  }
}

void attention_bwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                   const Tensor& dout, float scale, const Tensor& dq, const Tensor& dk, const Tensor& dv,
                   const ops::AttentionMask& mask) {
  const Dims d = dims_of(q, k);
  if (d.B * d.T == 0) return;
  const std::vector<int32_t> first = first_keys(d, mask);
  const float* pq = q.data<float>();
  const float* pk = k.data<float>();
  const float* pv = v.data<float>();
  const float* pout = out.data<float>();
  const float* plse = lse.data<float>();
  const float* pdout = dout.data<float>();
  float* pdq = dq.data<float>();
  float* pdk = dk.data<float>();
  float* pdv = dv.data<float>();
  const int64_t groups = d.B * d.Hkv;
#pragma omp parallel if (d.work() > kParallelWork)
  {
    std::vector<float> di(d.group() * d.T), p(kTile * kTile), ds(kTile * kTile);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < groups; ++item) {
      const int64_t b = item / d.Hkv;
      backward_group(d, pq, pk, pv, pout, plse, pdout, scale, pdq, pdk, pdv,
                     first.empty() ? nullptr : first.data() + b * d.T, b, item % d.Hkv, di.data(), p.data(), ds.data());
    }
  }
}

}  // namespace moeforge::cpu
