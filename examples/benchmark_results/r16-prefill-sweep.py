"""Prefill attention launch-config sweep at workload A's prompt shapes (1B: d64, 8B: d128), SDPA flash peer."""
import torch, torch.nn.functional as F, triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from paged_backend.bench import kernels as kb
from paged_backend.kernels import triton_impl

def case(name, qlens, ctx, d, cfgs, hq=32, hkv=8, mixed_decode=0):
    ql = list(qlens) + [1] * mixed_decode
    cl = list(ctx) + [600 + 3 * i for i in range(mixed_decode)]
    b = kb.paged_batch(ql, cl, hq=hq, hkv=hkv, d=d, seed=len(ql))
    scale = d ** -0.5
    flops = sum(4 * hq * d * q * (c - q + (q + 1) / 2) for q, c in zip(qlens, ctx))
    out = torch.empty_like(b["q"])
    ref = kb.run(b, scale)
    res = []
    for cfg in cfgs:
        try:
            fn = lambda: triton_impl.paged_attention(b["q"], b["kv_cache"], b["block_tables"], b["seq_lens"],
                b["query_start_loc"], scale, None, None, out, max_query_len=max(ql), max_seq_len=max(cl), config=cfg)
            fn()
            err = kb.rel_err(out, ref)
            ms = kb.graph_median_ms(fn)
            res.append((ms, cfg, err))
        except Exception as e:
            print(f"  {name} {cfg}: {type(e).__name__} {str(e)[:100]}")
    base = kb.graph_median_ms(lambda: kb.run(b, scale, out=out))
    sd = None
    if not mixed_decode and len(set(qlens)) == 1 and qlens == ctx:
        n, s = len(qlens), qlens[0]
        q4 = b["q"].view(n, s, hq, d).transpose(1, 2).contiguous()
        kc = torch.randn(n, hkv, s, d, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            sd = kb.graph_median_ms(lambda: F.scaled_dot_product_attention(q4, kc, vc, is_causal=True, scale=scale, enable_gqa=True))
    print(f"{name}: default {base*1e3:.1f} us ({flops/base/1e9:.0f} TFLOP/s)" + (f", SDPA flash {sd*1e3:.1f} us ({flops/sd/1e9:.0f} TFLOP/s)" if sd else ""), flush=True)
    for ms, cfg, err in sorted(res)[:6]:
        print(f"   {cfg}: {ms*1e3:8.1f} us {flops/ms/1e9:5.0f} TFLOP/s  x{base/ms:.2f} vs default  err {err:.1e}", flush=True)

cfgs = [(bm, bn, w, s) for bm in (64, 128) for bn in (32, 64, 128) for w in (4, 8) for s in (2, 3, 4)]
case("1B 16x512 d64", [512] * 16, [512] * 16, 64, cfgs)
case("1B 16x512 d64 + 256 decode", [512] * 16, [512] * 16, 64, cfgs, mixed_decode=256)
case("8B 16x512 d128", [512] * 16, [512] * 16, 128, cfgs)
case("1B 1x8192 d64", [8192], [8192], 64, cfgs)
case("8B 4x2048 d128", [2048] * 4, [2048] * 4, 128, cfgs)
