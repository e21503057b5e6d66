"""The fp8 linear's GEMM at decode batch sizes: cuBLAS (`torch._scaled_mm`) against our Triton GEMM
(kernels/triton_gemm.py), per projection of the Llama-3.2-1B and Llama-3-8B shapes (needs CUDA).

    python -m paged_backend.bench.fp8_gemm [--json FILE] [--sweep] [--m 1,16,64,128,256,512,1024]

Both take the same fp8 operands and scales (activation quantization not included: it is the same pass
for either). CUDA-graph medians, fresh random inputs per shape; each Triton result is checked against
cuBLAS's (relative error of the bf16 outputs). --sweep also times a grid of launch configs at every M and
prints the best few per shape next to the default `config()` choice.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from paged_backend import kernels
from paged_backend.bench.kernels import DEV, graph_median_ms, rel_err

# (in, out) of each projection: qkv, o, gate_up, down.
SHAPES = {
    "llama-3.2-1b": {"qkv": (2048, 3072), "o": (2048, 2048), "gate_up": (2048, 16384), "down": (8192, 2048)},
    "llama-3-8b": {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)},
}
SWEEP = [(bm, bn, bk, s, w, st) for bm, bn, (bk, s), (w, st) in itertools.product(
    (64, 128), (64, 128), ((128, 1), (128, 2), (128, 4), (256, 1), (256, 2)), ((4, 3), (4, 4), (8, 3)))]


def _operands(m: int, k: int, n: int, seed: int):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x_q, x_s = kernels.quantize_fp8_rows(torch.randn(m, k, device=DEV, dtype=torch.bfloat16, generator=g))
    w_q, w_s = kernels.quantize_fp8_rows(torch.randn(n, k, device=DEV, dtype=torch.bfloat16, generator=g) * 0.02)
    return x_q, x_s, w_q, w_s.reshape(1, -1)


def table(ms: list[int], sweep: bool) -> list[dict]:
    gemm = kernels._triton_module(False, "triton_gemm")
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    rows = []
    for model, linears in SHAPES.items():
        for name, (k, n) in linears.items():
            for m in ms:
                x_q, x_s, w_q, w_s = _operands(m, k, n, seed=m + n + k)
                want = torch._scaled_mm(x_q, w_q.t(), scale_a=x_s, scale_b=w_s, out_dtype=torch.bfloat16)
                cublas = graph_median_ms(lambda: torch._scaled_mm(x_q, w_q.t(), scale_a=x_s, scale_b=w_s,
                                                                  out_dtype=torch.bfloat16))
                cfg = gemm.config(m, n, k, sms)
                err = rel_err(gemm.fp8_matmul(x_q, x_s, w_q, w_s, torch.bfloat16, cfg), want)
                ours = graph_median_ms(lambda: gemm.fp8_matmul(x_q, x_s, w_q, w_s, torch.bfloat16, cfg))
                row = dict(model=model, linear=name, m=m, k=k, n=n, cublas_us=cublas * 1e3, triton_us=ours * 1e3,
                           config=tuple(cfg), rel_err=err, speedup=cublas / ours,
                           cublas_TFLOPs=2 * m * n * k / cublas / 1e9, triton_TFLOPs=2 * m * n * k / ours / 1e9)
                if sweep:
                    timed = []
                    for c in map(gemm.GemmConfig._make, SWEEP):
                        if c.split_k > 1 and k // c.split_k < c.block_k:
                            continue
                        try:  # compiled (and checked) outside the graph capture that times it
                            e = rel_err(gemm.fp8_matmul(x_q, x_s, w_q, w_s, torch.bfloat16, c), want)
                            t = graph_median_ms(lambda: gemm.fp8_matmul(x_q, x_s, w_q, w_s, torch.bfloat16, c))
                        except Exception as e:  # out of shared memory for this tile/stage count
                            print(f"  config {tuple(c)}: {type(e).__name__}", flush=True)
                            continue
                        timed.append(dict(config=tuple(c), us=t * 1e3, rel_err=e))
                    row["sweep"] = sorted(timed, key=lambda r: r["us"])[:5]
                rows.append(row)
                best = ""
                if sweep:
                    best = " | best " + ", ".join(f"{c['config']} {c['us']:.1f} us" for c in row["sweep"][:3])
                print(f"{model:13s} {name:8s} M={m:5d} cuBLAS {row['cublas_us']:7.1f} us  triton "
                      f"{row['triton_us']:7.1f} us {cfg.block_m, cfg.block_n, cfg.block_k, cfg.split_k}  "
                      f"{row['speedup']:5.2f}x  err {err:.1e}{best}", flush=True)
                del x_q, w_q
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None)
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--m", default="1,16,64,128,256,512,1024", help="batch sizes (rows) to time")
    a = p.parse_args()
    rows = table([int(v) for v in a.m.split(",")], a.sweep)
    print(f"\n{'model':13s} {'linear':8s} {'M':>5s} {'cuBLAS us':>10s} {'triton us':>10s} {'speedup':>8s} "
          f"{'TFLOP/s cuBLAS':>15s} {'triton':>7s}")
    for r in rows:
        print(f"{r['model']:13s} {r['linear']:8s} {r['m']:5d} {r['cublas_us']:10.1f} {r['triton_us']:10.1f} "
              f"{r['speedup']:7.2f}x {r['cublas_TFLOPs']:15.0f} {r['triton_TFLOPs']:7.0f}")
    for model in SHAPES:
        for m in sorted({r["m"] for r in rows}):
            sel = [r for r in rows if r["model"] == model and r["m"] == m]
            c, t = sum(r["cublas_us"] for r in sel), sum(r["triton_us"] for r in sel)
            print(f"{model} M={m}: one layer's four projections cuBLAS {c:.1f} us, triton {t:.1f} us ({c / t:.2f}x)")
    bad = [r for r in rows if r["rel_err"] > 1e-2]
    if a.json:
        Path(a.json).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), rows=rows), indent=1))
    print(f"{len(bad)} check(s) failed" if bad else "all checks ok")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
