// The two boundaries of sequence-parallel tensor parallelism (Megatron-Core's
// gather_from_sequence_parallel_region / reduce_scatter_to_sequence_parallel_region).
//
// With tp > 1 the residual stream is split by token rows over the TP group: a micro-batch's
// N = B*T rows are cut into tp contiguous blocks, rank r holding rows [r*N/tp, (r+1)*N/tp).
// Norms and the MoE block work on those rows. Attention and the LM head need every row, with
// their weights split over TP instead:
//
//   forward   rows (N/tp, C) --gather_rows--------> (N, C)   column-parallel matmuls ...
//   backward  rows (N/tp, C) <-scatter_rows (sum)-- (N, C)   partial gradients of every row
//
//   forward   (N, C) partial sums of a row-parallel matmul --scatter_rows (sum)--> (N/tp, C)
//   backward  (N, C) <--gather_rows-- (N/tp, C)
//
// Each function is the backward of the other. With a TP group of one they return their input.
#pragma once

#include "parallel/comm.h"

namespace moeforge {

// local (n, ...) on every member -> (size * n, ...), member r's rows at block r.
Tensor gather_rows(Comm& tp, const Tensor& local);
// full (size * n, ...) on every member -> (n, ...) = sum over members of row block `rank`.
Tensor scatter_rows(Comm& tp, const Tensor& full);

}  // namespace moeforge
