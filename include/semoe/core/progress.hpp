// semoe/core/progress.hpp: a progress bar for long runs. On a terminal it
// redraws one line; elsewhere (CI logs, pipes) it prints a line every 10 %.
#pragma once

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <string>

#include "semoe/core/config.hpp"

namespace semoe {

class progress_bar {
 public:
  progress_bar(std::string label, index_t total, std::FILE* out = stderr)
      : label_(std::move(label)), total_(total > 0 ? total : 1), out_(out),
        tty_(::isatty(::fileno(out)) == 1), start_(clock::now()) {}

  /// Advance by n and set the trailing status text (e.g. "loss 0.41").
  void tick(index_t n = 1, const std::string& status = {}) {
    done_ += n;
    status_ = status;
    const int decile = static_cast<int>(10 * done_ / total_);
    const auto now = clock::now();
    if (tty_) {
      if (now - last_draw_ > std::chrono::milliseconds(100) || done_ >= total_) draw(now, '\r');
    } else if (decile != last_decile_) {
      draw(now, '\n');
    }
    last_decile_ = decile;
  }

  void finish() {
    if (tty_) std::fputc('\n', out_);
    std::fflush(out_);
  }

  double seconds() const { return std::chrono::duration<double>(clock::now() - start_).count(); }

 private:
  using clock = std::chrono::steady_clock;

  void draw(clock::time_point now, char end) {
    last_draw_ = now;
    const double frac = static_cast<double>(done_) / static_cast<double>(total_);
    const double elapsed = seconds();
    const double eta = frac > 0 ? elapsed * (1 - frac) / frac : 0;
    constexpr int width = 30;
    const int filled = static_cast<int>(frac * width + 0.5);
    std::string bar(static_cast<std::size_t>(filled), '#');
    bar.resize(width, '.');
    if (tty_) std::fputc('\r', out_);
    std::fprintf(out_, "%s [%s] %3d%% %lld/%lld %.1fs eta %.1fs %s%s", label_.c_str(), bar.c_str(),
                 static_cast<int>(frac * 100), static_cast<long long>(done_),
                 static_cast<long long>(total_), elapsed, eta, status_.c_str(), tty_ ? "\x1b[K" : "");
    if (end == '\n') std::fputc('\n', out_);
    std::fflush(out_);
  }

  std::string label_;
  index_t total_, done_ = 0;
  std::FILE* out_;
  bool tty_;
  clock::time_point start_, last_draw_{};
  std::string status_;
  int last_decile_ = -1;
};

}  // namespace semoe
