#!/usr/bin/env bash
# The GPU runs behind BENCHMARKS.md (repo root of a checkout, one H100 or H200):
#   bash examples/benchmark_results/gpu_bench.sh throughput   # issue 20: Llama-3.2-1B, workload A + 64x512->256,
#                                                             #   all three transformers peers in each run (~6 min)
#   bash examples/benchmark_results/gpu_bench.sh throughput-8b  # the same for the Llama-3-8B shape (~8 min)
#   bash examples/benchmark_results/gpu_bench.sh serve        # issue 18: bench serve, ours vs transformers serve (~6 min)
# Results (JSON, PNG, the printed tables in *.txt) land in $OUT (default examples/benchmark_results).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-examples/benchmark_results}
mkdir -p "$OUT"
PEERS=hf-generate,hf-generate-batch,hf-generate-compiled
bench() { python -m paged_backend.cli bench "$@"; }
case "${1:-throughput}" in
throughput)
  bench throughput --model llama-3.2-1b --peers $PEERS --json "$OUT/llama-3.2-1b.json" \
    --plot "$OUT/llama-3.2-1b.png" 2>&1 | tee "$OUT/llama-3.2-1b.txt"
  bench throughput --model llama-3.2-1b --num-prompts 64 --input-len 512 --output-len 256 --peers $PEERS \
    --probe-batch 0 --json "$OUT/llama-3.2-1b-64x512.json" 2>&1 | tee "$OUT/llama-3.2-1b-64x512.txt" ;;
throughput-8b)
  bench throughput --model llama-3-8b --peers $PEERS --json "$OUT/llama-3-8b.json" \
    --plot "$OUT/llama-3-8b.png" 2>&1 | tee "$OUT/llama-3-8b.txt" ;;
serve)
  python -c "import fastapi, uvicorn, accelerate" || {
    echo "transformers serve needs fastapi, uvicorn and accelerate: carry their wheels (pip download --no-deps)"; exit 1; }
  bench serve --model llama-3.2-1b --server both --endpoint completions --input-len 100:1024 --output-len 256 \
    --request-rate 4,16,64,inf --num-prompts 128 --workdir /tmp/bench-serve-1b \
    --json "$OUT/serve-llama-3.2-1b.json" --plot "$OUT/serve-llama-3.2-1b.png" 2>&1 | tee "$OUT/serve-llama-3.2-1b.txt" ;;
*) echo "usage: $0 throughput|throughput-8b|serve"; exit 2 ;;
esac
