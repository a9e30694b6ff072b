#include "parallel/watchdog.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "parallel/mpi_check.h"
#include "runtime/error.h"

namespace moeforge {
namespace {

constexpr int kQueryTag = 1;
constexpr int kReplyTag = 2;
constexpr int kMaxElsewhere = 8;
constexpr int kNameBytes = 32;
// Extra time a deferring rank gives the reporting rank to query, print and abort.
constexpr double kDeferMarginS = 3.0;

using Clock = std::chrono::steady_clock;

// Status messages are plain bytes: every rank runs the same binary, so layouts agree.
struct WireRecord {
  int64_t seq, bytes;
  double start_age_s, end_age_s;
  int32_t op, peer;
};

struct WireElsewhere {
  char group[kNameBytes];
  WireRecord call;
  int32_t peer_world_rank, pad;
};

struct WireReply {
  int32_t found, n_records;
  int64_t calls, sent_here, received_from_here;
  WireRecord records[CallLog::kRecords];
  int32_t n_elsewhere, pad;
  WireElsewhere elsewhere[kMaxElsewhere];
};

WireRecord to_wire(const CallRecord& r) {
  return {r.seq, r.bytes, r.start_age_s, r.end_age_s, static_cast<int32_t>(r.op), r.peer};
}

CallRecord from_wire(const WireRecord& w) {
  return {w.seq, w.bytes, static_cast<CommOp>(w.op), w.peer, w.start_age_s, w.end_age_s};
}

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

}  // namespace

struct Watchdog::PendingReply {
  WireReply reply{};
  MPI_Request request = MPI_REQUEST_NULL;
};

Watchdog::Watchdog() {
  MOE_MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &world_rank_));
  MOE_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &status_comm_));
  MOE_MPI_CHECK(MPI_Comm_set_errhandler(status_comm_, MPI_ERRORS_RETURN));
  thread_ = std::thread([this] { serve(); });
}

Watchdog::~Watchdog() { stop(); }

void Watchdog::stop() {
  if (!thread_.joinable()) return;
  stop_ = true;
  thread_.join();
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Comm_free(&status_comm_);
}

std::shared_ptr<CallLog> Watchdog::track(GroupInfo group) {
  auto log = std::make_shared<CallLog>(std::move(group));
  std::lock_guard lock(logs_mu_);
  std::erase_if(logs_, [](const std::weak_ptr<CallLog>& w) { return w.expired(); });
  logs_.push_back(log);
  return log;
}

void Watchdog::abort(int code, const std::string& message) {
  if (!aborting_.exchange(true)) {
    std::fprintf(stderr, "moeforge: rank %d: %s\n", world_rank_, message.c_str());
    std::fflush(stderr);
  }
  MPI_Abort(MPI_COMM_WORLD, code);
  std::abort();  // MPI_Abort does not return; this only keeps the promise if it did
}

void Watchdog::serve() {
  try {
    MOE_MPI_CHECK(
        MPI_Irecv(&query_in_, sizeof query_in_, MPI_BYTE, MPI_ANY_SOURCE, kQueryTag, status_comm_, &query_request_));
    auto last_poll = Clock::now();
    while (!stop_) {
      const double call_age = check_deadlines();
      const double since_poll = seconds_since(last_poll);
      if ((since_poll >= kQueryPollS && (call_age < 0 || call_age >= kQuietCallS)) || since_poll >= kMaxAnswerDelayS) {
        serve_queries();
        last_poll = Clock::now();
      }
      std::this_thread::sleep_for(kPollInterval);
    }
    MOE_MPI_CHECK(MPI_Cancel(&query_request_));
    MOE_MPI_CHECK(MPI_Wait(&query_request_, MPI_STATUS_IGNORE));
    // Replies still in flight (an asker that stopped listening) are released to MPI; their
    // buffers are left allocated since MPI may still read them.
    for (auto& pending : replies_in_flight_) {
      MPI_Request_free(&pending->request);
      (void)pending.release();
    }
  } catch (const std::exception& e) {
    abort(1, fmt::format("watchdog service thread failed: {}", e.what()));
  }
}

void Watchdog::serve_queries() {
  for (;;) {
    int done = 0;
    MPI_Status status;
    MOE_MPI_CHECK(MPI_Test(&query_request_, &done, &status));
    if (!done) break;
    answer(status.MPI_SOURCE, query_in_);
    MOE_MPI_CHECK(
        MPI_Irecv(&query_in_, sizeof query_in_, MPI_BYTE, MPI_ANY_SOURCE, kQueryTag, status_comm_, &query_request_));
  }
  std::erase_if(replies_in_flight_, [](const std::unique_ptr<PendingReply>& p) {
    int done = 0;
    MOE_MPI_CHECK(MPI_Test(&p->request, &done, MPI_STATUS_IGNORE));
    return done != 0;
  });
}

void Watchdog::answer(int asker, uint64_t group_id) {
  auto pending = std::make_unique<PendingReply>();
  WireReply& r = pending->reply;
  {
    std::lock_guard lock(logs_mu_);
    for (const auto& weak : logs_) {
      const std::shared_ptr<CallLog> log = weak.lock();
      if (!log) continue;
      const GroupInfo& g = log->group();
      const CallLogSnapshot s = log->snapshot();
      if (g.id == group_id) {
        r.found = 1;
        r.calls = s.calls;
        r.n_records = static_cast<int32_t>(s.records.size());
        for (size_t i = 0; i < s.records.size(); ++i) r.records[i] = to_wire(s.records[i]);
        const auto it = std::find(g.world_ranks.begin(), g.world_ranks.end(), asker);
        if (it != g.world_ranks.end()) {
          r.sent_here = s.sent[it - g.world_ranks.begin()];
          r.received_from_here = s.received[it - g.world_ranks.begin()];
        }
      } else if (const CallRecord* current = s.current(); current && r.n_elsewhere < kMaxElsewhere) {
        WireElsewhere& e = r.elsewhere[r.n_elsewhere++];
        std::snprintf(e.group, sizeof e.group, "%s", g.name.c_str());
        e.call = to_wire(*current);
        e.peer_world_rank = is_p2p(current->op) ? g.world_ranks.at(current->peer) : -1;
      }
    }
  }
  MOE_MPI_CHECK(MPI_Isend(&r, sizeof r, MPI_BYTE, asker, kReplyTag, status_comm_, &pending->request));
  replies_in_flight_.push_back(std::move(pending));
}

double Watchdog::check_deadlines() {
  const auto now = Clock::now();
  std::shared_ptr<CallLog> overdue;
  CallLogSnapshot snapshot;
  double call_age = -1;
  {
    std::lock_guard lock(logs_mu_);
    for (const auto& weak : logs_) {
      std::shared_ptr<CallLog> log = weak.lock();
      if (!log) continue;
      call_age = std::max(call_age, log->call_age_s(now));
      if (!overdue && log->take_overdue(now, &snapshot)) overdue = std::move(log);
    }
  }
  if (overdue) report_timeout(overdue->group(), snapshot);
  return call_age;
}

void Watchdog::report_timeout(const GroupInfo& group, const CallLogSnapshot& self) {
  const std::vector<int> ask = members_to_ask(group, self);
  std::vector<PeerStatus> peers = query(group, ask);
  if (const auto deferral = defer_report(group, self, peers)) {
    // The lower rank reports; it aborts the job within its remaining time plus a query round.
    serve_for(deferral->remaining_s + kQueryTimeoutS + kDeferMarginS);
    peers = query(group, ask);
  }
  abort(kTimeoutExitCode, describe_timeout(group, self, peers, kQueryTimeoutS));
}

std::vector<PeerStatus> Watchdog::query(const GroupInfo& group, const std::vector<int>& ask) {
  std::vector<WireReply> replies(ask.size());
  std::vector<MPI_Request> receives(ask.size(), MPI_REQUEST_NULL);
  std::vector<bool> answered(ask.size(), false);
  query_out_ = group.id;
  for (size_t i = 0; i < ask.size(); ++i) {
    MOE_MPI_CHECK(MPI_Irecv(&replies[i], sizeof(WireReply), MPI_BYTE, ask[i], kReplyTag, status_comm_, &receives[i]));
    MPI_Request send = MPI_REQUEST_NULL;
    // The query is a few bytes sent eagerly; its request is released rather than waited on so a
    // dead member cannot block us (query_out_ outlives it).
    MOE_MPI_CHECK(MPI_Isend(&query_out_, sizeof query_out_, MPI_BYTE, ask[i], kQueryTag, status_comm_, &send));
    MOE_MPI_CHECK(MPI_Request_free(&send));
  }
  const auto start = Clock::now();
  size_t pending = ask.size();
  while (pending > 0 && seconds_since(start) < kQueryTimeoutS) {
    for (size_t i = 0; i < ask.size(); ++i) {
      if (answered[i]) continue;
      int done = 0;
      MOE_MPI_CHECK(MPI_Test(&receives[i], &done, MPI_STATUS_IGNORE));
      if (done) {
        answered[i] = true;
        --pending;
      }
    }
    serve_queries();  // members asking us at the same time must get their answer
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  std::vector<PeerStatus> peers(ask.size());
  for (size_t i = 0; i < ask.size(); ++i) {
    PeerStatus& p = peers[i];
    p.world_rank = ask[i];
    if (!answered[i]) {
      // The answer may land between the last test and the cancel: then it counts.
      MPI_Status status;
      int cancelled = 0;
      MOE_MPI_CHECK(MPI_Cancel(&receives[i]));
      MOE_MPI_CHECK(MPI_Wait(&receives[i], &status));
      MOE_MPI_CHECK(MPI_Test_cancelled(&status, &cancelled));
      if (cancelled) continue;
    }
    const WireReply& r = replies[i];
    p.responded = true;
    p.group_found = r.found != 0;
    p.group.calls = r.calls;
    for (int k = 0; k < std::min<int>(r.n_records, CallLog::kRecords); ++k) {
      p.group.records.push_back(from_wire(r.records[k]));
    }
    p.sent_here = r.sent_here;
    p.received_from_here = r.received_from_here;
    for (int k = 0; k < std::min(r.n_elsewhere, kMaxElsewhere); ++k) {
      const WireElsewhere& e = r.elsewhere[k];
      p.elsewhere.push_back(
          {std::string(e.group, strnlen(e.group, sizeof e.group)), from_wire(e.call), e.peer_world_rank});
    }
  }
  return peers;
}

void Watchdog::serve_for(double seconds) {
  const auto start = Clock::now();
  while (seconds_since(start) < seconds) {
    serve_queries();
    std::this_thread::sleep_for(kPollInterval);
  }
}

}  // namespace moeforge
