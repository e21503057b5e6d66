"""GPU check and benchmark of the paged-attention kernels (needs CUDA).

    python -m paged_backend.bench.kernels [--sweep] [--md FILE]

1. correctness at real shapes against the torch reference (output poisoned with NaN first);
2. decode table: bf16, head_dim 128, 32 q / 8 kv heads, batch 1/16/64/256 x context 512/4k/16k:
   achieved bandwidth (K/V + q + out bytes over the median time) against the device-to-device copy
   bandwidth measured in the same run, torch SDPA over the gathered contiguous KV, and FlexAttention
   over a paged (page-table) block mask;
3. prefill table: varlen causal 8 x 2k tokens, head_dim 128, TFLOP/s against torch SDPA (flash).
Timing: triton.testing.do_bench medians, fresh random inputs per shape.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench, do_bench_cudagraph

from paged_backend import kernels
from paged_backend.bench.roofline import COPY_METHOD_CUDA, copy_bandwidth
from paged_backend.kernels import reference, triton_impl

HQ, HKV, D, BS = 32, 8, 128, 16
DEV = "cuda"


def rel_err(a, b):
    if torch.isnan(a).any():
        return float("nan")
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def median_ms(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def graph_median_ms(fn):
    """Median over CUDA-graph replays: no Python launch cost, as the engine's decode graphs run."""
    try:
        return do_bench_cudagraph(fn, rep=100, return_mode="median")
    except Exception:
        torch.cuda.synchronize()
        return median_ms(fn)


def paged_batch(q_lens, ctx_lens, dtype=torch.bfloat16, hq=HQ, hkv=HKV, d=D, seed=0, kv_dtype=None):
    """Random cache with shuffled block ids; every sequence's blocks full of random K/V.
    kv_dtype: the cache's dtype when it differs from q's (an fp8 cache)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    nbs = [triton.cdiv(c, BS) for c in ctx_lens]
    n = sum(nbs) + 1
    kv_dtype = kv_dtype or dtype
    if kv_dtype == torch.float8_e4m3fn:  # randn has no fp8: drawn in fp32 and cast, in chunks
        cache = torch.empty(n, 2, BS, hkv, d, device=DEV, dtype=kv_dtype)
        for i in range(0, n, 4096):
            cache[i : i + 4096] = torch.randn(cache[i : i + 4096].shape, device=DEV, generator=g).to(kv_dtype)
    else:
        cache = torch.randn(n, 2, BS, hkv, d, device=DEV, dtype=kv_dtype, generator=g)
    perm = torch.randperm(n, device=DEV, generator=g).to(torch.int32)
    bt = torch.zeros(len(ctx_lens), max(nbs), dtype=torch.int32, device=DEV)
    pos = 0
    for b, nb in enumerate(nbs):
        bt[b, :nb] = perm[pos : pos + nb]
        pos += nb
    q = torch.randn(sum(q_lens), hq, d, device=DEV, dtype=dtype, generator=g)
    qsl = torch.tensor([0] + list(q_lens), device=DEV).cumsum(0).to(torch.int32)
    sl = torch.tensor(ctx_lens, dtype=torch.int32, device=DEV)
    return dict(q=q, kv_cache=cache, block_tables=bt, seq_lens=sl, query_start_loc=qsl,
                max_query_len=max(q_lens), max_seq_len=max(ctx_lens))


def run(b, scale, window=None, softcap=None, impl=None, out=None, **kw):
    return kernels.paged_attention(
        b["q"], b["kv_cache"], b["block_tables"], b["seq_lens"], b["query_start_loc"], scale,
        sliding_window=window, softcap=softcap, out=out, max_query_len=b["max_query_len"],
        max_seq_len=b["max_seq_len"], impl=impl, **kw)


def checks():
    """Triton vs the torch reference at real shapes; returns the number of failures."""
    cases = [
        ("decode b64 ctx~4k", [1] * 64, [4096 - 37 * i for i in range(64)], torch.bfloat16, 128, None, None),
        ("decode split b2 ctx16k", [1, 1], [16384, 9001], torch.bfloat16, 128, None, None),
        ("decode split fp32", [1, 1, 1], [16000, 3000, 77], torch.float32, 128, None, None),
        ("mixed chunked+decode", [512, 1, 1, 300] + [1] * 28, [2012, 4000, 33, 300] + [999] * 28,
         torch.bfloat16, 128, None, None),
        ("mixed window+softcap", [512, 1, 1, 300], [2012, 4000, 33, 300], torch.bfloat16, 128, 1024, 50.0),
        ("mixed fp16 d64", [700, 1, 1], [1500, 2500, 1], torch.float16, 64, 256, None),
        ("mixed fp32 d256", [200, 1, 64], [900, 1800, 64], torch.float32, 256, None, 30.0),
        ("prefill 8x2k", [2048] * 8, [2048] * 8, torch.bfloat16, 128, None, None),
    ]
    fails = 0
    for name, ql, cl, dtype, d, window, softcap in cases:
        b = paged_batch(ql, cl, dtype, d=d, seed=len(name))
        out = torch.full_like(b["q"], float("nan"))
        got = run(b, d**-0.5, window, softcap, out=out)
        ref = run(b, d**-0.5, window, softcap, impl="reference")
        err = rel_err(got, ref)
        tol = 1e-3 if dtype == torch.float32 else 1e-2
        ok = err <= tol
        fails += not ok
        print(f"check {name:26s} {str(dtype)[6:]:9s} rel err {err:.2e} (tol {tol:g}) {'ok' if ok else 'FAIL'}")
    # store_kv at a real shape against index assignment
    cache = torch.randn(4096, 2, BS, HKV, D, device=DEV, dtype=torch.bfloat16)
    expect = cache.clone()
    k, v = torch.randn(2, 8192, HKV, D, device=DEV, dtype=torch.bfloat16)
    slots = torch.randperm(4096 * BS, device=DEV)[:8192]
    slots[::5] = -1
    kernels.store_kv(k, v, cache, slots)
    reference.store_kv(k, v, expect, slots)
    ok = torch.equal(cache, expect)
    fails += not ok
    print(f"check store_kv 8192 tokens      {'ok' if ok else 'FAIL'}")
    return fails


def flex_decode_fn(bsz, ctx, scale):
    """FlexAttention decode over a paged KV cache: page size 128 (FlexAttention's KV block), shuffled pages."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    page = 128
    npg = triton.cdiv(ctx, page)
    total = bsz * npg
    k = torch.randn(1, HKV, total * page, D, device=DEV, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(bsz, HQ, 1, D, device=DEV, dtype=torch.bfloat16)
    table = torch.randperm(total, device=DEV).view(bsz, 1, 1, npg).to(torch.int32)  # [B, H, q blocks, kv blocks]
    lens = torch.full((bsz,), ctx, device=DEV, dtype=torch.int32)
    assert ctx % page == 0, "the FlexAttention peer takes whole pages only"
    partial_n = torch.zeros(bsz, 1, 1, device=DEV, dtype=torch.int32)
    full_n = torch.full((bsz, 1, 1), npg, device=DEV, dtype=torch.int32)
    # every page is full, so no mask_mod call is needed: the block mask alone is the page table
    # kv_indices' last dimension must span every KV block of the (physical) sequence: pad the page table.
    idx = torch.zeros(bsz, 1, 1, total, device=DEV, dtype=torch.int32)
    idx[..., :npg] = table
    owner = torch.empty(total, device=DEV, dtype=torch.int32)  # sequence that owns each physical page
    owner[table.flatten().long()] = torch.arange(bsz, device=DEV, dtype=torch.int32).repeat_interleave(npg)

    def mask_mod(b, h, q_idx, kv_idx):  # exact mask (the compiled kernel skips it on full blocks)
        return owner[kv_idx // page] == b

    bm = BlockMask.from_kv_blocks(partial_n, idx, full_n, idx, BLOCK_SIZE=(page, page), mask_mod=mask_mod,
                                  seq_lengths=(1, total * page), compute_q_blocks=False)
    fa = torch.compile(flex_attention, dynamic=False)
    fn = lambda: fa(q, k, v, block_mask=bm, scale=scale, enable_gqa=True)  # noqa: E731
    # correctness of the peer itself: sequence 0 against SDPA over its own gathered pages
    out = fn()
    idx = (table[0, 0, 0].long().view(-1, 1) * page + torch.arange(page, device=DEV)).flatten()[:ctx]
    ref = F.scaled_dot_product_attention(q[:1], k[:, :, idx], v[:, :, idx], scale=scale, enable_gqa=True)
    err = rel_err(out[:1], ref)
    return fn, err


def decode_table(copy_bw, flex_cells):
    rows = []
    scale = D**-0.5
    for bsz in (1, 16, 64, 256):
        for ctx in (512, 4096, 16384):
            kv_bytes = bsz * ctx * HKV * D * 2 * 2
            io_bytes = kv_bytes + 2 * bsz * HQ * D * 2
            if 3 * kv_bytes > 60e9:
                rows.append((bsz, ctx, None, None, None, None, "skipped: memory"))
                continue
            b = paged_batch([1] * bsz, [ctx] * bsz, seed=bsz + ctx)
            out = torch.empty_like(b["q"])
            ms = graph_median_ms(lambda: run(b, scale, out=out))
            splits = 1
            if bsz * HKV < 264:
                splits = triton_impl._choose_splits(bsz, HKV, ctx, b["q"].device)
            # SDPA over the gathered contiguous KV [B, Hkv, ctx, D] (gather not timed)
            sd_ms, note = None, f"splits={splits}"
            try:
                kc = torch.empty(bsz, HKV, ctx, D, device=DEV, dtype=torch.bfloat16)
                vc = torch.empty_like(kc)
                nb = ctx // BS
                for i in range(bsz):
                    blk = b["kv_cache"][b["block_tables"][i, :nb].long()]  # [nb, 2, BS, Hkv, D]
                    kc[i] = blk[:, 0].reshape(ctx, HKV, D).transpose(0, 1)
                    vc[i] = blk[:, 1].reshape(ctx, HKV, D).transpose(0, 1)
                q4 = b["q"].view(bsz, HQ, 1, D)
                sd = lambda: F.scaled_dot_product_attention(q4, kc, vc, scale=scale, enable_gqa=True)  # noqa: E731
                err = rel_err(sd().view(bsz, HQ, D), run(b, scale))
                sd_ms = graph_median_ms(sd)
                if err > 1e-2:
                    note += f" sdpa-vs-ours err {err:.1e}!"
                del kc, vc
            except Exception as e:  # a peer that cannot run is reported, not fatal
                note += f" sdpa: {type(e).__name__}"
            fx_ms = None
            del b, out
            torch.cuda.empty_cache()
            bw = io_bytes / ms / 1e9
            rows.append((bsz, ctx, ms, bw, sd_ms, fx_ms, note))
            print(f"decode b={bsz:3d} ctx={ctx:5d}: {ms * 1e3:8.1f} us  {bw:5.2f} TB/s ({bw / copy_bw:4.0%} of copy)"
                  f"  sdpa {sd_ms and sd_ms * 1e3 or float('nan'):8.1f} us  flex {fx_ms and fx_ms * 1e3 or float('nan'):8.1f} us"
                  f"  {note}", flush=True)
    # FlexAttention last: it compiles per shape, and a failure inside it must not cost the table above.
    for i, (bsz, ctx, ms, bw, sd, fx, note) in enumerate(rows):
        if (bsz, ctx) not in flex_cells or ms is None:
            continue
        try:
            fn, err = flex_decode_fn(bsz, ctx, scale)
            fx = graph_median_ms(fn)
            if err > 1e-2:
                note += f" flex err {err:.1e}!"
            del fn
            torch.cuda.empty_cache()
        except Exception as e:  # may leave the CUDA context unusable: no more flex cells
            rows[i] = (bsz, ctx, ms, bw, sd, None, note + f" flex: {type(e).__name__}: {str(e)[:80]}")
            break
        rows[i] = (bsz, ctx, ms, bw, sd, fx, note)
        print(f"flex b={bsz} ctx={ctx}: {fx and fx * 1e3 or float('nan'):.1f} us ({note})", flush=True)
    return rows


def prefill_table(configs=None):
    n, s = 8, 2048
    flops = 4 * n * HQ * D * s * (s + 1) / 2  # causal: half the score matrix, QK^T and PV
    b = paged_batch([s] * n, [s] * n, seed=7)
    scale = D**-0.5
    out = torch.empty_like(b["q"])
    res = {}
    for cfg in configs or [None]:
        if cfg is None:  # the entry point with its own heuristics
            fn = lambda: run(b, scale, out=out)  # noqa: E731
        else:
            fn = lambda: triton_impl.paged_attention(  # noqa: E731
                b["q"], b["kv_cache"], b["block_tables"], b["seq_lens"], b["query_start_loc"], scale, None, None,
                out, max_query_len=s, max_seq_len=s, config=cfg)
        res[cfg] = flops / median_ms(fn) / 1e9
    # SDPA flash on contiguous [8, H, 2048, D]
    q4 = b["q"].view(n, s, HQ, D).transpose(1, 2).contiguous()
    kc = torch.randn(n, HKV, s, D, device=DEV, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    note = "flash, enable_gqa"
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            fn = lambda: F.scaled_dot_product_attention(q4, kc, vc, is_causal=True, scale=scale, enable_gqa=True)  # noqa
            fn()
            sd_ms = median_ms(fn)
    except Exception:
        note = "flash, K/V repeated to 32 heads (not timed)"
        kr, vr = kc.repeat_interleave(4, 1), vc.repeat_interleave(4, 1)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            sd_ms = median_ms(lambda: F.scaled_dot_product_attention(q4, kr, vr, is_causal=True, scale=scale))
    return res, flops / sd_ms / 1e9, note


def sweep():
    """A few launch configs for decode (b64/b256, ctx 4k) and prefill; prints each, the best first."""
    scale = D**-0.5
    for bsz in (64, 256):
        b = paged_batch([1] * bsz, [4096] * bsz, seed=bsz)
        out = torch.empty_like(b["q"])
        io = bsz * 4096 * HKV * D * 4 + 4 * bsz * HQ * D
        res = []
        for cfg in [(16, 64, 4, 3), (16, 128, 4, 3), (16, 64, 4, 4), (16, 128, 8, 3), (16, 32, 4, 4), (16, 64, 2, 4),
                    (16, 128, 4, 2), (16, 256, 8, 2)]:
            try:
                ms = median_ms(lambda: triton_impl.paged_attention(
                    b["q"], b["kv_cache"], b["block_tables"], b["seq_lens"], b["query_start_loc"], scale, None, None,
                    out, max_query_len=1, max_seq_len=4096, num_splits=1, config=cfg))
                res.append((io / ms / 1e9, cfg))
            except Exception as e:
                print(f"sweep decode {cfg}: {type(e).__name__}")
        for bw, cfg in sorted(res, reverse=True):
            print(f"sweep decode b={bsz} ctx=4k cfg(M,N,warps,stages)={cfg}: {bw:.2f} TB/s")
    cfgs = [(128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3), (64, 128, 4, 2),
            (128, 64, 4, 3)]
    res, sd, _ = prefill_table(cfgs)
    for cfg, tf in sorted(res.items(), key=lambda kv: -kv[1]):
        print(f"sweep prefill cfg(M,N,warps,stages)={cfg}: {tf:.0f} TFLOP/s ({tf / sd:.0%} of SDPA {sd:.0f})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="store_true", help="also time a few launch configs")
    ap.add_argument("--md", help="write the markdown table to this file")
    ap.add_argument("--no-flex", action="store_true", help="skip the FlexAttention peer (it compiles per shape)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("python -m paged_backend.bench.kernels needs a CUDA GPU")
    name = torch.cuda.get_device_name()
    print(f"device {name}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    t0 = time.time()
    fails = checks()
    print(f"checks: {fails} failure(s), {time.time() - t0:.0f}s", flush=True)
    copy_bw = copy_bandwidth(DEV) / 1e12  # TB/s, read + write: the one method every roofline here uses
    print(f"copy bandwidth (read+write, {COPY_METHOD_CUDA}): {copy_bw:.2f} TB/s", flush=True)
    if args.sweep:
        sweep()
    flex_cells = set() if args.no_flex else {(64, 4096), (256, 4096), (64, 16384)}
    pre, sd_tf, sd_note = prefill_table()
    print(f"prefill 8x2k: ours {pre[None]:.0f} TFLOP/s, SDPA {sd_tf:.0f} TFLOP/s ({sd_note})", flush=True)
    rows = decode_table(copy_bw, flex_cells)
    ours = pre[None]
    lines = [
        f"Device: {name}; torch {torch.__version__}, triton {triton.__version__}; "
        f"date {time.strftime('%Y-%m-%d')}; command `python -m paged_backend.bench.kernels`",
        f"Copy bandwidth (device-to-device, read+write): {copy_bw:.2f} TB/s. Correctness checks: "
        f"{'all passed' if not fails else f'{fails} FAILED'}.",
        "",
        "Decode, bf16, head_dim 128, 32 q / 8 kv heads, block_size 16, shuffled blocks; median of CUDA-graph replays "
        "(us); BW = (K/V + q + out bytes) / time; SDPA and FlexAttention timed the same way:",
        "",
        "| batch | ctx | ours us | ours TB/s | % of copy | SDPA (contiguous KV) us | FlexAttention (paged) us | notes |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for bsz, ctx, ms, bw, sd, fx, note in rows:
        if ms is None:
            lines.append(f"| {bsz} | {ctx} | - | - | - | - | - | {note} |")
            continue
        f = lambda x: f"{x * 1e3:.1f}" if x else "-"  # noqa: E731
        lines.append(f"| {bsz} | {ctx} | {ms * 1e3:.1f} | {bw:.2f} | {bw / copy_bw:.0%} | {f(sd)} | {f(fx)} | {note} |")
    lines += [
        "",
        f"Prefill, varlen causal 8 x 2048 tokens, bf16, head_dim 128, 32 q / 8 kv heads: ours {ours:.0f} TFLOP/s, "
        f"torch SDPA ({sd_note}) {sd_tf:.0f} TFLOP/s: {ours / sd_tf:.0%}.",
    ]
    table = "\n".join(lines)
    print("\n" + table)
    if args.md:
        with open(args.md, "w") as fh:
            fh.write(table + "\n")
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
