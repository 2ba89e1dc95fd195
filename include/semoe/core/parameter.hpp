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

template <class T>
struct param_ref {
  using value_type = T;
  std::string name;
  std::span<T> value;
  std::span<T> grad;
  param_kind kind = param_kind::dense;
};

template <class T>
using param_list = std::vector<param_ref<T>>;

}  // namespace semoe
