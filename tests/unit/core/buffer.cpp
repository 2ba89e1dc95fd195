#include "semoe/core/buffer.hpp"

#include <doctest/doctest.h>

#include <cstdint>
#include <utility>

using semoe::buffer;
using semoe::index_t;
using semoe::matrix;
using semoe::memory_ledger;

namespace {

bool aligned64(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 64 == 0; }

/// Ledger bytes relative to the start of a test (the ledger is process-wide).
struct ledger_delta {
  std::size_t base = memory_ledger::instance().current();
  std::size_t now() const { return memory_ledger::instance().current() - base; }
};

}  // namespace

TEST_CASE_TEMPLATE("buffer: storage is 64-byte aligned for every size", T, char, float, double) {
  for (index_t n : {1, 3, 15, 16, 17, 63, 64, 65, 1000}) {
    buffer<T> b(n);
    CHECK(aligned64(b.data()));
    CHECK(b.size() == n);
    CHECK(b.bytes() == static_cast<std::size_t>(n) * sizeof(T));
  }
  buffer<T> empty;
  CHECK(empty.data() == nullptr);
  CHECK(empty.empty());
}

TEST_CASE("buffer: the ledger counts live bytes through alloc, resize, copy, move and free") {
  ledger_delta d;
  {
    buffer<float> a(100);
    CHECK(d.now() == 400);
    a.resize_discard(100);  // same size: no reallocation
    CHECK(d.now() == 400);
    const float* p = a.data();
    a.resize_discard(100);
    CHECK(a.data() == p);
    a.resize_discard(10);
    CHECK(d.now() == 40);

    buffer<float> b(a);  // copy allocates
    CHECK(d.now() == 80);
    buffer<float> c(std::move(b));  // move does not
    CHECK(d.now() == 80);
    CHECK(b.data() == nullptr);
    CHECK(b.size() == 0);

    buffer<float> e(3);
    CHECK(d.now() == 92);
    e = c;  // copy-assign: e's 12 bytes go, 40 come
    CHECK(d.now() == 120);
    e = std::move(a);  // move-assign: e's old 40 bytes are freed
    CHECK(d.now() == 80);
    CHECK(a.empty());

    c.release();
    CHECK(d.now() == 40);
    c.resize_discard(0);
    CHECK(d.now() == 40);
    CHECK_THROWS_AS(c.resize_discard(-1), semoe::error);
  }
  CHECK(d.now() == 0);
}

TEST_CASE("memory_ledger: the peak is a high-water mark until reset") {
  auto& ledger = memory_ledger::instance();
  ledger.reset_peak();
  const std::size_t base = ledger.current();
  CHECK(ledger.peak() == base);
  {
    buffer<double> a(1000);
    {
      buffer<double> b(500);
      CHECK(ledger.peak() == base + 12000);
    }
    CHECK(ledger.current() == base + 8000);
    CHECK(ledger.peak() == base + 12000);
    ledger.reset_peak();
    CHECK(ledger.peak() == base + 8000);
  }
  CHECK(ledger.current() == base);
  CHECK(ledger.peak() == base + 8000);
}

TEST_CASE("buffer: contents survive copy and move; fill, zero and assign") {
  buffer<int> a(5, 7);
  for (int x : a) CHECK(x == 7);
  a[2] = 9;
  buffer<int> b = a;
  CHECK(b.data() != a.data());
  CHECK(b[2] == 9);
  b[2] = 1;
  CHECK(a[2] == 9);  // deep copy

  const int* p = a.data();
  buffer<int> c = std::move(a);
  CHECK(c.data() == p);
  CHECK(c[2] == 9);

  c.zero();
  for (int x : c) CHECK(x == 0);
  c.fill(-3);
  for (int x : c) CHECK(x == -3);
  c.assign(8, 4);
  CHECK(c.size() == 8);
  for (int x : c) CHECK(x == 4);
  CHECK(c.span().size() == 8);
  CHECK(static_cast<const buffer<int>&>(c).span().data() == c.data());

  buffer<int> empty;
  empty.zero();  // no-ops on an empty buffer
  empty.fill(1);
  CHECK(empty.begin() == empty.end());
}

TEST_CASE("buffer::matrix and matrix: row-major views over owned storage") {
  buffer<float> b(12);
  for (index_t i = 0; i < 12; ++i) b[i] = float(i);
  auto m = b.matrix(3, 4);
  CHECK(m.rows() == 3);
  CHECK(m.cols() == 4);
  CHECK(m(2, 1) == 9.0f);
  const auto& cb = b;
  semoe::matrix_view<const float> cm = cb.matrix(4, 3);
  CHECK(cm(1, 0) == 3.0f);

  ledger_delta d;
  matrix<double> x(3, 5);
  CHECK(d.now() == 3 * 5 * sizeof(double));
  CHECK(x.rows() == 3);
  CHECK(x.cols() == 5);
  CHECK(x.bytes() == 120);
  CHECK(aligned64(x.data()));
  x.fill(2.0);
  x(1, 4) = 5.0;
  CHECK(x.data()[9] == 5.0);
  semoe::matrix_view<double> v = x;
  CHECK(v(1, 4) == 5.0);
  CHECK(v.data() == x.data());
  const matrix<double>& cx = x;
  semoe::matrix_view<const double> cv = cx;
  CHECK(cv(0, 0) == 2.0);
  x.zero();
  CHECK(x(1, 4) == 0.0);
  x.resize(2, 2);
  CHECK(x.span().size() == 4);
  CHECK(d.now() == 4 * sizeof(double));
  CHECK_THROWS_AS(x.resize(-1, 2), semoe::error);
}
