#include "parallel/call_log.h"

#include "runtime/error.h"

namespace moeforge {

const char* comm_op_name(CommOp op) {
  switch (op) {
    case CommOp::kAllReduce: return "all_reduce";
    case CommOp::kReduceScatter: return "reduce_scatter";
    case CommOp::kAllGather: return "all_gather";
    case CommOp::kAllToAllV: return "all_to_all_v";
    case CommOp::kBroadcast: return "broadcast";
    case CommOp::kBarrier: return "barrier";
    case CommOp::kSend: return "send";
    case CommOp::kRecv: return "recv";
  }
  return "?";
}

bool same_bytes_on_every_member(CommOp op) {
  return op == CommOp::kAllReduce || op == CommOp::kReduceScatter || op == CommOp::kAllGather ||
         op == CommOp::kBroadcast || op == CommOp::kBarrier;
}

const CallRecord* CallLogSnapshot::collective(int64_t seq) const {
  for (const CallRecord& r : records) {
    if (!is_p2p(r.op) && r.seq == seq) return &r;
  }
  return nullptr;
}

CallLog::CallLog(GroupInfo group)
    : group_(std::move(group)), sent_(group_.world_ranks.size()), received_(group_.world_ranks.size()) {}

int64_t CallLog::begin(CommOp op, int64_t bytes, int peer) {
  const auto now = Clock::now();
  std::lock_guard lock(mu_);
  MOE_CHECK(entries_ == 0 || ring_[(entries_ - 1) % kRecords].done,
            "{} on group {}: the previous call on this group has not completed (a Comm is used by one "
            "thread at a time)",
            comm_op_name(op), group_.name);
  Entry& e = ring_[entries_ % kRecords];
  ++entries_;
  e = Entry{};
  e.op = op;
  e.bytes = bytes;
  e.peer = peer;
  e.start = now;
  if (op == CommOp::kSend) {
    e.seq = ++sent_.at(peer);
  } else if (op == CommOp::kRecv) {
    e.seq = ++received_.at(peer);
  } else {
    e.seq = ++calls_;
  }
  overdue_reported_ = false;
  return e.seq;
}

void CallLog::end() {
  const auto now = Clock::now();
  std::lock_guard lock(mu_);
  Entry& e = ring_[(entries_ - 1) % kRecords];
  e.end = now;
  e.done = true;
}

int64_t CallLog::calls() const {
  std::lock_guard lock(mu_);
  return calls_;
}

CallLogSnapshot CallLog::snapshot() const {
  const auto now = Clock::now();
  std::lock_guard lock(mu_);
  return snapshot_locked(now);
}

bool CallLog::take_overdue(Clock::time_point now, CallLogSnapshot* snapshot) {
  std::lock_guard lock(mu_);
  if (entries_ == 0 || overdue_reported_) return false;
  const Entry& e = ring_[(entries_ - 1) % kRecords];
  if (e.done || std::chrono::duration<double>(now - e.start).count() <= group_.timeout_s) return false;
  overdue_reported_ = true;
  *snapshot = snapshot_locked(now);
  return true;
}

double CallLog::call_age_s(Clock::time_point now) const {
  std::lock_guard lock(mu_);
  if (entries_ == 0) return -1;
  const Entry& e = ring_[(entries_ - 1) % kRecords];
  return e.done ? -1 : std::chrono::duration<double>(now - e.start).count();
}

CallLogSnapshot CallLog::snapshot_locked(Clock::time_point now) const {
  auto age = [&](Clock::time_point t) { return std::chrono::duration<double>(now - t).count(); };
  CallLogSnapshot s;
  s.calls = calls_;
  s.sent = sent_;
  s.received = received_;
  const int64_t first = entries_ > kRecords ? entries_ - kRecords : 0;
  for (int64_t i = first; i < entries_; ++i) {
    const Entry& e = ring_[i % kRecords];
    s.records.push_back(CallRecord{e.seq, e.bytes, e.op, e.peer, age(e.start), e.done ? age(e.end) : -1.0});
  }
  return s;
}

}  // namespace moeforge
