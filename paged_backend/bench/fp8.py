"""FP8 on the GPU: checks and timings of the fp8 linear (torch._scaled_mm) and of decode attention over
an fp8 KV cache, next to their bf16 counterparts, in one run (needs CUDA).

    python -m paged_backend.bench.fp8 [--json FILE]

1. checks: Fp8Linear against its fp32 dequantized twin at Llama-3-8B shapes; the fp8 attention kernel
   against the reference (decode, split-K, mixed prefill);
2. linear table: bf16 F.linear vs Fp8Linear (activation quantization included) at decode (M = 256) and
   prefill (M = 8192) batch sizes: weight bytes/s (decode) and TFLOP/s (prefill);
3. decode attention table: 32 q / 8 kv heads, head_dim 128, batch x context, bf16 cache vs fp8 cache:
   achieved bandwidth counting the bytes each cache really holds (fp8: 1 per element) against the
   device-to-device copy bandwidth measured in the same run (CUDA-graph replays, as the engine runs).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from paged_backend import kernels
# the kernel bench's shapes, random paged batches, timing and error measure
from paged_backend.bench.kernels import DEV, HKV, HQ, D, graph_median_ms, paged_batch, rel_err
from paged_backend.bench.roofline import copy_bandwidth
from paged_backend.layers.quant import Fp8Linear, quantize_rows

# Llama-3-8B projections (in, out): qkv, o, gate_up, down.
LINEARS = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}


def _fp8_linear(k: int, n: int) -> tuple[torch.Tensor, Fp8Linear]:
    w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * 0.02
    lin = torch.nn.Linear(k, n, bias=False, device=DEV, dtype=torch.bfloat16)
    lin.weight.data.copy_(w)
    return w, Fp8Linear.from_linear(lin)


def check_linears() -> list[dict]:
    rows = []
    for name, (k, n) in LINEARS.items():
        w, lin = _fp8_linear(k, n)
        for m in (1, 256, 4096):
            x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
            got = lin(x)
            xq, xs = quantize_rows(x)
            twin = (xq.float() @ lin.weight.float().t()) * xs * lin.weight_scale  # same fp8 values, fp32 GEMM
            rows.append(dict(linear=name, m=m, err_vs_fp32_twin=rel_err(got, twin),
                             err_vs_bf16=rel_err(got, F.linear(x, w))))
    return rows


def check_attention() -> list[dict]:
    rows = []
    cases = [("decode b64", [1] * 64, [4096 - 37 * i for i in range(64)]),
             ("decode split b2", [1, 1], [16384, 9001]),
             ("mixed prefill+decode", [512, 1, 1, 300], [2012, 4000, 33, 300])]
    for name, ql, cl in cases:
        b = paged_batch(ql, cl, kv_dtype=torch.float8_e4m3fn)
        got = _attn(b)
        ref = _attn(b, impl="reference")
        rows.append(dict(case=name, rel_err=rel_err(got, ref)))
    return rows


def _attn(b, impl=None, out=None):
    scales = dict(k_scale=0.5, v_scale=0.25) if b["kv_cache"].dtype == torch.float8_e4m3fn else {}
    return kernels.paged_attention(
        b["q"], b["kv_cache"], b["block_tables"], b["seq_lens"], b["query_start_loc"], D**-0.5, out=out,
        max_query_len=b["max_query_len"], max_seq_len=b["max_seq_len"], impl=impl, **scales)


def linear_table() -> list[dict]:
    rows = []
    for name, (k, n) in LINEARS.items():
        w, lin = _fp8_linear(k, n)
        for m in (256, 8192):
            x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
            bf16_ms = graph_median_ms(lambda: F.linear(x, w))
            fp8_ms = graph_median_ms(lambda: lin(x))
            rows.append(dict(linear=name, m=m, bf16_ms=bf16_ms, fp8_ms=fp8_ms, speedup=bf16_ms / fp8_ms,
                             bf16_weight_TBps=n * k * 2 / bf16_ms / 1e9, fp8_weight_TBps=n * k / fp8_ms / 1e9,
                             bf16_TFLOPs=2 * m * n * k / bf16_ms / 1e9, fp8_TFLOPs=2 * m * n * k / fp8_ms / 1e9))
    return rows


def decode_table(copy_tbps: float) -> list[dict]:
    rows = []
    for bsz in (16, 64, 256):
        for ctx in (512, 4096, 16384):
            if bsz * ctx * HKV * D * 2 * 2 > 40e9:
                continue
            row = dict(batch=bsz, context=ctx)
            for label, dt in (("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn)):
                b = paged_batch([1] * bsz, [ctx] * bsz, seed=bsz + ctx, kv_dtype=dt)
                out = torch.empty_like(b["q"])
                ms = graph_median_ms(lambda: _attn(b, out=out))
                nbytes = bsz * ctx * HKV * D * 2 * b["kv_cache"].element_size() + 2 * bsz * HQ * D * 2
                row[f"{label}_us"] = ms * 1e3
                row[f"{label}_copy_fraction"] = nbytes / ms / 1e9 / copy_tbps
                del b
            row["speedup"] = row["bf16_us"] / row["fp8_us"]
            rows.append(row)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None)
    a = p.parse_args()
    report = dict(device=torch.cuda.get_device_name(), torch=torch.__version__)
    report["linear_checks"] = check_linears()
    report["attention_checks"] = check_attention()
    fails = [r for r in report["linear_checks"] if r["err_vs_fp32_twin"] > 1e-2]
    fails += [r for r in report["attention_checks"] if r["rel_err"] > 1e-2]
    for r in report["linear_checks"]:
        print(f"check fp8 linear {r['linear']:8s} M={r['m']:5d}: vs fp32 twin {r['err_vs_fp32_twin']:.1e}, "
              f"vs bf16 (quantization error) {r['err_vs_bf16']:.3f}")
    for r in report["attention_checks"]:
        print(f"check fp8-KV attention {r['case']:22s} rel err {r['rel_err']:.1e}")
    report["copy_TBps"] = copy_tbps = copy_bandwidth(DEV) / 1e12
    print(f"\ncopy bandwidth {copy_tbps:.2f} TB/s")
    report["linears"] = linear_table()
    print(f"{'linear':8s} {'M':>5s} {'bf16 us':>9s} {'fp8 us':>9s} {'speedup':>8s} {'fp8 TFLOP/s':>12s} {'fp8 weight TB/s':>16s}")
    for r in report["linears"]:
        print(f"{r['linear']:8s} {r['m']:5d} {r['bf16_ms'] * 1e3:9.1f} {r['fp8_ms'] * 1e3:9.1f} {r['speedup']:7.2f}x "
              f"{r['fp8_TFLOPs']:12.0f} {r['fp8_weight_TBps']:16.2f}")
    report["decode_attention"] = decode_table(copy_tbps)
    print(f"\n{'batch':>5s} {'ctx':>6s} {'bf16 us':>9s} {'% copy':>7s} {'fp8 us':>9s} {'% copy':>7s} {'speedup':>8s}")
    for r in report["decode_attention"]:
        print(f"{r['batch']:5d} {r['context']:6d} {r['bf16_us']:9.1f} {r['bf16_copy_fraction']:7.1%} "
              f"{r['fp8_us']:9.1f} {r['fp8_copy_fraction']:7.1%} {r['speedup']:7.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    print(f"\n{len(fails)} check(s) failed" if fails else "\nall fp8 checks ok")
    return 1 if fails else 0


if __name__ == "__main__":
    raise SystemExit(main())
