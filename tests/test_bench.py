"""`paged-backend bench` on the CPU (tiny dummy model) with its transformers peers: the numbers are
meaningless here, but the whole path (dataset, engine, peers, roofline, JSON, PNG) runs."""

from __future__ import annotations

import json

import pytest

from paged_backend.cli import main


def test_bench_throughput_with_peers_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    args = ["bench", "throughput", "--model", "tiny", "--num-prompts", "6", "--output-len", "8", "--input-len",
            "5:40", "--device", "cpu", "--peers", "hf-generate,hf-generate-batch,hf-generate-compiled",
            "--probe-batch", "4", "--probe-prompt-len", "24", "--json", str(out)]
    plot = pytest.importorskip("matplotlib", reason="--plot needs matplotlib") and ["--plot", str(png)]
    assert main(args + plot) == 0
    data = json.loads(out.read_text())
    ours, static, cb, compiled = data["results"]
    assert {r["output_tokens"] for r in (ours, static, cb, compiled)} == {6 * 8}
    assert compiled["warmup_s"] > 0 and compiled["compiled"] is False  # transformers compiles on GPUs only
    assert all(r["seconds"] > 0 and 0 < r["roofline_fraction"] for r in data["results"])
    assert ours["vs_hf-generate"] == pytest.approx(static["seconds"] / ours["seconds"])
    assert data["timeline"][-1][1] == 6 * 8 and data["floor"]["total_s"] > 0
    probe = data["step_probe"]
    assert probe["batch"] == 4 and probe["prefill_steps"] >= 1 and probe["decode_wall_s"] > 0
    assert probe["decode_gpu_s"] is None and probe["prefill_floor_s"] > 0 and probe["decode_floor_s"] > 0
    assert probe["decode_op_floor_s"] >= probe["decode_floor_s"]
    assert data["floor"]["total_per_op_s"] >= data["floor"]["total_s"] and 0 < ours["roofline_per_op_fraction"]
    assert data["rates"]["copy_bytes_per_s"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from paged_backend.bench.plot import write_variants_plot  # gpu_fp8.sh's one PNG of several reports

    write_variants_plot(str(tmp_path / "v.png"), [data, data])
    assert (tmp_path / "v.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "paged-backend" in printed and "hf-generate-batch" in printed and "roofline" in printed
    assert "decode step at batch 4" in printed and "prefill 4 x 24 tokens" in printed


def test_bench_step_probe_fits_its_batch_to_the_kv_cache(tmp_path, capsys):
    # 40 blocks of 16 tokens; a probe sequence holds 24 + 128 tokens (10 blocks): 8 would preempt each other
    out = tmp_path / "r.json"
    kv_bytes = 40 * 16 * 2 * 2 * 2 * 16 * 4  # blocks x tokens x layers x KV heads x (K, V) x head_dim x fp32
    assert main(["bench", "throughput", "--model", "tiny", "--num-prompts", "3", "--output-len", "4", "--input-len",
                 "8", "--device", "cpu", "--peers", "", "--max-model-len", "256", "--kv-cache-memory", str(kv_bytes),
                 "--probe-batch", "8", "--probe-prompt-len", "24", "--json", str(out)]) == 0
    probe = json.loads(out.read_text())["step_probe"]
    assert probe["batch"] == 3 and probe["decode_wall_s"] > 0
    assert "do not fit the KV cache (40 blocks): probing at batch 3" in capsys.readouterr().out


def test_bench_latency_and_bad_arguments(tmp_path, capsys):
    out = tmp_path / "l.json"
    assert main(["bench", "latency", "--model", "tiny", "--batch-size", "3", "--input-len", "12", "--output-len",
                 "6", "--num-iters", "2", "--device", "cpu", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert len(data["runs"]) == 2 and data["median_s"] > 0 and data["median_ttft_s"] > 0
    assert main(["bench", "throughput", "--model", "tiny", "--peers", "vllm", "--device", "cpu"]) == 2
    assert "unknown peer" in capsys.readouterr().err


def test_step_probe_names_the_kernels_a_decode_step_spends_its_time_in():
    from types import SimpleNamespace

    import torch

    from paged_backend.bench.step_probe import OTHER_KERNELS, _kernel_times, _short_name, describe

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    event = lambda name, us, dev=cuda: SimpleNamespace(  # noqa: E731
        name=name, device_type=dev, time_range=SimpleNamespace(start=0.0, end=us))
    prof = SimpleNamespace(events=lambda: [event("void gemm<x>(p)", 30.0), event("_attn", 50.0), event("gemm<y>", 10.0),
                                           event("_rope", 4.0), event("_norm", 2.0), event("aten::mm", 99.0, cpu)])
    assert _kernel_times(prof, steps=2, top=2) == [("_attn", 25e-6), ("gemm", 20e-6), (OTHER_KERNELS, 3e-6)]

    assert _short_name("void cutlass::Kernel2<cutlass_80_tensorop_bf16_gemm>(Params)") == "cutlass::Kernel2"
    assert _short_name("_paged_attention_decode_kernel") == "_paged_attention_decode_kernel"
    probe = dict(batch=256, decode_context=576, decode_wall_s=3.1e-3, decode_gpu_s=3.0e-3, decode_floor_s=1.7e-3,
                 decode_op_floor_s=1.9e-3, prefill_s=0.5, prefill_steps=16, prefill_floor_s=0.33, prompt_len=512,
                 decode_kernels=[("_paged_attention_decode_kernel", 1.5e-3), ("sm90_gemm", 0.9e-3)])
    lines = describe(probe)
    assert lines[-1] == ("decode step GPU time by kernel: _paged_attention_decode_kernel 1.500 ms (50%), "
                         "sm90_gemm 0.900 ms (30%)")
    del probe["decode_kernels"]
    assert len(describe(probe)) == 2
    probe["prefill_kernels"] = [("_paged_attn_kernel", 3.125e-3)]  # of 31.25 ms a prefill step
    assert describe(probe)[-1] == "prefill step GPU time by kernel: _paged_attn_kernel 3.12 ms (10%)"


def test_per_operation_decode_floor_adds_each_operations_longer_side():
    """Linears compute-bound (their FLOPs outlast their bytes) and attention memory-bound: the per-operation
    floor adds the two longer sides; the whole-step floor takes the longer of the step's totals."""
    from paged_backend.bench.roofline import ModelCost, Rates, decode_step_floor_seconds, decode_step_op_floor_seconds

    cost = ModelCost(weight_bytes=1000, matmul_params=400, lm_head_params=100, kv_bytes_per_token=10,
                     attn_flops_per_pair=2)
    rates = Rates(copy_bytes_per_s=1000.0, matmul_flops_per_s=100_000.0)
    ctx = [50] * 100  # 100 sequences of 50 tokens: 5000 cached tokens
    linears = max(1000 / 1000, 100 * 2 * 500 / 100_000)  # bytes 1 s, FLOPs 1 s -> 1 s
    attention = max(10 * 5000 / 1000, 2 * 5000 / 100_000)  # bytes 50 s, FLOPs 0.1 s
    assert decode_step_op_floor_seconds(cost, ctx, rates) == pytest.approx(linears + attention)
    whole = max((1000 + 10 * 5000) / 1000, (100 * 2 * 500 + 2 * 5000) / 100_000)
    assert decode_step_floor_seconds(cost, ctx, rates) == pytest.approx(whole)
    heavy = Rates(copy_bytes_per_s=1000.0, matmul_flops_per_s=10_000.0)  # now the linears' FLOPs take 10 s
    assert decode_step_op_floor_seconds(cost, ctx, heavy) == pytest.approx(10 + 50)
    assert decode_step_floor_seconds(cost, ctx, heavy) == pytest.approx(51)
