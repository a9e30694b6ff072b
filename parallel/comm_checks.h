// Argument checks every Comm backend applies before a call, so a bad call fails the same way on
// every backend and every member: the message names the op, the group and what was expected.
//   "reduce_scatter on group dp: in has shape (6, 4) but out has shape (2, 4); expected in of
//    shape (4, 4)"
#pragma once

#include <cstdint>
#include <span>
#include <string_view>

#include "parallel/comm.h"

namespace moeforge::comm_detail {

// t is defined and f32, i32 or i64.
void check_dtype(const Comm& comm, std::string_view op, std::string_view arg, const Tensor& t);
// in (size * n, ...) and out (n, ...): same dtype and device, distinct memory.
void check_reduce_scatter(const Comm& comm, const Tensor& in, const Tensor& out);
// in (n, ...) and out (size * n, ...): same dtype and device; in is either disjoint from out or
// exactly out's row block `rank` (gathering in place).
void check_all_gather(const Comm& comm, const Tensor& in, const Tensor& out);
// One count per member, none negative, summing to in's and out's rows; rows of equal size; the
// rows a member sends itself equal those it expects from itself; distinct memory.
void check_all_to_all_v(const Comm& comm, const Tensor& in, std::span<const int64_t> send_rows, const Tensor& out,
                        std::span<const int64_t> recv_rows);
// `member` (what: "root", "peer") is a group rank; `other_than_self` for send/recv.
void check_member(const Comm& comm, std::string_view op, std::string_view what, int member, bool other_than_self);

// Elements per row along dim 0 (the product of the trailing dims; 1 for a 0-d tensor).
int64_t row_numel(const Tensor& t);
// all_gather's `in` is out's row block `rank` itself.
bool is_own_block(const Comm& comm, const Tensor& in, const Tensor& out);

}  // namespace moeforge::comm_detail
