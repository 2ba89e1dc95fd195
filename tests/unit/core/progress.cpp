#include "semoe/core/progress.hpp"

#include <doctest/doctest.h>

#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

namespace {

/// Everything written to f so far, as lines.
std::vector<std::string> lines_of(std::FILE* f) {
  std::fflush(f);
  std::rewind(f);
  std::string text;
  for (int c; (c = std::fgetc(f)) != EOF;) text.push_back(static_cast<char>(c));
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string l; std::getline(in, l);) lines.push_back(l);
  return lines;
}

}  // namespace

TEST_CASE("progress_bar: off a terminal it prints one plain line per decile") {
  std::FILE* f = std::tmpfile();
  REQUIRE(f);
  {
    semoe::progress_bar bar("epoch 3", 100, f);
    for (int i = 0; i < 100; ++i) bar.tick(1, "loss 0.25");
    bar.finish();
  }
  const auto lines = lines_of(f);
  std::fclose(f);
  // The first tick (1 %), then every 10 % up to 100 %.
  REQUIRE(lines.size() == 11);
  for (int d = 0; d <= 10; ++d) {
    CAPTURE(d);
    const std::string& l = lines[static_cast<std::size_t>(d)];
    CHECK(l.rfind("epoch 3 [", 0) == 0);
    CHECK(l.find(std::to_string(d == 0 ? 1 : d * 10) + "% ") != std::string::npos);
    CHECK(l.find("loss 0.25") != std::string::npos);
    CHECK(l.find('\r') == std::string::npos);
    CHECK(l.find('\x1b') == std::string::npos);
  }
  CHECK(lines.back().find("100/100") != std::string::npos);
  CHECK(lines.back().find("[##############################]") != std::string::npos);
}

TEST_CASE("progress_bar: big steps print once per decile reached, and a zero total is safe") {
  std::FILE* f = std::tmpfile();
  REQUIRE(f);
  {
    semoe::progress_bar bar("load", 1000, f);
    bar.tick(250);  // 25 %
    bar.tick(10);   // still 26 %: no line
    bar.tick(740);  // 100 %
    semoe::progress_bar empty("nothing", 0, f);
    empty.tick();
    empty.finish();
  }
  const auto lines = lines_of(f);
  std::fclose(f);
  REQUIRE(lines.size() == 3);
  CHECK(lines[0].find(" 25% 250/1000") != std::string::npos);
  CHECK(lines[1].find("100% 1000/1000") != std::string::npos);
  CHECK(lines[2].rfind("nothing [", 0) == 0);
}
