"""bf16 GEMMs at decode rows: cuBLAS (F.linear) against kernels/triton_gemm's kernel fed bf16 (scales 1). Thirteenth session, BENCHMARKS.md."""
import torch, torch.nn.functional as F, itertools
from paged_backend.bench.kernels import graph_median_ms, rel_err
from paged_backend.kernels import triton_gemm as tg
dev = torch.device("cuda")
sms, smem = tg._device_limits(dev)
print("sms", sms, "smem", smem, flush=True)
shapes = {"1B": [("qkv", 3072, 2048), ("o", 2048, 2048), ("gate_up", 16384, 2048), ("down", 2048, 8192), ("lm", 128256, 2048)],
          "8B": [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336), ("lm", 128256, 4096)]}
cands = [tg.GemmConfig(bm, bn, bk, sk, w, st) for bm, bn, bk, sk, w, st in
         [(128,128,64,1,8,3),(128,128,64,1,8,4),(64,128,64,1,4,4),(64,128,128,1,8,3),(64,64,128,1,4,4),(128,64,64,1,4,4),
          (128,128,64,2,8,3),(64,128,64,2,4,4),(64,64,128,2,4,3),(128,256,64,1,8,3),(64,256,64,1,8,3)]]
for model, rows in shapes.items():
    tot_c = tot_t = tot_best = 0
    for m in (256,):
        for name, n, k in rows:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
            xs = torch.ones(m, 1, device=dev); ws = torch.ones(1, n, device=dev)
            ref = F.linear(x, w)
            c_ms = graph_median_ms(lambda: F.linear(x, w))
            dflt = tg.config(m, n, k, sms, smem // 2)
            res = []
            for cfg in [dflt] + cands:
                try:
                    y = tg.fp8_matmul(x, xs, w, ws, torch.bfloat16, cfg)
                    err = rel_err(y, ref)
                    ms = graph_median_ms(lambda: tg.fp8_matmul(x, xs, w, ws, torch.bfloat16, cfg))
                    res.append((ms, cfg, err))
                except Exception as e:
                    res.append((float("inf"), cfg, str(e)[:60]))
            d_ms = res[0][0]; best = min(res, key=lambda r: r[0])
            tf = 2 * m * n * k / 1e12
            print(f"{model} {name:8s} m={m} cuBLAS {c_ms*1e3:7.1f} us ({tf/c_ms*1e3:5.0f} TF/s) | triton default {d_ms*1e3:7.1f} {tuple(res[0][1])} | best {best[0]*1e3:7.1f} us ({tf/best[0]*1e3:5.0f} TF/s) {tuple(best[1])} err {best[2]}", flush=True)
            tot_c += c_ms; tot_t += d_ms; tot_best += best[0]
    print(f"{model} per-layer+lm sum at m=256: cuBLAS {tot_c*1e3:.1f} us, triton default {tot_t*1e3:.1f}, best-per-shape {tot_best*1e3:.1f}", flush=True)
