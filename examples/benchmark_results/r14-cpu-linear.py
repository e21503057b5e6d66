"""The CPU small-batch linear (kernels/cpu_linear.cpp) against MKL (F.linear) on SmolLM2-135M's shapes.

One "model pass" = the 30 layers' four projections (fused qkv 960x576, o 576x576, fused gate/up 3072x576,
down 576x1536), each layer its own random fp32 weights (540 MB in all, far past the caches, as in a real
step), plus the LM head (49152x576). MKL is timed with the weights as stored row-major [out, in] and as
stored input-major (the layout the project used for MKL before this kernel). Median of 9 passes per
cell, the three alternating. Run from the repo root: python examples/benchmark_results/r14-cpu-linear.py
"""

import statistics
import time

import torch
import torch.nn.functional as F

from paged_backend.kernels import cpu_ext

ext = cpu_ext.load()
torch.manual_seed(0)
shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
rows = [[torch.randn(n, k) * 0.02 for n, k in shapes] for _ in range(30)] + [[torch.randn(49152, 576) * 0.02]]
cols = [[w.t().contiguous().t() for w in layer] for layer in rows]


def model_pass(m, weights, fn):
    xs = {k: torch.randn(m, k) for k in (576, 1536)}
    t0 = time.perf_counter()
    for layer in weights:
        for w in layer:
            fn(xs[w.shape[1]], w)
    return time.perf_counter() - t0


print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
print(f"{'rows':>5} {'MKL row-major':>14} {'MKL input-major':>16} {'ours':>8}   (ms per model pass)")
for m in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64):
    t = {"rm": [], "im": [], "ours": []}
    model_pass(m, rows, ext.small_rows_linear)  # warm
    for _ in range(9):
        t["rm"].append(model_pass(m, rows, F.linear))
        t["im"].append(model_pass(m, cols, F.linear))
        t["ours"].append(model_pass(m, rows, ext.small_rows_linear))
    med = {k: statistics.median(v) * 1e3 for k, v in t.items()}
    print(f"{m:>5} {med['rm']:>14.1f} {med['im']:>16.1f} {med['ours']:>8.1f}", flush=True)
