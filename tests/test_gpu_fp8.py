"""FP8 on the GPU: the fp8 linear (our Triton GEMM up to 256 rows, `_scaled_mm` above) at real shapes against
its fp32 twin, and the engine with fp8
weights and an fp8 KV cache under CUDA graphs. (The fp8 attention kernels' GPU checks are in
test_kernels.py, test_gpu_fp8_kv_matches_reference.)"""

from __future__ import annotations

import pytest
import torch

from paged_backend import kernels
from paged_backend.layers.quant import Fp8Linear, quantize_rows

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("k,n", [(2048, 3072), (4096, 28672), (14336, 4096), (576, 1536)])
@pytest.mark.parametrize("m", [1, 37, 256, 257, 4096])
def test_gpu_fp8_linear_matches_fp32_twin(k, n, m):
    lin = torch.nn.Linear(k, n, bias=True, device="cuda", dtype=torch.bfloat16)
    torch.nn.init.normal_(lin.weight, std=0.02)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    fp8 = Fp8Linear.from_linear(lin)
    got = fp8(x)
    xq, xs = quantize_rows(x)
    # the same fp8 values in an fp32 GEMM
    twin = kernels.fp8_matmul(xq, xs, fp8.weight, fp8.weight_scale, torch.float32, impl="reference")
    twin = twin + lin.bias.float()
    err = ((got.float() - twin).norm() / twin.norm()).item()
    assert err < 1e-2, err  # bf16 output rounding and accumulation order only
    quant_err = ((got.float() - lin(x).float()).norm() / lin(x).float().norm()).item()
    assert quant_err < 0.06, quant_err  # e4m3 weights and activations against bf16


@pytest.mark.parametrize("m", [5, 300])
def test_gpu_fp8_linear_odd_shapes(m):
    """N and K not multiples of 16: our GEMM up to 256 rows, the widened fp32 path above (which
    `_scaled_mm` cannot take); same arithmetic."""
    lin = torch.nn.Linear(72, 40, bias=False, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(m, 72, device="cuda", dtype=torch.bfloat16)
    fp8 = Fp8Linear.from_linear(lin)
    assert ((fp8(x).float() - lin(x).float()).norm() / lin(x).float().norm()).item() < 0.06


@pytest.mark.parametrize("m", [1, 16, 64, 100, 128, 256])
@pytest.mark.parametrize("k,n", [(2048, 3072), (2048, 2048), (8192, 2048), (4096, 28672), (14336, 4096)])
def test_gpu_fp8_gemm_matches_cublas(m, k, n):
    """Our Triton GEMM (every split-K and tile choice the model shapes make) against `_scaled_mm`."""
    g = torch.Generator(device="cuda").manual_seed(m + k + n)
    x_q, x_s = kernels.quantize_fp8_rows(torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g))
    w_q, w_s = kernels.quantize_fp8_rows(torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g))
    w_s = w_s.reshape(1, -1)
    got = kernels.fp8_matmul(x_q, x_s, w_q, w_s, torch.bfloat16, impl="triton")
    want = torch._scaled_mm(x_q, w_q.t(), scale_a=x_s, scale_b=w_s, out_dtype=torch.bfloat16)
    twin = kernels.fp8_matmul(x_q, x_s, w_q, w_s, torch.float32, impl="reference")
    assert ((got.float() - twin).norm() / twin.norm()).item() < 4e-3  # bf16 rounding of the output only
    assert ((got.float() - want.float()).norm() / twin.norm()).item() < 4e-3


def test_gpu_engine_fp8(tiny_model_dir):
    from paged_backend import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    prompts = ["Hello there", "One two three four", "The quick brown fox"]
    llm = LLM(model=str(tiny_model_dir("llama")), dtype="bfloat16", max_model_len=256, quantization="fp8",
              kv_cache_dtype="fp8", max_num_seqs=8)
    graphs = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert llm.engine.runner.graphs is not None
    s = llm.stats()
    assert (s.quantization, s.kv_cache_dtype) == ("fp8", "float8_e4m3fn")
    llm.shutdown()
    eager = LLM(model=str(tiny_model_dir("llama")), dtype="bfloat16", max_model_len=256, quantization="fp8",
                kv_cache_dtype="fp8", max_num_seqs=8, enforce_eager=True)
    plain = [o.outputs[0].token_ids for o in eager.generate(prompts, params, use_tqdm=False)]
    assert all(len(t) == 16 for t in graphs)
    # The first token comes out of the prefill, the same launches in both; later ones may differ in split-K
    # count between graph and eager decode, and a random tiny model is full of near-ties.
    assert [t[:1] for t in graphs] == [t[:1] for t in plain]


def test_gpu_fp8_fused_input_quantization_changes_nothing(tiny_model_dir, monkeypatch):
    """Norms and gated activations quantizing for their fp8 linear (fuse_fp8_inputs) under CUDA graphs: the same
    tokens and logprobs as the separate quantize kernel (up to the fused RMSNorm's summation order)."""
    import paged_backend.runtime.shard as shard
    from paged_backend import LLM, SamplingParams

    kw = dict(model=str(tiny_model_dir("llama")), dtype="bfloat16", max_model_len=256, quantization="fp8",
              max_num_seqs=8, gpu_memory_utilization=0.3)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = ["Hello there", "One two three four", "The quick brown fox"]
    runs = []
    for fuse in (True, False):
        if not fuse:
            monkeypatch.setattr(shard, "fuse_fp8_inputs", lambda model: 0)
        with LLM(**kw) as llm:
            assert llm.engine.runner.model.model.layers[0].input_layernorm.fp8_output == fuse
            runs.append([o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)])
    for f, p in zip(*runs):
        assert f.token_ids == p.token_ids
        assert abs(f.cumulative_logprob - p.cumulative_logprob) < 1e-2


def test_gpu_fp8_gemm_choice_follows_graph_capture():
    """Up to 256 rows our GEMM runs where the pass is captured into a CUDA graph (kernels.for_cuda_graph),
    cuBLAS in eager steps (cheaper to launch); above 256 rows cuBLAS either way."""
    for m in (64, 256, 300):
        x_q, x_s = kernels.quantize_fp8_rows(torch.randn(m, 2048, device="cuda", dtype=torch.bfloat16))
        w_q, w_s = kernels.quantize_fp8_rows(torch.randn(3072, 2048, device="cuda", dtype=torch.bfloat16))
        w_s = w_s.reshape(1, -1)
        ours = kernels.fp8_matmul(x_q, x_s, w_q, w_s, torch.bfloat16, impl="triton")
        cublas = torch._scaled_mm(x_q, w_q.t(), scale_a=x_s, scale_b=w_s, out_dtype=torch.bfloat16)
        assert torch.equal(kernels.fp8_matmul(x_q, x_s, w_q, w_s, torch.bfloat16), cublas)
        with kernels.for_cuda_graph():
            got = kernels.fp8_matmul(x_q, x_s, w_q, w_s, torch.bfloat16)
        assert torch.equal(got, ours if m <= 256 else cublas)
