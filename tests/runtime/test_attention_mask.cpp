// Tests the attention masks of runtime/ops_attention.cpp and runtime/cpu/attention.cpp: sliding
// windows and packed documents (ops::AttentionMask). Forward and backward against a double
// reference that applies the mask element by element; each packed document against the same
// document run alone as its own sequence; a window at least T long against plain causal attention;
// and the mask's argument checks.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "runtime/ops.h"
#include "tests/testing.h"

namespace moeforge {
namespace {

using testing::error_of;
using testing::expect_close;
using testing::random_tensor;
using testing::to_double;

struct Dims {
  int64_t B, T, H, Hkv, D;
};

// first[b * T + i]: the first key query i of row b may see, from the document bounds (over the
// flattened rows) and the window, computed the obvious way.
std::vector<int64_t> first_keys(const Dims& d, const std::vector<int32_t>& cu, int64_t window) {
  std::vector<int64_t> first(static_cast<size_t>(d.B * d.T));
  for (int64_t r = 0; r < d.B * d.T; ++r) {
    int64_t start = r / d.T * d.T;  // the row's start
    for (const int32_t c : cu)
      if (c <= r) start = std::max<int64_t>(start, c);
    int64_t f = start - r / d.T * d.T;
    if (window > 0) f = std::max(f, r % d.T - window + 1);
    first[r] = f;
  }
  return first;
}

struct Grads {
  std::vector<double> out, lse, dq, dk, dv;
};

// Masked attention and its backward in double, straight from the definitions.
Grads reference(const Dims& d, const std::vector<double>& q, const std::vector<double>& k,
                const std::vector<double>& v, const std::vector<double>& dout, const std::vector<int64_t>& first,
                double scale) {
  Grads g;
  g.out.assign(q.size(), 0.0);
  g.dq.assign(q.size(), 0.0);
  g.dk.assign(k.size(), 0.0);
  g.dv.assign(v.size(), 0.0);
  g.lse.assign(static_cast<size_t>(d.B * d.H * d.T), 0.0);
  const int64_t G = d.H / d.Hkv;
  const auto qa = [&](int64_t b, int64_t t, int64_t h) { return ((b * d.T + t) * d.H + h) * d.D; };
  const auto ka = [&](int64_t b, int64_t t, int64_t g2) { return ((b * d.T + t) * d.Hkv + g2) * d.D; };
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t h = 0; h < d.H; ++h)
      for (int64_t i = 0; i < d.T; ++i) {
        const int64_t lo = first[b * d.T + i], kvh = h / G;
        std::vector<double> p(static_cast<size_t>(i + 1 - lo));
        double mx = -INFINITY;
        for (int64_t j = lo; j <= i; ++j) {
          double s = 0.0;
          for (int64_t x = 0; x < d.D; ++x) s += q[qa(b, i, h) + x] * k[ka(b, j, kvh) + x];
          p[j - lo] = scale * s;
          mx = std::max(mx, p[j - lo]);
        }
        double sum = 0.0;
        for (double& e : p) sum += (e = std::exp(e - mx));
        for (double& e : p) e /= sum;
        g.lse[(b * d.H + h) * d.T + i] = mx + std::log(sum);
        // out, and the backward of this row: dP = dout · v, dS = P (dP - sum P dP).
        std::vector<double> dp(p.size());
        double pdp = 0.0;
        for (int64_t j = lo; j <= i; ++j) {
          double s = 0.0;
          for (int64_t x = 0; x < d.D; ++x) {
            g.out[qa(b, i, h) + x] += p[j - lo] * v[ka(b, j, kvh) + x];
            s += dout[qa(b, i, h) + x] * v[ka(b, j, kvh) + x];
          }
          dp[j - lo] = s;
          pdp += p[j - lo] * s;
        }
        for (int64_t j = lo; j <= i; ++j) {
          const double ds = p[j - lo] * (dp[j - lo] - pdp);
          for (int64_t x = 0; x < d.D; ++x) {
            g.dq[qa(b, i, h) + x] += scale * ds * k[ka(b, j, kvh) + x];
            g.dk[ka(b, j, kvh) + x] += scale * ds * q[qa(b, i, h) + x];
            g.dv[ka(b, j, kvh) + x] += p[j - lo] * dout[qa(b, i, h) + x];
          }
        }
      }
  return g;
}

// expect_close, but a gradient that is zero in exact arithmetic (a query that sees one key only
// has dS = P (dP - P dP) = 0) is compared by its largest absolute error: its relative error is
// rounding noise over rounding noise.
void expect_close_grad(const Tensor& got, const std::vector<double>& want, double rtol, double atol,
                       const std::string& what) {
  double norm = 0.0;
  for (const double w : want) norm += w * w;
  if (std::sqrt(norm) < 1e-4) {
    EXPECT_LE(testing::max_abs_error(to_double(got), want), atol) << what << " (zero in exact arithmetic)";
    return;
  }
  expect_close(got, want, rtol, atol, what);
}

struct MaskCase {
  Dims d;
  std::vector<int32_t> cu;  // empty: no documents
  int64_t window;
};

Tensor i32_tensor(const std::vector<int32_t>& v) {
  return Tensor::from_ints({static_cast<int64_t>(v.size())}, v);
}

ops::AttentionMask mask_of(const MaskCase& c) {
  ops::AttentionMask m;
  m.window = c.window;
  if (!c.cu.empty()) {
    m.cu_seqlens = i32_tensor(c.cu);
    for (size_t s = 0; s + 1 < c.cu.size(); ++s) m.max_seqlen = std::max<int64_t>(m.max_seqlen, c.cu[s + 1] - c.cu[s]);
  }
  return m;
}

TEST(AttentionMask, ForwardAndBackwardMatchTheMaskedDoubleReference) {
  const std::vector<MaskCase> cases = {
      {{1, 9, 2, 1, 4}, {}, 3},                                  // a window, nothing else
      {{2, 9, 4, 2, 8}, {0, 4, 9, 10, 18}, 0},                   // documents of 4, 5, 1, 8
      {{2, 9, 4, 2, 8}, {0, 4, 9, 10, 18}, 2},                   // both
      {{1, 200, 4, 1, 16}, {0, 1, 70, 71, 133, 200}, 0},         // documents across key tiles, one of 1
      {{2, 150, 2, 2, 8}, {}, 65},                               // a window just over one tile
      {{1, 200, 2, 1, 8}, {0, 130, 200}, 17},                    // window inside long documents
      {{1, 130, 8, 2, 8}, {}, 1},                                // every query sees itself only
  };
  for (const MaskCase& c : cases) {
    const Dims& d = c.d;
    SCOPED_TRACE(fmt::format("B{} T{} H{} Hkv{} D{} docs {} window {}", d.B, d.T, d.H, d.Hkv, d.D, c.cu.size(),
                             c.window));
    const Tensor q = random_tensor({d.B, d.T, d.H, d.D}, 71, 1.5f);
    const Tensor k = random_tensor({d.B, d.T, d.Hkv, d.D}, 72, 1.5f);
    const Tensor v = random_tensor({d.B, d.T, d.Hkv, d.D}, 73);
    const Tensor dout = random_tensor({d.B, d.T, d.H, d.D}, 74);
    const double scale = 1.0 / std::sqrt(static_cast<double>(d.D));
    const Grads want = reference(d, to_double(q), to_double(k), to_double(v), to_double(dout),
                                 first_keys(d, c.cu, c.window), scale);
    const ops::AttentionMask mask = mask_of(c);
    const Tensor out = Tensor::empty(q.shape(), DType::kF32), lse = Tensor::empty({d.B, d.H, d.T}, DType::kF32);
    ops::attention_fwd(q, k, v, static_cast<float>(scale), out, lse, mask);
    expect_close(out, want.out, 1e-4, 1e-5, "out");
    expect_close(lse, want.lse, 1e-5, 1e-5, "lse");
    const Tensor dq = random_tensor(q.shape(), 75), dk = random_tensor(k.shape(), 76), dv = random_tensor(v.shape(), 77);
    ops::attention_bwd(q, k, v, out, lse, dout, static_cast<float>(scale), dq, dk, dv, mask);
    expect_close_grad(dq, want.dq, 1e-4, 1e-5, "dq");
    expect_close_grad(dk, want.dk, 1e-4, 1e-5, "dk");
    expect_close(dv, want.dv, 1e-4, 1e-5, "dv");
  }
}

// Each packed document gives exactly what it gives alone, as a sequence of its own (B = 1,
// T = its length): nothing crosses a document boundary, in either direction.
TEST(AttentionMask, EachDocumentEqualsItselfRunAlone) {
  const Dims d{2, 140, 4, 2, 16};
  const std::vector<int32_t> cu{0, 65, 66, 140, 203, 280};
  const Tensor q = random_tensor({d.B, d.T, d.H, d.D}, 81, 1.5f);
  const Tensor k = random_tensor({d.B, d.T, d.Hkv, d.D}, 82, 1.5f);
  const Tensor v = random_tensor({d.B, d.T, d.Hkv, d.D}, 83);
  const Tensor dout = random_tensor({d.B, d.T, d.H, d.D}, 84);
  const float scale = 0.25f;
  ops::AttentionMask mask;
  mask.cu_seqlens = i32_tensor(cu);
  mask.max_seqlen = 77;
  const Tensor out = Tensor::empty(q.shape(), DType::kF32), lse = Tensor::empty({d.B, d.H, d.T}, DType::kF32);
  ops::attention_fwd(q, k, v, scale, out, lse, mask);
  const Tensor dq = Tensor::empty(q.shape(), DType::kF32), dk = Tensor::empty(k.shape(), DType::kF32),
               dv = Tensor::empty(v.shape(), DType::kF32);
  ops::attention_bwd(q, k, v, out, lse, dout, scale, dq, dk, dv, mask);
  // Flattened rows (b * T + t) as (B * T, X, D) views; a document is a range of them.
  const auto flat = [&](const Tensor& t) { return t.reshape({d.B * d.T, t.dim(2), t.dim(3)}); };
  for (size_t s = 0; s + 1 < cu.size(); ++s) {
    const int64_t lo = cu[s], n = cu[s + 1] - cu[s];
    SCOPED_TRACE(fmt::format("document {} [{}, {})", s, lo, lo + n));
    const auto alone = [&](const Tensor& t) {  // a copy of the document's rows as (1, n, X, D)
      const Tensor part = flat(t).rows(lo, lo + n);
      return Tensor::from_floats({1, n, t.dim(2), t.dim(3)},
                                 std::vector<float>(part.data<float>(), part.data<float>() + part.numel()));
    };
    const Tensor q1 = alone(q), k1 = alone(k), v1 = alone(v), d1 = alone(dout);
    const Tensor o1 = Tensor::empty(q1.shape(), DType::kF32), l1 = Tensor::empty({1, d.H, n}, DType::kF32);
    ops::attention_fwd(q1, k1, v1, scale, o1, l1);
    const Tensor dq1 = Tensor::empty(q1.shape(), DType::kF32), dk1 = Tensor::empty(k1.shape(), DType::kF32),
                 dv1 = Tensor::empty(v1.shape(), DType::kF32);
    ops::attention_bwd(q1, k1, v1, o1, l1, d1, scale, dq1, dk1, dv1);
    expect_close(alone(out), to_double(o1), 1e-6, 1e-6, "out");
    expect_close_grad(alone(dq), to_double(dq1), 1e-5, 1e-6, "dq");
    expect_close_grad(alone(dk), to_double(dk1), 1e-5, 1e-6, "dk");
    expect_close(alone(dv), to_double(dv1), 1e-5, 1e-6, "dv");
    // lse (B, H, T): the document's columns of its row.
    const int64_t b = lo / d.T, t0 = lo % d.T;
    std::vector<double> lse_doc;
    for (int64_t h = 0; h < d.H; ++h)
      for (int64_t t = 0; t < n; ++t) lse_doc.push_back(lse.data<float>()[(b * d.H + h) * d.T + t0 + t]);
    expect_close(l1, lse_doc, 1e-6, 1e-6, "lse");
  }
}

// A window of T or more keys, or one document per row, is plain causal attention, bitwise.
TEST(AttentionMask, NoOpMasksAreBitwisePlainCausal) {
  const Dims d{2, 100, 4, 2, 8};
  const Tensor q = random_tensor({d.B, d.T, d.H, d.D}, 91), k = random_tensor({d.B, d.T, d.Hkv, d.D}, 92),
               v = random_tensor({d.B, d.T, d.Hkv, d.D}, 93), dout = random_tensor({d.B, d.T, d.H, d.D}, 94);
  const auto run = [&](const ops::AttentionMask& m) {
    const Tensor out = Tensor::empty(q.shape(), DType::kF32), lse = Tensor::empty({d.B, d.H, d.T}, DType::kF32);
    ops::attention_fwd(q, k, v, 0.3f, out, lse, m);
    const Tensor dq = Tensor::empty(q.shape(), DType::kF32), dk = Tensor::empty(k.shape(), DType::kF32),
                 dv = Tensor::empty(v.shape(), DType::kF32);
    ops::attention_bwd(q, k, v, out, lse, dout, 0.3f, dq, dk, dv, m);
    return std::vector<std::vector<double>>{to_double(out), to_double(lse), to_double(dq), to_double(dk),
                                            to_double(dv)};
  };
  const auto plain = run({});
  ops::AttentionMask window;
  window.window = d.T;
  EXPECT_EQ(run(window), plain);
  ops::AttentionMask rows;
  rows.cu_seqlens = i32_tensor({0, 100, 200});
  rows.max_seqlen = 100;
  EXPECT_EQ(run(rows), plain);
}

TEST(AttentionMask, BadMasksNameWhatIsWrong) {
  const Tensor q = random_tensor({2, 4, 2, 8}, 1), k = random_tensor({2, 4, 1, 8}, 2);
  const Tensor out = Tensor::empty(q.shape(), DType::kF32), lse = Tensor::empty({2, 2, 4}, DType::kF32);
  const auto fwd = [&](const ops::AttentionMask& m) {
    return error_of([&] { ops::attention_fwd(q, k, k, 0.5f, out, lse, m); });
  };
  ops::AttentionMask m;
  m.window = -3;
  EXPECT_EQ(fwd(m), "attention_fwd: the attention window is -3; expected 0 (none) or a positive number of keys");
  m.window = 0;
  m.max_seqlen = 8;
  m.cu_seqlens = i32_tensor({0, 3, 8});
  EXPECT_EQ(fwd(m),
            "attention_fwd: document 1 ([3, 8) of the flattened rows) crosses the start of row 1 at 4; every row of q "
            "(2, 4, 2, 8) must start a document");
  m.cu_seqlens = i32_tensor({0, 4, 7});
  EXPECT_EQ(fwd(m), "attention_fwd: mask.cu_seqlens runs from 0 to 7; expected 0 to B * T = 8 (q (2, 4, 2, 8))");
  m.cu_seqlens = i32_tensor({0, 4, 4, 8});
  EXPECT_EQ(fwd(m), "attention_fwd: mask.cu_seqlens[2] = 4 does not increase past mask.cu_seqlens[1] = 4");
  m.cu_seqlens = i32_tensor({0, 4, 8});
  m.max_seqlen = 3;  // 4 needed
  EXPECT_EQ(fwd(m), "attention_fwd: document 0 has 4 tokens, more than mask.max_seqlen = 3");
  m.max_seqlen = 0;
  EXPECT_EQ(fwd(m), "attention_fwd: mask.max_seqlen is 0; it must be the longest document's length (>= 1)");
  m.max_seqlen = 4;
  m.cu_seqlens = Tensor::from_floats({3}, std::vector<float>{0, 4, 8});
  EXPECT_EQ(fwd(m), "attention_fwd: mask.cu_seqlens must be i32, got f32 with shape (3)");
  m.cu_seqlens = i32_tensor({8});
  EXPECT_EQ(fwd(m), "attention_fwd: mask.cu_seqlens has shape (1); expected (S + 1) with S >= 1 documents");
  m.cu_seqlens = i32_tensor({0, 4, 8});
  EXPECT_EQ(fwd(m), "<no error>");  // the good one
}

}  // namespace
}  // namespace moeforge
