// The watchdog's diagnosis of a missed deadline, as pure functions of the call logs: which
// members to ask, whether another member will report instead, and the one message naming the
// call, the group, the members that did not arrive, where they are and where the call sequences
// diverged. Kept free of MPI so the wording is unit-tested with made-up logs.
//
// A collective message reads, on one line:
//   collective timeout after 5.0 s: all_reduce #17 (4096 bytes) on group dp (world ranks 0,1,2,3)
//   on world rank 0; not arrived: world rank 2 (last call on dp: all_reduce #16, completed 5.3 s
//   ago; not in a collective), world rank 3 (in all_gather #17 on dp for 5.0 s; call sequence
//   diverged at #17: all_gather (16384 bytes) there, all_reduce (4096 bytes) here)
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "parallel/call_log.h"

namespace moeforge {

// What a member answered when asked about a group.
struct PeerStatus {
  int world_rank = -1;
  bool responded = false;
  bool group_found = false;  // it has a live group with the asked group's id
  // Its log of that group: calls and records (sent/received are left empty; see below).
  CallLogSnapshot group;
  int64_t sent_here = 0;           // messages it sent to the asking member on that group
  int64_t received_from_here = 0;  // messages it received from the asking member on that group
  // Calls in progress on its other groups.
  struct Elsewhere {
    std::string group;
    CallRecord call;
    int peer_world_rank = -1;  // for send/recv
  };
  std::vector<Elsewhere> elsewhere;
};

// World ranks to ask about the overdue call (self.current()): every other member for a
// collective, the peer for send/recv.
std::vector<int> members_to_ask(const GroupInfo& group, const CallLogSnapshot& self);

// When a member with a lower world rank is in the same call, it has timed out or will within
// `remaining_s`, and reports: the others leave the report to it so the job prints one message.
struct Deferral {
  int world_rank = -1;
  double remaining_s = 0;
};
std::optional<Deferral> defer_report(const GroupInfo& group, const CallLogSnapshot& self,
                                     const std::vector<PeerStatus>& peers);

// The message (without the "moeforge: rank R: " prefix). query_timeout_s is how long members
// were given to answer.
std::string describe_timeout(const GroupInfo& group, const CallLogSnapshot& self, const std::vector<PeerStatus>& peers,
                             double query_timeout_s);

}  // namespace moeforge
