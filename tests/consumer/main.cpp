// Uses the installed package: a 2x3 * 3x2 GEMM through semoe::blas.
#include <semoe/core/blas.hpp>
#include <semoe/core/tensor.hpp>

int main() {
  float a[] = {1, 2, 3, 4, 5, 6};
  float b[] = {7, 8, 9, 10, 11, 12};
  float c[4] = {};
  semoe::blas::gemm(semoe::blas::op::n, semoe::blas::op::n, 1.0f,
                    semoe::matrix_view<const float>(semoe::as_matrix(a, 2, 3)),
                    semoe::matrix_view<const float>(semoe::as_matrix(b, 3, 2)), 0.0f,
                    semoe::as_matrix(c, 2, 2));
  const float want[] = {58, 64, 139, 154};
  for (int i = 0; i < 4; ++i)
    if (c[i] != want[i]) return 1;
  return 0;
}
