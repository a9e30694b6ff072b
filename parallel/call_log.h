// CallLog: what one Comm member is doing, published for the watchdog.
//
// Every blocking call of an MpiComm opens a record (op, bytes, start time) with begin() and
// closes it with end(). Collectives take the next sequence number of the Comm (#1, #2, ...);
// send/recv are numbered per peer instead (the k-th send to a peer matches the peer's k-th recv
// from here), since in a pipeline the members of a group legitimately issue different numbers of
// them. The last kRecords records are kept so the ranks' histories can be compared on a timeout.
//
// Thread rules: one thread issues the calls (begin/end); the watchdog's service thread reads
// snapshots and checks deadlines concurrently. A mutex guards the state; it is taken twice per
// call and never contended in the hot path (the watchdog reads every ~10 ms).
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

namespace moeforge {

enum class CommOp : uint8_t { kAllReduce, kReduceScatter, kAllGather, kAllToAllV, kBroadcast, kBarrier, kSend, kRecv };

const char* comm_op_name(CommOp op);  // "all_reduce", ...
inline bool is_p2p(CommOp op) { return op == CommOp::kSend || op == CommOp::kRecv; }
// Ops whose buffer size must be equal on every member (all_to_all_v, send and recv may differ).
bool same_bytes_on_every_member(CommOp op);

// One call as seen from one member. Times are ages in seconds relative to the snapshot, so a
// record can be sent to another process and compared there.
struct CallRecord {
  int64_t seq = 0;    // collective: sequence number of the Comm; send/recv: message index per peer
  int64_t bytes = 0;  // buffer bytes of the call on this member
  CommOp op = CommOp::kAllReduce;
  int peer = -1;           // send/recv: the peer's group rank; -1 for collectives
  double start_age_s = 0;  // seconds since the call started
  double end_age_s = -1;   // seconds since it completed; < 0 while in progress
  bool done() const { return end_age_s >= 0; }
};

// Identity of a group as every member knows it.
struct GroupInfo {
  std::string name;              // "dp", "tp", ...
  std::vector<int> world_ranks;  // members in group-rank order
  int rank = 0;                  // this member's group rank
  uint64_t id = 0;               // equal on every member, distinct between live groups
  double timeout_s = 0;          // deadline of a blocking call
};

struct CallLogSnapshot {
  int64_t calls = 0;                // collectives issued (the last sequence number)
  std::vector<CallRecord> records;  // up to CallLog::kRecords, oldest first
  std::vector<int64_t> sent;        // sent[r]: messages sent to group rank r
  std::vector<int64_t> received;    // received[r]: messages received from group rank r
  // The call in progress, or nullptr.
  const CallRecord* current() const { return !records.empty() && !records.back().done() ? &records.back() : nullptr; }
  // The record of collective number `seq` if it is still in the ring, or nullptr.
  const CallRecord* collective(int64_t seq) const;
};

class CallLog {
 public:
  static constexpr int kRecords = 16;
  using Clock = std::chrono::steady_clock;

  explicit CallLog(GroupInfo group);
  CallLog(const CallLog&) = delete;
  CallLog& operator=(const CallLog&) = delete;

  const GroupInfo& group() const { return group_; }

  // Opens the record of a call (peer: the group rank for send/recv, -1 otherwise) and returns
  // its number. A call must be closed with end() before the next begins.
  int64_t begin(CommOp op, int64_t bytes, int peer = -1);
  void end();

  int64_t calls() const;
  CallLogSnapshot snapshot() const;

  // For the watchdog: true once, the first time the call in progress has run past the deadline
  // at `now`; the snapshot is then taken under the same lock.
  bool take_overdue(Clock::time_point now, CallLogSnapshot* snapshot);
  // Seconds the call in progress has run at `now`, or -1 when none is.
  double call_age_s(Clock::time_point now) const;

 private:
  struct Entry {
    int64_t seq = 0, bytes = 0;
    CommOp op = CommOp::kAllReduce;
    int peer = -1;
    Clock::time_point start, end;
    bool done = false;
  };
  CallLogSnapshot snapshot_locked(Clock::time_point now) const;

  const GroupInfo group_;
  mutable std::mutex mu_;
  std::array<Entry, kRecords> ring_;
  int64_t entries_ = 0;  // records ever opened; the newest is ring_[(entries_ - 1) % kRecords]
  int64_t calls_ = 0;
  std::vector<int64_t> sent_, received_;
  bool overdue_reported_ = false;
};

}  // namespace moeforge
