// CallLog: collective sequence numbers, per-peer send/recv numbering, the ring of the last 16
// records, the call in progress, and the one-shot deadline check the watchdog relies on.
#include <gtest/gtest.h>

#include <thread>

#include "parallel/call_log.h"
#include "runtime/error.h"

namespace moeforge {
namespace {

GroupInfo group_of(int size, double timeout_s = 60) {
  GroupInfo g;
  g.name = "dp";
  for (int r = 0; r < size; ++r) g.world_ranks.push_back(10 + r);
  g.rank = 1;
  g.id = 7;
  g.timeout_s = timeout_s;
  return g;
}

TEST(CallLog, CollectivesAreNumberedAndSendRecvPerPeer) {
  CallLog log(group_of(3));
  EXPECT_EQ(log.begin(CommOp::kAllReduce, 64), 1);
  log.end();
  EXPECT_EQ(log.begin(CommOp::kSend, 8, 2), 1);
  log.end();
  EXPECT_EQ(log.begin(CommOp::kSend, 8, 2), 2);
  log.end();
  EXPECT_EQ(log.begin(CommOp::kRecv, 8, 0), 1);
  log.end();
  EXPECT_EQ(log.begin(CommOp::kAllGather, 32), 2);
  log.end();
  EXPECT_EQ(log.calls(), 2);
  const CallLogSnapshot s = log.snapshot();
  EXPECT_EQ(s.sent, (std::vector<int64_t>{0, 0, 2}));
  EXPECT_EQ(s.received, (std::vector<int64_t>{1, 0, 0}));
  ASSERT_EQ(s.records.size(), 5u);
  EXPECT_EQ(s.records[1].op, CommOp::kSend);
  EXPECT_EQ(s.records[1].peer, 2);
  EXPECT_EQ(s.records[4].bytes, 32);
  ASSERT_NE(s.collective(2), nullptr);
  EXPECT_EQ(s.collective(2)->op, CommOp::kAllGather);
  EXPECT_EQ(s.collective(3), nullptr);
}

TEST(CallLog, RingKeepsTheLastSixteenOldestFirst) {
  CallLog log(group_of(2));
  for (int i = 0; i < 21; ++i) {
    log.begin(CommOp::kBroadcast, i);
    log.end();
  }
  const CallLogSnapshot s = log.snapshot();
  ASSERT_EQ(s.records.size(), 16u);
  for (int i = 0; i < 16; ++i) {
    EXPECT_EQ(s.records[i].seq, 6 + i);
    EXPECT_EQ(s.records[i].bytes, 5 + i);
    EXPECT_TRUE(s.records[i].done());
    EXPECT_GE(s.records[i].start_age_s, s.records[i].end_age_s);
  }
  EXPECT_EQ(s.current(), nullptr);
}

TEST(CallLog, CallInProgressAndOverdueOnce) {
  CallLog log(group_of(2, 0.05));
  log.begin(CommOp::kAllReduce, 4);
  CallLogSnapshot s;
  EXPECT_FALSE(log.take_overdue(CallLog::Clock::now(), &s));
  std::this_thread::sleep_for(std::chrono::milliseconds(80));
  ASSERT_TRUE(log.take_overdue(CallLog::Clock::now(), &s));
  ASSERT_NE(s.current(), nullptr);
  EXPECT_EQ(s.current()->seq, 1);
  EXPECT_GE(s.current()->start_age_s, 0.05);
  EXPECT_FALSE(log.take_overdue(CallLog::Clock::now(), &s)) << "reported twice";
  log.end();
  // A new call gets its own deadline.
  log.begin(CommOp::kAllReduce, 4);
  std::this_thread::sleep_for(std::chrono::milliseconds(80));
  EXPECT_TRUE(log.take_overdue(CallLog::Clock::now(), &s));
  log.end();
  EXPECT_FALSE(log.take_overdue(CallLog::Clock::now() + std::chrono::seconds(10), &s)) << "no call in progress";
}

TEST(CallLog, OverlappingCallsAreRejected) {
  CallLog log(group_of(2));
  log.begin(CommOp::kAllReduce, 4);
  try {
    log.begin(CommOp::kBarrier, 0);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(),
                 "barrier on group dp: the previous call on this group has not completed (a Comm is used by one "
                 "thread at a time)");
  }
}

}  // namespace
}  // namespace moeforge
