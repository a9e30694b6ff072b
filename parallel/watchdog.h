// Watchdog: deadlines for blocking calls, and the diagnosis when one is missed.
//
// One per process (owned by MpiRuntime). It holds the CallLog of every live MpiComm and runs one
// service thread that
//  - checks every kPollInterval whether a call in progress has run past its group's deadline. If
//    so it asks the group's members (each gets kQueryTimeoutS to answer; silence means a dead
//    process or stuck MPI progress), prints one message (parallel/timeout_report.h) and aborts
//    the job with MPI_Abort. When a member with a lower world rank is in the same call, it will
//    time out too and print the same diagnosis, so this rank waits for it to abort the job and
//    reports only if that does not happen: a stuck collective produces one message, not one per
//    rank;
//  - answers status queries from other ranks, on its own duplicate of MPI_COMM_WORLD: for the
//    asked group, the log (sequence number, call in progress, recent records, send/recv counts
//    with the asker), plus the calls in progress on its other groups.
//
// Why a thread watching blocking MPI calls, rather than non-blocking calls polled to a deadline
// by the caller: Open MPI's non-blocking collectives (libnbc) use other algorithms than the
// blocking ones (coll/tuned); on 2 ranks MPI_Iallreduce + MPI_Wait took 1.5-2x as long as
// MPI_Allreduce at 1, 16 and 64 MiB (medians of alternating calls), and polling with MPI_Test
// instead of MPI_Wait did not help: far from the <= 5% overhead goal. The blocking call is
// untouched here; a call costs two uncontended mutex operations and two clock reads.
//
// Why the service thread rarely calls MPI: every MPI_Test it makes enters Open MPI's progress
// engine next to the training thread's calls. Measured on 2 ranks with a 64 MiB MPI_Allreduce on
// a loaded machine, a thread testing every 1 ms made the all-reduce 50% slower (median), every
// 10 ms 25-35%, every 100 ms about 5%. So deadlines are checked every kPollInterval without MPI,
// and queries are polled every kQueryPollS only while this process is outside MPI calls or in a
// call older than kQuietCallS (a stuck one), and at least every kMaxAnswerDelayS (back-to-back
// calls). Answers thus come within ~1 s, well inside kQueryTimeoutS.
//
// Needs MPI_THREAD_MULTIPLE. stop() must run before MPI_Finalize.
#pragma once

#include <mpi.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "parallel/call_log.h"
#include "parallel/timeout_report.h"

namespace moeforge {

class Watchdog {
 public:
  // Exit code of a job aborted on a missed deadline.
  static constexpr int kTimeoutExitCode = 3;
  // How long a member gets to answer a status query.
  static constexpr double kQueryTimeoutS = 2.0;
  // How often the service thread checks deadlines, and how it polls for queries (see above).
  static constexpr std::chrono::milliseconds kPollInterval{10};
  static constexpr double kQueryPollS = 0.1;
  static constexpr double kQuietCallS = 0.5;
  static constexpr double kMaxAnswerDelayS = 1.0;

  // Collective over MPI_COMM_WORLD (duplicates it for the status traffic); starts the service.
  Watchdog();
  ~Watchdog();
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

  // Ends the service thread and frees its communicator. Idempotent; before MPI_Finalize.
  void stop();

  int world_rank() const { return world_rank_; }

  // A new group's log. The group is answered for in status queries and its calls are held to
  // group.timeout_s for as long as the returned log lives.
  std::shared_ptr<CallLog> track(GroupInfo group);
  // Distinct on every call in this process; with the world rank it makes group ids unique.
  uint64_t next_group_serial() { return ++group_serial_; }

  // Prints "moeforge: rank R: <message>" to stderr (once per process, whichever thread comes
  // first) and aborts every rank with MPI_Abort(MPI_COMM_WORLD, code).
  [[noreturn]] void abort(int code, const std::string& message);

 private:
  struct PendingReply;

  void serve();
  void serve_queries();
  void answer(int asker, uint64_t group_id);
  // Reports an overdue call if there is one; returns the age of the call in progress (-1: none).
  double check_deadlines();
  [[noreturn]] void report_timeout(const GroupInfo& group, const CallLogSnapshot& self);
  std::vector<PeerStatus> query(const GroupInfo& group, const std::vector<int>& ask);
  // Keeps answering queries for `seconds`.
  void serve_for(double seconds);

  int world_rank_ = 0;
  MPI_Comm status_comm_ = MPI_COMM_NULL;
  std::atomic<uint64_t> group_serial_{0};
  std::atomic<bool> stop_{false};
  std::atomic<bool> aborting_{false};

  std::mutex logs_mu_;
  std::vector<std::weak_ptr<CallLog>> logs_;

  // Service-thread state.
  MPI_Request query_request_ = MPI_REQUEST_NULL;
  uint64_t query_in_ = 0;   // the asked group id of the query being received
  uint64_t query_out_ = 0;  // the group id this rank asks about (kept alive for Isend)
  std::vector<std::unique_ptr<PendingReply>> replies_in_flight_;
  std::thread thread_;
};

}  // namespace moeforge
