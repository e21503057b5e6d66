"""Decode attention at workload A's contexts: does the order of the sequences (launch order) matter? Thirteenth session, BENCHMARKS.md."""
import torch
from paged_backend.bench.kernels import graph_median_ms, paged_batch, rel_err, HKV, HQ
from paged_backend.bench.fp8 import A_CONTEXTS, _decode
from paged_backend.bench.roofline import copy_bandwidth
from paged_backend.kernels import triton_impl
copy = copy_bandwidth(torch.device("cuda")) / 1e12
print(f"copy {copy:.2f} TB/s", flush=True)
def snake(xs, n=132):
    s = sorted(xs, reverse=True); out = []
    for i in range(0, len(s), n):
        chunk = s[i:i + n]; out += chunk if (i // n) % 2 == 0 else chunk[::-1]
    return out
orders = {"orig": A_CONTEXTS, "desc": sorted(A_CONTEXTS, reverse=True), "asc": sorted(A_CONTEXTS), "snake": snake(A_CONTEXTS),
          "uniform": [sum(A_CONTEXTS) // len(A_CONTEXTS)] * len(A_CONTEXTS)}
for d in (64, 128):
    for dt in (torch.bfloat16, torch.float8_e4m3fn):
        line = []
        for name, ctx in orders.items():
            b = paged_batch([1] * len(ctx), ctx, d=d, seed=7 + d, kv_dtype=dt)
            out = torch.empty_like(b["q"])
            nbytes = sum(ctx) * HKV * d * 2 * b["kv_cache"].element_size() + 2 * len(ctx) * HQ * d * 2
            ms = graph_median_ms(_decode(triton_impl, b, d, out))
            line.append(f"{name} {ms*1e3:6.1f}us {nbytes/ms/1e9/copy:5.1%}")
            del b, out
        print(f"d={d} {str(dt):22s} " + " | ".join(line), flush=True)
