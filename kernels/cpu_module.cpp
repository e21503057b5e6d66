// The CPU extension's Python bindings: cpu_linear.cpp (small-batch matmul) and cpu_fused.cpp (element-wise ops).

#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>

#include <string>
#include <tuple>

at::Tensor small_rows_linear(const at::Tensor& x, const at::Tensor& w);
std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps,
                                            const c10::optional<at::Tensor>& residual, bool gemma);
at::Tensor gated_activation(const at::Tensor& x, const std::string& activation);
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("small_rows_linear", &small_rows_linear, "x [M, K] @ w [N, K]^T, fp32, for small M");
  m.def("rms_norm", &rms_norm, "(norm, x + residual) of contiguous fp32 rows");
  m.def("gated_activation", &gated_activation, "act(gate) * up of contiguous fp32 [.., 2F]");
  m.def("rotary", &rotary, "neox rotary of fp32 x [T, H, D] by cos / sin [T, D/2]");
}
