#include "parallel/timeout_report.h"

#include <algorithm>

#include "runtime/error.h"

namespace moeforge {
namespace {

// Not-arrived members listed by name before the rest are summarised as a count.
constexpr size_t kMaxListed = 16;

std::string join_ranks(const std::vector<int>& ranks) { return fmt::format("{}", fmt::join(ranks, ",")); }

const CallRecord& current_call(const GroupInfo& group, const CallLogSnapshot& self) {
  const CallRecord* call = self.current();
  MOE_CHECK(call != nullptr, "watchdog: no call in progress on group {} to report", group.name);
  return *call;
}

// "all_reduce #4" or "send #3 to world rank 5" (peer_world_rank: the peer of a send/recv).
std::string call_name(const CallRecord& r, int peer_world_rank) {
  if (r.op == CommOp::kSend) return fmt::format("send #{} to world rank {}", r.seq, peer_world_rank);
  if (r.op == CommOp::kRecv) return fmt::format("recv #{} from world rank {}", r.seq, peer_world_rank);
  return fmt::format("{} #{}", comm_op_name(r.op), r.seq);
}

std::string call_name(const GroupInfo& group, const CallRecord& r) {
  return call_name(r, is_p2p(r.op) ? group.world_ranks.at(r.peer) : -1);
}

// Two members' records of the same collective disagree: a different op, or a different size
// where every member must pass the same.
bool mismatch(const CallRecord& a, const CallRecord& b) {
  return a.op != b.op || (same_bytes_on_every_member(a.op) && a.bytes != b.bytes);
}

// The first collective both logs still hold on which the two members disagree.
std::optional<std::pair<CallRecord, CallRecord>> first_divergence(const CallLogSnapshot& self,
                                                                  const CallLogSnapshot& peer) {
  std::optional<std::pair<CallRecord, CallRecord>> first;
  for (const CallRecord& theirs : peer.records) {
    if (is_p2p(theirs.op)) continue;
    const CallRecord* mine = self.collective(theirs.seq);
    if (mine && mismatch(*mine, theirs) && (!first || theirs.seq < first->first.seq)) first.emplace(theirs, *mine);
  }
  return first;
}

// The member has reached collective `call` (it is in it, or completed it).
bool arrived(const PeerStatus& peer, const CallRecord& call) {
  if (!peer.responded || !peer.group_found) return false;
  if (const CallRecord* theirs = peer.group.collective(call.seq)) return !mismatch(*theirs, call);
  // Far past the call (its record left the ring): only a member that reached it gets there.
  return peer.group.calls > call.seq;
}

// Where a member is: its state on the group, its calls elsewhere, and where its call sequence
// left ours.
std::string whereabouts(const GroupInfo& group, const CallLogSnapshot& self, const PeerStatus& peer,
                        double query_timeout_s) {
  if (!peer.responded) {
    return fmt::format("did not respond within {:.1f} s: the process has ended, or its MPI progress is stuck",
                       query_timeout_s);
  }
  if (!peer.group_found) {
    return fmt::format("has no live group {} with these members: it was destroyed there or not created yet",
                       group.name);
  }
  std::string s;
  const CallRecord* current = peer.group.current();
  if (current) {
    s = fmt::format("in {} on {} for {:.1f} s", call_name(group, *current), group.name, current->start_age_s);
  } else if (!peer.group.records.empty()) {
    const CallRecord& last = peer.group.records.back();
    s = fmt::format("last call on {}: {}, completed {:.1f} s ago", group.name, call_name(group, last), last.end_age_s);
  } else {
    s = fmt::format("no call on {} yet", group.name);
  }
  if (!current) {
    if (peer.elsewhere.empty()) s += "; not in a collective";
    for (const PeerStatus::Elsewhere& e : peer.elsewhere) {
      s += fmt::format("; now in {} on {} for {:.1f} s", call_name(e.call, e.peer_world_rank), e.group,
                       e.call.start_age_s);
    }
  }
  if (auto d = first_divergence(self, peer.group)) {
    const auto& [theirs, mine] = *d;
    s += fmt::format("; call sequence diverged at #{}: {} ({} bytes) there, {} ({} bytes) here", theirs.seq,
                     comm_op_name(theirs.op), theirs.bytes, comm_op_name(mine.op), mine.bytes);
  }
  return s;
}

const PeerStatus* find_peer(const std::vector<PeerStatus>& peers, int world_rank) {
  for (const PeerStatus& p : peers) {
    if (p.world_rank == world_rank) return &p;
  }
  return nullptr;
}

}  // namespace

std::vector<int> members_to_ask(const GroupInfo& group, const CallLogSnapshot& self) {
  const CallRecord& call = current_call(group, self);
  if (is_p2p(call.op)) return {group.world_ranks.at(call.peer)};
  std::vector<int> ranks;
  for (int r = 0; r < static_cast<int>(group.world_ranks.size()); ++r) {
    if (r != group.rank) ranks.push_back(group.world_ranks[r]);
  }
  return ranks;
}

std::optional<Deferral> defer_report(const GroupInfo& group, const CallLogSnapshot& self,
                                     const std::vector<PeerStatus>& peers) {
  const CallRecord& call = current_call(group, self);
  const int me = group.world_ranks.at(group.rank);
  std::optional<Deferral> best;
  for (const PeerStatus& peer : peers) {
    if (!peer.responded || !peer.group_found || peer.world_rank >= me) continue;
    const CallRecord* theirs = peer.group.current();
    if (!theirs) continue;
    // In the same call: the same collective number (whatever op it issued there), or a send/recv
    // with us, so its deadline comes at most `timeout - age` from now.
    const bool same = is_p2p(call.op) ? is_p2p(theirs->op) && theirs->peer == group.rank
                                      : !is_p2p(theirs->op) && theirs->seq == call.seq;
    if (same && (!best || peer.world_rank < best->world_rank)) {
      best = Deferral{peer.world_rank, std::max(0.0, group.timeout_s - theirs->start_age_s)};
    }
  }
  return best;
}

std::string describe_timeout(const GroupInfo& group, const CallLogSnapshot& self, const std::vector<PeerStatus>& peers,
                             double query_timeout_s) {
  const CallRecord& call = current_call(group, self);
  const int me = group.world_ranks.at(group.rank);
  const std::string where =
      fmt::format("on group {} (world ranks {}) on world rank {}", group.name, join_ranks(group.world_ranks), me);
  if (!is_p2p(call.op)) {
    std::vector<std::string> missing;
    size_t unlisted = 0;
    for (const PeerStatus& peer : peers) {
      if (arrived(peer, call)) continue;
      if (missing.size() == kMaxListed) {
        ++unlisted;
        continue;
      }
      missing.push_back(
          fmt::format("world rank {} ({})", peer.world_rank, whereabouts(group, self, peer, query_timeout_s)));
    }
    std::string out = fmt::format("collective timeout after {:.1f} s: {} ({} bytes) {}; not arrived: ", group.timeout_s,
                                  call_name(group, call), call.bytes, where);
    if (missing.empty()) return out + "none (every member is in this call or past it, yet MPI did not complete it)";
    out += fmt::format("{}", fmt::join(missing, ", "));
    if (unlisted) out += fmt::format(", and {} more", unlisted);
    return out;
  }

  const int peer_rank = group.world_ranks.at(call.peer);
  std::string out = fmt::format("point-to-point timeout after {:.1f} s: {} ({} bytes) {}; ", group.timeout_s,
                                call_name(group, call), call.bytes, where);
  const PeerStatus* peer = find_peer(peers, peer_rank);
  PeerStatus silent;
  silent.world_rank = peer_rank;
  std::string details = whereabouts(group, self, peer ? *peer : silent, query_timeout_s);
  if (peer && peer->responded && peer->group_found) {
    // The k-th send from A to B matches B's k-th recv from A: the counts say which side is short.
    details =
        (call.op == CommOp::kRecv ? fmt::format("has sent {} message(s) here; ", peer->sent_here)
                                  : fmt::format("has received {} message(s) from here; ", peer->received_from_here)) +
        details;
  }
  return out + fmt::format("peer: world rank {} ({})", peer_rank, details);
}

}  // namespace moeforge
