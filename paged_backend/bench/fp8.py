"""FP8 on the GPU: checks and timings of the fp8 linear (kernels.fp8_matmul) and of decode attention over
an fp8 KV cache, next to their bf16 counterparts, in one run (needs CUDA).

    python -m paged_backend.bench.fp8 [--json FILE] [--attention-only] [--base-kernel FILE] [--sweep]

1. checks: Fp8Linear against its fp32 dequantized twin at Llama-3-8B shapes; the fp8 attention kernel
   against the reference (decode, split-K, mixed prefill);
2. linear table: bf16 F.linear vs Fp8Linear (activation quantization included) at decode (M = 256) and
   prefill (M = 8192) batch sizes: weight bytes/s (decode) and TFLOP/s (prefill);
3. decode attention table: 32 q / 8 kv heads, head_dim 64 (Llama-3.2-1B) and 128 (Llama-3-8B), batch x
   context plus "A" (256 sequences with workload A's mid-decode contexts), bf16 cache vs fp8 cache:
   achieved bandwidth counting the bytes each cache really holds (fp8: 1 per element) against the
   device-to-device copy bandwidth measured in the same run (CUDA-graph replays, as the engine runs).
   --base-kernel FILE times an older kernels/triton_impl.py (e.g. `git show main:kernels/triton_impl.py`)
   next to the current one, same inputs, same run; --sweep times a few fp8 decode launch configs
   (BLOCK_M, BLOCK_N, warps, stages), the current default included.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from paged_backend import kernels
# the kernel bench's shapes, random paged batches, timing and error measure
from paged_backend.bench.kernels import DEV, HKV, HQ, D, graph_median_ms, paged_batch, rel_err
from paged_backend.kernels import triton_impl
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
            twin = kernels.fp8_matmul(xq, xs, lin.weight, lin.weight_scale, torch.float32, impl="reference")
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


def _scales(b) -> dict:
    """The K/V scales every fp8 case uses (other caches take none)."""
    return dict(k_scale=0.5, v_scale=0.25) if b["kv_cache"].dtype == torch.float8_e4m3fn else {}


def _attn(b, impl=None, out=None):
    return kernels.paged_attention(
        b["q"], b["kv_cache"], b["block_tables"], b["seq_lens"], b["query_start_loc"], D**-0.5, out=out,
        max_query_len=b["max_query_len"], max_seq_len=b["max_seq_len"], impl=impl, **_scales(b))


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


# Decode shapes (batch, contexts): uniform contexts, and "A": workload A's 256 sequences half-way through their
# 256 output tokens (inputs U[100, 1024] from random.Random(0), as the throughput bench draws them).
_rng = random.Random(0)
A_CONTEXTS = [_rng.randint(100, 1024) + 128 for _ in range(256)]
SHAPES = [("16x4k", [4096] * 16), ("64x4k", [4096] * 64), ("256x512", [512] * 256), ("256x4k", [4096] * 256),
          ("A", A_CONTEXTS)]
SWEEP = {64: [(16, 64, 2, 4), (16, 64, 4, 4), (16, 128, 2, 4), (16, 128, 4, 3), (16, 128, 4, 4), (16, 128, 8, 3),
              (16, 256, 4, 3), (16, 256, 8, 3)],
         128: [(16, 64, 2, 4), (16, 64, 4, 3), (16, 128, 4, 3), (16, 128, 4, 4), (16, 128, 8, 3), (16, 256, 4, 3),
               (16, 256, 8, 3)]}


def _load_kernel_module(path: str):
    """An older triton_impl.py as its own module (it reaches the tree's own triton_decode and triton_kv through
    the kernels package, hence the qualified name). One from before the fp8 cache's transposed V (tenth
    session) reads that cache's V in the old layout: its fp8 timings compare, its fp8 outputs do not."""
    spec = importlib.util.spec_from_file_location("paged_backend.kernels._base_triton_impl", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _decode(mod, b, d, out, config=None):
    """A decode launch of kernel module `mod` (its own heuristics, or `config`) writing into out."""
    scales = _scales(b)
    return lambda: mod.paged_attention(
        b["q"], b["kv_cache"], b["block_tables"], b["seq_lens"], b["query_start_loc"], d**-0.5, None, None, out,
        max_query_len=1, max_seq_len=b["max_seq_len"], config=config, **scales)


def decode_table(copy_tbps: float, base=None, sweep: bool = False) -> list[dict]:
    """One row per (head_dim, shape): bf16 and fp8 cache with the current kernel (and the base one); with sweep,
    the fp8 configs of SWEEP at 256x4k and A, each checked against the default's output."""
    mods = {"": triton_impl} | ({"base_": base} if base is not None else {})
    rows = []
    for d in (64, 128):
        for name, ctx in SHAPES:
            row = dict(head_dim=d, shape=name, batch=len(ctx), context=max(ctx), mean_context=sum(ctx) / len(ctx))
            for label, dt in (("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn)):
                b = paged_batch([1] * len(ctx), ctx, d=d, seed=len(ctx) + d, kv_dtype=dt)
                out = torch.empty_like(b["q"])
                nbytes = sum(ctx) * HKV * d * 2 * b["kv_cache"].element_size() + 2 * len(ctx) * HQ * d * 2
                for prefix, mod in mods.items():
                    ms = graph_median_ms(_decode(mod, b, d, out))
                    row[f"{prefix}{label}_us"] = ms * 1e3
                    row[f"{prefix}{label}_copy_fraction"] = nbytes / ms / 1e9 / copy_tbps
                if label == "fp8" and sweep and name in ("256x4k", "A"):
                    want = _decode(triton_impl, b, d, torch.empty_like(out))()
                    for cfg in SWEEP[d]:
                        ms = graph_median_ms(_decode(triton_impl, b, d, out, cfg))
                        err = rel_err(out, want)
                        row.setdefault("fp8_sweep", []).append(dict(config=cfg, us=ms * 1e3, rel_err_vs_default=err,
                                                                    copy_fraction=nbytes / ms / 1e9 / copy_tbps))
                del b, out
            row["speedup"] = row["bf16_us"] / row["fp8_us"]
            rows.append(row)
            print(f"d={d} {name:8s} bf16 {row['bf16_copy_fraction']:6.1%}  fp8 {row['fp8_copy_fraction']:6.1%}"
                  + (f"  (base: bf16 {row['base_bf16_copy_fraction']:6.1%}  fp8 {row['base_fp8_copy_fraction']:6.1%})"
                     if base is not None else ""), flush=True)
    return rows


def print_decode_table(rows: list[dict]) -> None:
    base = "base_fp8_us" in rows[0]
    head = f"{'d':>3s} {'shape':8s} {'bf16 us':>8s} {'% copy':>7s} {'fp8 us':>8s} {'% copy':>7s} {'fp8/bf16':>8s}"
    if base:
        head += f" | base: {'bf16 us':>8s} {'% copy':>7s} {'fp8 us':>8s} {'% copy':>7s} {'new fp8 vs base':>15s}"
    print("\nDecode attention, 32 q / 8 kv heads, % of copy bandwidth counting the bytes each cache holds\n" + head)
    for r in rows:
        line = (f"{r['head_dim']:3d} {r['shape']:8s} {r['bf16_us']:8.1f} {r['bf16_copy_fraction']:7.1%} "
                f"{r['fp8_us']:8.1f} {r['fp8_copy_fraction']:7.1%} {r['speedup']:7.2f}x")
        if base:
            line += (f" |       {r['base_bf16_us']:8.1f} {r['base_bf16_copy_fraction']:7.1%} {r['base_fp8_us']:8.1f} "
                     f"{r['base_fp8_copy_fraction']:7.1%} {r['base_fp8_us'] / r['fp8_us']:14.2f}x")
        print(line)
    for r in rows:
        for c in sorted(r.get("fp8_sweep", []), key=lambda c: c["us"]):
            print(f"sweep fp8 d={r['head_dim']} {r['shape']:6s} config {tuple(c['config'])}: {c['us']:8.1f} us "
                  f"{c['copy_fraction']:6.1%} of copy (default {r['fp8_us']:.1f} us; err {c['rel_err_vs_default']:.1e})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None)
    p.add_argument("--attention-only", action="store_true", help="skip the fp8 linear checks and table")
    p.add_argument("--base-kernel", default=None, help="an older kernels/triton_impl.py to time next to this one")
    p.add_argument("--sweep", action="store_true", help="also time a few fp8 decode launch configs")
    a = p.parse_args()
    report = dict(device=torch.cuda.get_device_name(), torch=torch.__version__)
    if not a.attention_only:
        report["linear_checks"] = check_linears()
    report["attention_checks"] = check_attention()
    fails = [r for r in report.get("linear_checks", []) if r["err_vs_fp32_twin"] > 1e-2]
    fails += [r for r in report["attention_checks"] if r["rel_err"] > 1e-2]
    for r in report.get("linear_checks", []):
        print(f"check fp8 linear {r['linear']:8s} M={r['m']:5d}: vs fp32 twin {r['err_vs_fp32_twin']:.1e}, "
              f"vs bf16 (quantization error) {r['err_vs_bf16']:.3f}")
    for r in report["attention_checks"]:
        print(f"check fp8-KV attention {r['case']:22s} rel err {r['rel_err']:.1e}")
    report["copy_TBps"] = copy_tbps = copy_bandwidth(DEV) / 1e12
    print(f"\ncopy bandwidth {copy_tbps:.2f} TB/s", flush=True)
    if not a.attention_only:
        report["linears"] = linear_table()
        print(f"{'linear':8s} {'M':>5s} {'bf16 us':>9s} {'fp8 us':>9s} {'speedup':>8s} {'fp8 TFLOP/s':>12s} "
              f"{'fp8 weight TB/s':>16s}")
        for r in report["linears"]:
            print(f"{r['linear']:8s} {r['m']:5d} {r['bf16_ms'] * 1e3:9.1f} {r['fp8_ms'] * 1e3:9.1f} "
                  f"{r['speedup']:7.2f}x {r['fp8_TFLOPs']:12.0f} {r['fp8_weight_TBps']:16.2f}")
    base = _load_kernel_module(a.base_kernel) if a.base_kernel else None
    report["decode_attention"] = decode_table(copy_tbps, base, a.sweep)
    print_decode_table(report["decode_attention"])
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    print(f"\n{len(fails)} check(s) failed" if fails else "\nall fp8 checks ok")
    return 1 if fails else 0


if __name__ == "__main__":
    raise SystemExit(main())
