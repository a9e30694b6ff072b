// Expert parallelism's token dispatcher (DESIGN.md, token path): moves the token copies a rank
// routed to the ranks that own their experts, and the expert outputs back.
//
// The EP group's member r owns experts [r * El, (r + 1) * El), El = E / ep. A rank's
// expert-grouped buffer (moe_plan's offsets over all E experts) therefore holds, in order, the
// rows for member 0, member 1, ...; one all-to-all-v sends each member its block. Before it,
// the members exchange per-expert counts (an all-to-all of El counts per pair), so every rank
// knows how many rows it receives from each member for each of its experts, with no padding to
// a capacity. Received rows arrive grouped by source; a local regrouping puts them in
// (local expert, source) order, so each local expert's rows are contiguous for the grouped GEMM.
//
// to_experts and from_experts are each other's transpose (a permutation of rows across the
// group), so the backward of the dispatch is from_experts and the backward of the combine is
// to_experts. plan_dispatch, to_experts and from_experts each issue one all-to-all-v on every
// member, whatever it sends or receives (zero rows included), so the members never diverge.
// With ep = 1 all three are the identity and issue nothing.
//
// Devices: the rows travel on the device they are on (NCCL for CUDA tensors); the per-expert
// counts are read on the host (they size the exchange) and exchanged as host tensors, and the
// plan's regroup and local_offsets are put back on the device of the offsets.
#pragma once

#include <cstdint>
#include <vector>

#include "parallel/comm.h"
#include "runtime/tensor.h"

namespace moeforge {

struct DispatchPlan {
  std::vector<int64_t> send_rows;  // (ep) rows this rank sends to each member
  std::vector<int64_t> recv_rows;  // (ep) rows this rank receives from each member
  Tensor regroup;                  // (R, 1) i32: row of received row i in the expert-grouped order
  Tensor local_offsets;            // (El + 1) i64 over the R received rows
  // (both on the device of plan_dispatch's offsets)
  int64_t received() const;        // R
};

// Collective over ep: offsets (E+1) i64 of this rank's expert-grouped buffer, on any device.
DispatchPlan plan_dispatch(Comm& ep, const Tensor& offsets);
// x (M, C), rows grouped by global expert -> (R, C) rows for this rank's experts, grouped by
// local expert.
Tensor to_experts(Comm& ep, const DispatchPlan& plan, const Tensor& x);
// y (R, C) in the grouped order of to_experts -> (M, C) in the order of its input.
Tensor from_experts(Comm& ep, const DispatchPlan& plan, const Tensor& y);

}  // namespace moeforge
