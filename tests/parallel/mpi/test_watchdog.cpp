// The watchdog end to end: runs tests/parallel/watchdog_victim.cpp under mpirun -np 3 with a 3 s
// deadline and checks that the job exits non-zero within deadline + 10 s and that exactly one
// diagnosis names the call, the group, and the rank that did not arrive and where it is.
//
//   test_parallel_mpi_watchdog <mpirun> <watchdog_victim>   (ctest passes both)
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <chrono>
#include <cstdio>
#include <regex>
#include <string>

namespace {

std::string g_mpirun, g_victim;

constexpr double kTimeoutS = 3.0;

struct JobResult {
  int exit_code = -1;
  double seconds = 0;
  std::string output;  // stdout and stderr of every rank and of mpirun
};

JobResult run_victim(const std::string& scenario) {
  // `timeout` is a backstop so a watchdog that never fires fails the test instead of hanging it.
  const std::string command = "timeout -k 5 60 " + g_mpirun + " -np 3 --oversubscribe " + g_victim + " " + scenario +
                              " " + std::to_string(kTimeoutS) + " 2>&1";
  JobResult r;
  const auto start = std::chrono::steady_clock::now();
  FILE* pipe = popen(command.c_str(), "r");
  if (!pipe) return r;
  char buffer[4096];
  while (size_t n = fread(buffer, 1, sizeof buffer, pipe)) r.output.append(buffer, n);
  const int status = pclose(pipe);
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return r;
}

int count(const std::string& text, const std::string& what) {
  int n = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

// The one line of the diagnosis.
std::string diagnosis(const std::string& output) {
  std::smatch m;
  return std::regex_search(output, m, std::regex("moeforge: rank [0-9]+: [^\n]*timeout[^\n]*")) ? m.str() : "";
}

void expect_aborted_in_time(const JobResult& r) {
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.exit_code, 124) << "the job did not end by itself (the backstop `timeout` killed it)";
  EXPECT_LT(r.seconds, kTimeoutS + 10) << "the job took too long to end";
  EXPECT_EQ(count(r.output, "was not stopped"), 0);
  EXPECT_EQ(count(r.output, "moeforge: rank"), 1) << "expected exactly one diagnosis";
}

TEST(Watchdog, StalledRankIsNamedWithItsLastCall) {
  const JobResult r = run_victim("stall");
  SCOPED_TRACE(r.output);
  expect_aborted_in_time(r);
  const std::string line = diagnosis(r.output);
  EXPECT_TRUE(std::regex_search(
      line, std::regex("^moeforge: rank 0: collective timeout after 3\\.0 s: all_reduce #4 \\(16 bytes\\) on group dp "
                       "\\(world ranks 0,1,2\\) on world rank 0; not arrived: world rank 2 \\(last call on dp: "
                       "all_reduce #3, completed [0-9.]+ s ago; not in a collective\\)$")))
      << line;
}

TEST(Watchdog, DivergedCallIsNamed) {
  const JobResult r = run_victim("diverge");
  SCOPED_TRACE(r.output);
  expect_aborted_in_time(r);
  const std::string line = diagnosis(r.output);
  EXPECT_TRUE(std::regex_search(
      line, std::regex("^moeforge: rank 0: collective timeout after 3\\.0 s: all_reduce #4 \\(16 bytes\\) on group dp "
                       "\\(world ranks 0,1,2\\) on world rank 0; not arrived: world rank 1 \\(in all_gather #4 on dp "
                       "for [0-9.]+ s; call sequence diverged at #4: all_gather \\(16 bytes\\) there, all_reduce "
                       "\\(16 bytes\\) here\\)$")))
      << line;
}

TEST(Watchdog, MissingSendIsNamed) {
  const JobResult r = run_victim("p2p");
  SCOPED_TRACE(r.output);
  expect_aborted_in_time(r);
  const std::string line = diagnosis(r.output);
  EXPECT_TRUE(std::regex_search(
      line, std::regex("^moeforge: rank 0: point-to-point timeout after 3\\.0 s: recv #1 from world rank 1 \\(16 "
                       "bytes\\) on group dp \\(world ranks 0,1,2\\) on world rank 0; peer: world rank 1 \\(has sent 0 "
                       "message\\(s\\) here; last call on dp: all_reduce #3, completed [0-9.]+ s ago; not in a "
                       "collective\\)$")))
      << line;
}

}  // namespace

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s <mpirun> <watchdog_victim>\n", argv[0]);
    return 2;
  }
  g_mpirun = argv[1];
  g_victim = argv[2];
  return RUN_ALL_TESTS();
}
