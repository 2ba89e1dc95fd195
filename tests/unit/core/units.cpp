#include <doctest/doctest.h>

#include "semoe/core/units.hpp"

TEST_CASE("parse_bytes: plain numbers, binary units, and refusals that name the text") {
  CHECK(semoe::parse_bytes("4096") == 4096);
  CHECK(semoe::parse_bytes("64K") == 65536);
  CHECK(semoe::parse_bytes("1.5M") == 1572864);
  CHECK(semoe::parse_bytes("2GiB") == (std::size_t{2} << 30));
  CHECK(semoe::parse_bytes("0") == 0);
  CHECK_THROWS_WITH_AS(semoe::parse_bytes("12Q"), doctest::Contains("unknown unit 'Q'"), semoe::error);
  CHECK_THROWS_WITH_AS(semoe::parse_bytes("lots"), doctest::Contains("'lots' is not a size"), semoe::error);
  CHECK_THROWS_WITH_AS(semoe::parse_bytes("-1M"), doctest::Contains("between 0 and 2^64"), semoe::error);
  CHECK_THROWS_WITH_AS(semoe::parse_bytes("1e30"), doctest::Contains("between 0 and 2^64"), semoe::error);
}
