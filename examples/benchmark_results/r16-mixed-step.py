"""Mixed prefill + decode attention step: one launch (num_decodes=0) against decodes in their own launch."""
import torch
from paged_backend.bench import kernels as kb
from paged_backend.kernels import triton_impl

def case(name, n_dec, prompts, d, dec_ctx=600, fp8=False):
    ql = [1] * n_dec + [p for p in prompts]
    cl = [dec_ctx + (7 * i) % 300 for i in range(n_dec)] + list(prompts)
    b = kb.paged_batch(ql, cl, d=d, seed=len(ql), kv_dtype=torch.float8_e4m3fn if fp8 else None)
    scale = d ** -0.5
    out = torch.empty_like(b["q"])
    res = {}
    for nd in (0, n_dec):
        fn = lambda: kb.run(b, scale, out=out, num_decodes=nd)
        fn(); res[nd] = (kb.graph_median_ms(fn), out.clone())
    ref = kb.run(b, scale, impl="reference")
    pre = kb.paged_batch(list(prompts), list(prompts), d=d, seed=1, kv_dtype=torch.float8_e4m3fn if fp8 else None)
    dec = kb.paged_batch([1] * n_dec, cl[:n_dec], d=d, seed=2, kv_dtype=torch.float8_e4m3fn if fp8 else None)
    t_pre = kb.graph_median_ms(lambda: kb.run(pre, scale))
    t_dec = kb.graph_median_ms(lambda: kb.run(dec, scale))
    e0, e1 = kb.rel_err(res[0][1], ref), kb.rel_err(res[n_dec][1], ref)
    print(f"{name}: one launch {res[0][0]*1e3:7.1f} us | decodes apart {res[n_dec][0]*1e3:7.1f} us (x{res[0][0]/res[n_dec][0]:.2f})"
          f" | prompts alone {t_pre*1e3:6.1f} + decodes alone {t_dec*1e3:6.1f} us | err {e0:.1e} / {e1:.1e}", flush=True)

for d in (64, 128):
    for fp8 in (False, True):
        tag = f"d{d}{' fp8' if fp8 else ''}"
        case(f"{tag} 16x512 + 256 dec", 256, [512] * 16, d, fp8=fp8)
        case(f"{tag} 16x512 + 64 dec", 64, [512] * 16, d, fp8=fp8)
        case(f"{tag} 1x2048 + 255 dec", 255, [2048], d, fp8=fp8)
