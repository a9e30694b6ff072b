// The watchdog's diagnosis from made-up call logs: who is asked, who reports, and the exact
// message for members that stalled, diverged, went silent, are busy on another group, or never
// sent the message a recv waits for.
#include <gtest/gtest.h>

#include "parallel/timeout_report.h"

namespace moeforge {
namespace {

GroupInfo dp_group(int rank, int size = 4) {
  GroupInfo g;
  g.name = "dp";
  for (int r = 0; r < size; ++r) g.world_ranks.push_back(r);
  g.rank = rank;
  g.id = 42;
  g.timeout_s = 5.0;
  return g;
}

CallRecord done(int64_t seq, CommOp op, int64_t bytes, double start_age, double end_age, int peer = -1) {
  return CallRecord{seq, bytes, op, peer, start_age, end_age};
}

CallRecord running(int64_t seq, CommOp op, int64_t bytes, double start_age, int peer = -1) {
  return CallRecord{seq, bytes, op, peer, start_age, -1.0};
}

// This member's log: all_reduce #15 and #16 done, all_reduce #17 (4096 bytes) in progress.
CallLogSnapshot self_in_17() {
  CallLogSnapshot s;
  s.calls = 17;
  s.records = {done(15, CommOp::kAllReduce, 4096, 6.0, 5.9), done(16, CommOp::kAllReduce, 4096, 5.5, 5.3),
               running(17, CommOp::kAllReduce, 4096, 5.0)};
  return s;
}

PeerStatus peer(int world_rank, int64_t calls, std::vector<CallRecord> records) {
  PeerStatus p;
  p.world_rank = world_rank;
  p.responded = true;
  p.group_found = true;
  p.group.calls = calls;
  p.group.records = std::move(records);
  return p;
}

TEST(TimeoutReport, StalledAndDivergedMembersAreNamed) {
  const std::vector<PeerStatus> peers{
      peer(1, 17, {done(16, CommOp::kAllReduce, 4096, 5.5, 5.3), running(17, CommOp::kAllReduce, 4096, 5.0)}),
      peer(2, 16, {done(15, CommOp::kAllReduce, 4096, 6.0, 5.9), done(16, CommOp::kAllReduce, 4096, 5.5, 5.3)}),
      peer(3, 17, {done(16, CommOp::kAllReduce, 4096, 5.5, 5.3), running(17, CommOp::kAllGather, 16384, 5.0)})};
  EXPECT_EQ(describe_timeout(dp_group(0), self_in_17(), peers, 2.0),
            "collective timeout after 5.0 s: all_reduce #17 (4096 bytes) on group dp (world ranks 0,1,2,3) on world "
            "rank 0; not arrived: world rank 2 (last call on dp: all_reduce #16, completed 5.3 s ago; not in a "
            "collective), world rank 3 (in all_gather #17 on dp for 5.0 s; call sequence diverged at #17: all_gather "
            "(16384 bytes) there, all_reduce (4096 bytes) here)");
}

TEST(TimeoutReport, SilentMissingAndBusyElsewhere) {
  PeerStatus silent;
  silent.world_rank = 1;
  PeerStatus missing = peer(2, 0, {});
  missing.group_found = false;
  PeerStatus busy =
      peer(3, 16, {done(15, CommOp::kAllReduce, 2048, 6.0, 5.9), done(16, CommOp::kAllReduce, 4096, 5.5, 5.3)});
  busy.elsewhere.push_back({"tp", running(7, CommOp::kAllReduce, 512, 4.9), -1});
  busy.elsewhere.push_back({"pp", running(2, CommOp::kSend, 512, 4.8, 1), 7});
  EXPECT_EQ(describe_timeout(dp_group(0), self_in_17(), {silent, missing, busy}, 2.0),
            "collective timeout after 5.0 s: all_reduce #17 (4096 bytes) on group dp (world ranks 0,1,2,3) on world "
            "rank 0; not arrived: "
            "world rank 1 (did not respond within 2.0 s: the process has ended, or its MPI progress is stuck), "
            "world rank 2 (has no live group dp with these members: it was destroyed there or not created yet), "
            "world rank 3 (last call on dp: all_reduce #16, completed 5.3 s ago; now in all_reduce #7 on tp for "
            "4.9 s; now in send #2 to world rank 7 on pp for 4.8 s; call sequence diverged at #15: all_reduce "
            "(2048 bytes) there, all_reduce (4096 bytes) here)");
}

TEST(TimeoutReport, EveryoneArrivedAndLongLists) {
  // Members in the call, and one past it (a broadcast root may finish first).
  const std::vector<PeerStatus> arrived{
      peer(1, 17, {running(17, CommOp::kAllReduce, 4096, 5.0)}),
      peer(2, 18, {done(17, CommOp::kAllReduce, 4096, 5.0, 4.0), running(18, CommOp::kBarrier, 0, 3.0)}),
      peer(3, 40, {done(40, CommOp::kBarrier, 0, 1.0, 0.5)})};
  EXPECT_EQ(describe_timeout(dp_group(0), self_in_17(), arrived, 2.0),
            "collective timeout after 5.0 s: all_reduce #17 (4096 bytes) on group dp (world ranks 0,1,2,3) on world "
            "rank 0; not arrived: none (every member is in this call or past it, yet MPI did not complete it)");

  std::vector<PeerStatus> silent(19);
  for (int r = 1; r < 20; ++r) silent[r - 1].world_rank = r;
  const std::string message = describe_timeout(dp_group(0, 20), self_in_17(), silent, 2.0);
  EXPECT_NE(message.find("world rank 16 (did not respond"), std::string::npos);
  EXPECT_EQ(message.find("world rank 17 (did not respond"), std::string::npos);
  EXPECT_TRUE(message.ends_with("is stuck), and 3 more")) << message;
}

TEST(TimeoutReport, RecvWaitingForAMessageNeverSent) {
  GroupInfo pp = dp_group(0, 2);
  pp.name = "pp";
  pp.world_ranks = {1, 5};
  CallLogSnapshot self;
  self.records = {running(3, CommOp::kRecv, 4096, 5.0, 1)};
  PeerStatus other = peer(5, 12, {done(12, CommOp::kAllReduce, 8, 7.0, 6.5)});
  other.sent_here = 2;
  other.elsewhere.push_back({"dp", running(30, CommOp::kAllReduce, 64, 4.9), -1});
  EXPECT_EQ(members_to_ask(pp, self), std::vector<int>{5});
  EXPECT_EQ(describe_timeout(pp, self, {other}, 2.0),
            "point-to-point timeout after 5.0 s: recv #3 from world rank 5 (4096 bytes) on group pp (world ranks 1,5) "
            "on world rank 1; peer: world rank 5 (has sent 2 message(s) here; last call on pp: all_reduce #12, "
            "completed 6.5 s ago; now in all_reduce #30 on dp for 4.9 s)");
  PeerStatus silent;
  silent.world_rank = 5;
  EXPECT_EQ(describe_timeout(pp, self, {silent}, 2.0),
            "point-to-point timeout after 5.0 s: recv #3 from world rank 5 (4096 bytes) on group pp (world ranks 1,5) "
            "on world rank 1; peer: world rank 5 (did not respond within 2.0 s: the process has ended, or its "
            "MPI progress is stuck)");
}

TEST(TimeoutReport, MembersToAskAndWhoReports) {
  EXPECT_EQ(members_to_ask(dp_group(2), self_in_17()), (std::vector<int>{0, 1, 3}));
  // World rank 2 waits in #17; ranks 0 and 1 are in #17 too, rank 3 is elsewhere.
  const std::vector<PeerStatus> peers{peer(0, 17, {running(17, CommOp::kAllGather, 4096, 4.5)}),
                                      peer(1, 17, {running(17, CommOp::kAllReduce, 4096, 4.0)}),
                                      peer(3, 16, {done(16, CommOp::kAllReduce, 4096, 5.5, 5.3)})};
  const auto deferral = defer_report(dp_group(2), self_in_17(), peers);
  ASSERT_TRUE(deferral.has_value());
  EXPECT_EQ(deferral->world_rank, 0);
  EXPECT_DOUBLE_EQ(deferral->remaining_s, 0.5);
  // The lowest member in the call reports itself.
  const std::vector<PeerStatus> higher{peer(1, 17, {running(17, CommOp::kAllReduce, 4096, 4.0)})};
  EXPECT_FALSE(defer_report(dp_group(0), self_in_17(), higher).has_value());
  // A lower member that has not arrived, or did not answer, does not report this call.
  PeerStatus silent;
  silent.world_rank = 0;
  EXPECT_FALSE(defer_report(dp_group(2), self_in_17(), {peers[2], silent}).has_value());
}

}  // namespace
}  // namespace moeforge
