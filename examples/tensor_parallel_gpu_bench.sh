#!/usr/bin/env bash
# Tensor-parallel checks and benchmarks on the GPU machines (issue 17). Run from the repository root.
#   nvidia-h100-x2:  bash examples/tensor_parallel_gpu_bench.sh x2
#   nvidia-h100-x4:  bash examples/tensor_parallel_gpu_bench.sh x4
# NCCL_NVLS_ENABLE=0 / TORCH_SYMM_MEM_DISABLE_MULTICAST=1 stay as the machines set them (the engine
# also sets them for its workers if missing). Results: examples/benchmark_results/tp_*.json|png.
set -euo pipefail
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}
out=examples/benchmark_results
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

case "${1:-x2}" in
x2)
  # 1. correctness over NCCL: tp=2 == transformers (fp32), CUDA graphs and eager; killed worker
  python -m pytest -q -x tests/test_tensor_parallel_gpu.py tests/test_gpu_engine.py
  # 2. workload A at the Llama-3-8B shape, dummy bf16: tp=1 then tp=2 on the same machine, same run
  #    of this script (goal: tp=2 >= 1.6x tp=1 output tok/s)
  python -m paged_backend.cli bench throughput --model llama-3-8b --dtype bfloat16 \
      --json "$out/tp1_llama-3-8b.json"
  python -m paged_backend.cli bench throughput --model llama-3-8b --dtype bfloat16 --tensor-parallel-size 2 \
      --json "$out/tp2_llama-3-8b.json" --plot "$out/tp2_llama-3-8b.png"
  python - <<'PY'
import json
a = json.load(open("examples/benchmark_results/tp1_llama-3-8b.json"))["results"][0]
b = json.load(open("examples/benchmark_results/tp2_llama-3-8b.json"))
r = b["results"][0]
print(f"tp=1 {a['output_tok_per_s']:.0f} out tok/s ({a['seconds']:.2f} s) | tp=2 {r['output_tok_per_s']:.0f} out tok/s "
      f"({r['seconds']:.2f} s): {r['output_tok_per_s'] / a['output_tok_per_s']:.2f}x; tp=2 at "
      f"{r['roofline_fraction']:.1%} of the 2-GPU roofline ({b['floor']['total_s']:.2f} s)")
PY
  ;;
x4)
  # Llama-3-70B shape (80 layers, hidden 8192, 64 q / 8 kv heads, head_dim 128, intermediate 28672,
  # vocab 128256), dummy bf16, tp=4, workload A; roofline for 4 GPUs and the all-reduce bytes are
  # printed; peer: transformers generate with the layers over the 4 GPUs (device_map-style) on the
  # first 64 requests (it is far slower; the ratio compares output tok/s).
  python -m paged_backend.cli bench throughput --model llama-3-70b --dtype bfloat16 --tensor-parallel-size 4 \
      --peers hf-device-map --peer-num-prompts 64 \
      --json "$out/tp4_llama-3-70b.json" --plot "$out/tp4_llama-3-70b.png"
  ;;
*) echo "usage: $0 x2|x4" >&2; exit 2 ;;
esac
