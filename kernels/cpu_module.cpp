// The CPU extension's Python bindings: cpu_linear.cpp (small-batch matmul), cpu_fused.cpp (element-wise ops),
// cpu_attention.cpp (decode attention), cpu_prefill.cpp (prompt attention), cpu_sampling.cpp (greedy sampling).

#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>

#include <string>
#include <tuple>

#include "cpu_vec.h"

at::Tensor small_rows_linear(const at::Tensor& x, const at::Tensor& w);
std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps,
                                            const c10::optional<at::Tensor>& residual, bool gemma);
at::Tensor gated_activation(const at::Tensor& x, const std::string& activation);
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& ctx,
                            double scale);
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale);
std::tuple<at::Tensor, at::Tensor> greedy_sample(const at::Tensor& logits);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("small_rows_linear", &small_rows_linear, "x [M, K] @ w [N, K]^T, fp32, for small M");
  m.def("rms_norm", &rms_norm, "(norm, x + residual) of contiguous fp32 rows");
  m.def("gated_activation", &gated_activation, "act(gate) * up of contiguous fp32 [.., 2F]");
  m.def("rotary", &rotary, "neox rotary of fp32 x [T, H, D] by cos / sin [T, D/2]");
  m.def("decode_attention", &decode_attention, "q [B, Hkv, G, D] against the first ctx[b] keys of k, v [B, S, Hkv, D]");
  m.def("prefill_attention", &prefill_attention, "causal q [M, Hkv, G, D] (the last M positions) against k, v [S, Hkv, D]");
  m.def("greedy_sample", &greedy_sample, "(argmax, its log-probability) of each row of contiguous fp32 logits");
  m.attr("ATTENTION_HEAD_DIMS") = pybind11::make_tuple(4 * LANES, 8 * LANES, 16 * LANES);
}
