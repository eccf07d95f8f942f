// The narrow C surface over libtorch operations tch does not bind. Tensors cross as tch's handles
// (`torch::Tensor*`, which is `at::Tensor*`); every entry point catches C++ exceptions and returns the
// message (malloc'd, freed by ext_free_error) or NULL on success, so no exception crosses into Rust.
#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>

using at::Tensor;

namespace {

char* error_copy(const char* what) {
  size_t n = std::strlen(what) + 1;
  char* s = static_cast<char*>(std::malloc(n));
  if (s != nullptr) std::memcpy(s, what, n);
  return s;
}

std::vector<Tensor> list(Tensor* const* ts, size_t n) {
  std::vector<Tensor> v;
  v.reserve(n);
  for (size_t i = 0; i < n; i++) v.push_back(*ts[i]);
  return v;
}

template <typename F>
char* guard(F&& f) {
  try {
    f();
    return nullptr;
  } catch (const std::exception& e) {
    return error_copy(e.what());
  } catch (...) {
    return error_copy("unknown C++ exception");
  }
}

}  // namespace

extern "C" {

void ext_free_error(char* e) { std::free(e); }

// AdamW over n parameters in one fused kernel (PyTorch's fused=True path). `steps` are float32 step
// counts already incremented for this update; with found_inf = 1 nothing is changed.
char* ext_fused_adamw(Tensor* const* params, Tensor* const* grads, Tensor* const* exp_avgs,
                      Tensor* const* exp_avg_sqs, Tensor* const* steps, size_t n, double lr,
                      double beta1, double beta2, double weight_decay, double eps,
                      const Tensor* found_inf) {
  return guard([&] {
    std::vector<Tensor> none;
    std::optional<Tensor> inf;
    if (found_inf != nullptr) inf = *found_inf;
    at::_fused_adamw_(list(params, n), list(grads, n), list(exp_avgs, n), list(exp_avg_sqs, n), none,
                      list(steps, n), lr, beta1, beta2, weight_decay, eps, /*amsgrad=*/false,
                      /*maximize=*/false, std::nullopt, inf);
  });
}

// self[i] += weight · (end[i] − self[i]) with one 0-d weight tensor for all i.
char* ext_foreach_lerp_(Tensor* const* self, Tensor* const* end, size_t n, const Tensor* weight) {
  return guard([&] {
    std::vector<Tensor> w(n, *weight);
    at::_foreach_lerp_(list(self, n), list(end, n), w);
  });
}

// The L2 norm of each tensor, written as new handles into out[0..n).
char* ext_foreach_norm(Tensor* const* ts, size_t n, Tensor** out) {
  return guard([&] {
    std::vector<Tensor> norms = at::_foreach_norm(list(ts, n), 2);
    for (size_t i = 0; i < n; i++) out[i] = new Tensor(norms[i]);
  });
}

// ts[i] *= factor, a 0-d tensor (no host read).
char* ext_foreach_mul_(Tensor* const* ts, size_t n, const Tensor* factor) {
  return guard([&] { at::_foreach_mul_(list(ts, n), *factor); });
}

}  // extern "C"
