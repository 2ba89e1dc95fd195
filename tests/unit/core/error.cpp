#include "semoe/core/error.hpp"

#include <doctest/doctest.h>
#include <fcntl.h>
#include <unistd.h>

#include <cstring>
#include <stdexcept>
#include <string>

TEST_CASE("semoe::error is a std::runtime_error") {
  CHECK_THROWS_AS(throw semoe::error("x"), std::runtime_error);
  CHECK(std::string(semoe::error("what it says").what()) == "what it says");
}

TEST_CASE("SEMOE_CHECK: silent when true, streams its message when false") {
  int evaluated = 0;
  CHECK_NOTHROW(SEMOE_CHECK(++evaluated == 1, "never"));
  CHECK(evaluated == 1);  // the condition runs once
  const int k = 9;
  CHECK_THROWS_WITH_AS(SEMOE_CHECK(k < 4, "top_k: k = ", k, " exceeds experts = ", 4, " (", 1.5, ")"),
                       "top_k: k = 9 exceeds experts = 4 (1.5)", semoe::error);
  // Usable as a single statement in an unbraced if/else.
  bool ok = false;
  if (k > 0)
    SEMOE_CHECK(true, "no");
  else
    ok = true;
  CHECK_FALSE(ok);
}

TEST_CASE("SEMOE_SYSCALL: returns the result, or names the call and strerror(errno)") {
  const int fd = SEMOE_SYSCALL(::open("/dev/null", O_RDONLY));
  CHECK(fd >= 0);
  CHECK(SEMOE_SYSCALL(::close(fd)) == 0);
  try {
    (void)SEMOE_SYSCALL(::open("/nonexistent-semoe-dir/file", O_RDONLY));
    FAIL("SEMOE_SYSCALL did not throw");
  } catch (const semoe::error& e) {
    const std::string msg = e.what();
    CHECK(msg.find("error.cpp:") != std::string::npos);
    CHECK(msg.find("::open(\"/nonexistent-semoe-dir/file\", O_RDONLY)") != std::string::npos);
    CHECK(msg.find(std::strerror(ENOENT)) != std::string::npos);
  }
}

#ifndef NDEBUG
TEST_CASE("SEMOE_EXPECTS: a debug build reports the failed contract") {
  CHECK_THROWS_WITH_AS(SEMOE_EXPECTS(1 + 1 == 3), doctest::Contains("contract violated: 1 + 1 == 3"), semoe::error);
}
#endif
