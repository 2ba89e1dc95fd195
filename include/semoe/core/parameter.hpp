// semoe/core/parameter.hpp: a named reference to a parameter and its gradient,
// the currency between layers, optimizers and communicators.
#pragma once

#include <functional>
#include <span>
#include <string>
#include <vector>

#include "semoe/core/config.hpp"

namespace semoe {

/// Dense parameters are replicated on every data-parallel rank and their
/// gradients are reduced; expert parameters live with their expert.
enum class param_kind { dense, expert };

/// A replicated parameter is the same on every data-parallel rank and its
/// gradient is summed over them. A sharded one (a column slice of a
/// partitioned embedding) is this rank's own piece: its gradient is already
/// complete, it is never all-reduced, and its squared norm is summed over the
/// ranks in a global-norm clip.
enum class param_scope { replicated, sharded };

template <class T>
struct param_ref {
  using value_type = T;
  std::string name;
  std::span<T> value;
  std::span<T> grad;
  param_kind kind = param_kind::dense;
  param_scope scope = param_scope::replicated;
};

template <class T>
using param_list = std::vector<param_ref<T>>;

}  // namespace semoe
