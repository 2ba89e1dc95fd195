// semoe/core/error.hpp: semoe::error and the checks that raise it.
#pragma once

#include <cerrno>
#include <sstream>
#include <stdexcept>
#include <string>
#include <system_error>
#include <utility>

#include "semoe/core/config.hpp"

namespace semoe {

/// Every run-time failure semoe reports: a message that names the argument,
/// the value seen and what was expected.
class error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {

template <class... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}

template <class... Args>
[[noreturn]] void fail(Args&&... args) {
  throw error(concat(std::forward<Args>(args)...));
}

}  // namespace detail
}  // namespace semoe

/// Raise semoe::error with the streamed message when `cond` is false.
#define SEMOE_CHECK(cond, ...)                        \
  do {                                                \
    if (!(cond)) ::semoe::detail::fail(__VA_ARGS__);  \
  } while (0)

/// Debug-only contract on hot paths; compiled out under NDEBUG.
#if defined(NDEBUG) || SEMOE_DEVICE_PASS
#  define SEMOE_EXPECTS(cond) ((void)0)
#else
#  define SEMOE_EXPECTS(cond)                                                          \
    do {                                                                               \
      if (!(cond))                                                                     \
        ::semoe::detail::fail(__FILE__, ":", __LINE__, ": contract violated: ", #cond); \
    } while (0)
#endif

/// A failing POSIX call: file, line, the call and strerror(errno).
#define SEMOE_SYSCALL(expr)                                                              \
  ([&]() -> decltype(auto) {                                                             \
    auto semoe_rc_ = (expr);                                                             \
    if (semoe_rc_ < 0)                                                                   \
      ::semoe::detail::fail(__FILE__, ":", __LINE__, ": ", #expr, ": ",                  \
                            std::system_category().message(errno));                     \
    return semoe_rc_;                                                                    \
  }())
