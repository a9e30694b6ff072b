#include "models/token_dispatcher.h"

#include <numeric>

#include "models/device_tensors.h"
#include "runtime/ops.h"

namespace moeforge {

int64_t DispatchPlan::received() const { return std::accumulate(recv_rows.begin(), recv_rows.end(), int64_t{0}); }

DispatchPlan plan_dispatch(Comm& ep, const Tensor& offsets) {
  const int members = ep.size();
  const int64_t E = offsets.numel() - 1;
  MOE_CHECK(E % members == 0, "token dispatcher: {} experts do not split over an EP group of {}", E, members);
  const int64_t El = E / members;
  const Tensor offsets_host = host(offsets);  // the exchange's sizes: the host must know them
  const int64_t* off = offsets_host.data<int64_t>();
  DispatchPlan plan;
  if (members == 1) {
    plan.send_rows = plan.recv_rows = {off[E]};
    plan.local_offsets = offsets;
    return plan;
  }

  // counts (ep, El): the rows of each member's experts; member r receives row block r. The
  // counts travel as host tensors (over MPI in a CUDA run too).
  const Tensor counts = Tensor::empty({members, El}, DType::kI64);
  for (int64_t e = 0; e < E; ++e) counts.data<int64_t>()[e] = off[e + 1] - off[e];
  const Tensor received = Tensor::empty({members, El}, DType::kI64);  // (source, local expert)
  const std::vector<int64_t> ones(static_cast<size_t>(members), 1);
  ep.all_to_all_v(counts, ones, received, ones);

  plan.send_rows.resize(static_cast<size_t>(members));
  plan.recv_rows.assign(static_cast<size_t>(members), 0);
  for (int r = 0; r < members; ++r) plan.send_rows[static_cast<size_t>(r)] = off[(r + 1) * El] - off[r * El];
  const int64_t* rc = received.data<int64_t>();
  const Tensor local_offsets = Tensor::zeros({El + 1}, DType::kI64);
  int64_t* lo = local_offsets.data<int64_t>();
  for (int s = 0; s < members; ++s)
    for (int64_t e = 0; e < El; ++e) {
      plan.recv_rows[static_cast<size_t>(s)] += rc[s * El + e];
      lo[e + 1] += rc[s * El + e];
    }
  for (int64_t e = 0; e < El; ++e) lo[e + 1] += lo[e];

  // Received order: (source, local expert); grouped order: (local expert, source).
  const Tensor regroup = Tensor::empty({lo[El], 1}, DType::kI32);
  int32_t* rg = regroup.data<int32_t>();
  std::vector<int64_t> cursor(lo, lo + El);
  int64_t i = 0;
  for (int s = 0; s < members; ++s)
    for (int64_t e = 0; e < El; ++e)
      for (int64_t j = 0; j < rc[s * El + e]; ++j) rg[i++] = static_cast<int32_t>(cursor[static_cast<size_t>(e)]++);
  // The expert GEMMs and the regrouping run where the tokens are.
  plan.local_offsets = on_device(local_offsets, offsets.device());
  plan.regroup = on_device(regroup, offsets.device());
  return plan;
}

Tensor to_experts(Comm& ep, const DispatchPlan& plan, const Tensor& x) {
  if (ep.size() == 1) return x;
  const int64_t R = plan.received(), C = x.dim(1);
  const Device dev = x.device();
  const DType act = x.dtype();
  const Tensor arrived = Tensor::empty({R, C}, act, dev);
  ep.all_to_all_v(x, plan.send_rows, arrived, plan.recv_rows);
  const Tensor grouped = Tensor::empty({R, C}, act, dev);
  ops::moe_permute_fwd(arrived, plan.regroup, grouped);
  return grouped;
}

Tensor from_experts(Comm& ep, const DispatchPlan& plan, const Tensor& y) {
  if (ep.size() == 1) return y;
  const int64_t R = plan.received(), C = y.dim(1);
  const int64_t M = std::accumulate(plan.send_rows.begin(), plan.send_rows.end(), int64_t{0});
  const Device dev = y.device();
  const DType act = y.dtype();
  const Tensor by_source = Tensor::empty({R, C}, act, dev);
  ops::moe_permute_bwd(y, plan.regroup, by_source);  // by_source[i] = y[regroup[i]]
  const Tensor out = Tensor::empty({M, C}, act, dev);
  ep.all_to_all_v(by_source, plan.recv_rows, out, plan.send_rows);
  return out;
}

}  // namespace moeforge
