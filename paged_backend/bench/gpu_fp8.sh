#!/usr/bin/env bash
# FP8 on one GPU, in one run (~6-8 min on an H100 including Triton compiles), from the repository root:
#   bash paged_backend/bench/gpu_fp8.sh            # results under $OUT (default ./fp8_results)
# 1. the fp8 GPU tests; 2. the fp8 kernel/linear bench and our fp8 GEMM against cuBLAS; 3. workload A
# (256 prompts, input U[100,1024], 256 output tokens, greedy) for the Llama-3.2-1B and Llama-3-8B shapes
# with bf16, fp8 weights, and fp8 weights + fp8 KV cache; a table of the six runs last and one PNG of
# them (workload_a_fp8.png).
set -u
OUT=${OUT:-./fp8_results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

echo "== 1/3 fp8 GPU tests"
python -m pytest -q -m gpu tests/test_gpu_fp8.py tests/test_kernels.py -k "fp8" 2>&1 | tail -n 15 | tee "$OUT/tests.txt"

echo "== 2/3 fp8 kernel and linear bench"
python -m paged_backend.bench.fp8 --json "$OUT/fp8_kernels.json" 2>&1 | tee "$OUT/fp8_kernels.txt"
python -m paged_backend.bench.fp8_gemm --m 1,64,256 --json "$OUT/fp8_gemm.json" 2>&1 | tail -n 8 | tee "$OUT/fp8_gemm.txt"

echo "== 3/3 workload A"
for model in llama-3.2-1b llama-3-8b; do
  for variant in bf16 fp8 fp8kv; do
    flags=""
    [ "$variant" != bf16 ] && flags="--quantization fp8"
    [ "$variant" = fp8kv ] && flags="$flags --kv-cache-dtype fp8"
    echo "-- $model $variant"
    python -m paged_backend.cli bench throughput --model "$model" $flags \
      --probe-batch 0 --json "$OUT/workload_a_${model}_${variant}.json" 2>&1 | grep -v Warning | tail -n 6
  done
done

python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"\n{'model':14s} {'variant':7s} {'seconds':>8s} {'out tok/s':>10s} {'vs bf16':>8s} {'roofline':>9s} "
      f"{'weights GiB':>12s} {'KV B/tok':>9s}")
reports = []
for model in ("llama-3.2-1b", "llama-3-8b"):
    base = None
    for variant in ("bf16", "fp8", "fp8kv"):
        f = out / f"workload_a_{model}_{variant}.json"
        if not f.is_file():
            print(f"{model:14s} {variant:7s} (no result)")
            continue
        rep = json.loads(f.read_text())
        reports.append(rep)
        r = rep["results"][0]
        base = base or r["seconds"]
        print(f"{model:14s} {variant:7s} {r['seconds']:8.2f} {r['output_tok_per_s']:10.0f} "
              f"{base / r['seconds']:7.2f}x {r['roofline_fraction']:9.1%} {rep['weight_bytes'] / 2**30:12.2f} "
              f"{rep['kv_bytes_per_token']:9d}")
if reports:
    from paged_backend.bench.plot import write_variants_plot
    write_variants_plot(str(out / "workload_a_fp8.png"), reports)
    print(f"plot: {out / 'workload_a_fp8.png'}")
k = out / "fp8_kernels.json"
if k.is_file():
    rep = json.loads(k.read_text())
    best = max(rep["decode_attention"], key=lambda r: r["fp8_copy_fraction"])
    print(f"decode attention, fp8 KV: up to {best['fp8_copy_fraction']:.1%} of copy bandwidth "
          f"(batch {best['batch']}, ctx {best['context']}); see {k}")
PY
