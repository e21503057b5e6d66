"""Quantized checkpoints: an FP8 compressed-tensors checkpoint loads (its fp8 values kept exactly, its KV
scales used), and other quantization configs are refused by name."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from paged_backend import LLM, SamplingParams
from paged_backend.layers.quant import quantize_rows
from paged_backend.loader import ModelLoadError, resolve_model

_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _with_config(src, dst, quantization_config):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_fp8_compressed_tensors_checkpoint(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    dst = _with_config(src, tmp_path / "fp8", {
        "quant_method": "compressed-tensors", "format": "float-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"],
                                      "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
                                      "input_activations": {"num_bits": 8, "type": "float", "dynamic": True}}},
        "kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor"},
    })
    tensors = load_file(str(dst / "model.safetensors"))
    expected = {}
    for name in list(tensors):
        if name.rpartition(".")[0].rpartition(".")[2] in _LINEARS and name.endswith(".weight"):
            q, scale = quantize_rows(tensors[name])
            tensors[name] = q
            tensors[name[: -len("weight")] + "weight_scale"] = scale
            tensors[name[: -len("weight")] + "input_scale"] = torch.ones(1)  # static: unused, dropped
            expected[name] = q
    for layer in range(2):
        tensors[f"model.layers.{layer}.self_attn.k_scale"] = torch.tensor(0.25 + layer)
        tensors[f"model.layers.{layer}.self_attn.v_scale"] = torch.tensor(0.5)
    (dst / "model.safetensors").unlink()
    save_file(tensors, str(dst / "model.safetensors"))

    assert resolve_model(str(dst)).quantization == "fp8"
    llm = LLM(model=str(dst), max_model_len=128, kv_cache_memory=8 << 20, kv_cache_dtype="fp8")
    assert llm.stats().quantization == "fp8"  # chosen by the checkpoint itself
    model = llm.engine.runner.model
    attn0 = model.model.layers[0].self_attn
    q, k, v = attn0.qkv_proj.weight.view(torch.uint8).split([64, 32, 32])  # per-channel: the same fp8 bytes
    assert torch.equal(q, expected["model.layers.0.self_attn.q_proj.weight"].view(torch.uint8))
    assert torch.equal(v, expected["model.layers.0.self_attn.v_proj.weight"].view(torch.uint8))
    assert (attn0.attn.k_scale, attn0.attn.v_scale) == (0.25, 0.5)
    assert model.model.layers[1].self_attn.attn.k_scale == 1.25
    out = llm.generate(["Hello"], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


@pytest.mark.parametrize("config,named", [
    ({"quant_method": "awq", "bits": 4, "group_size": 128}, "'awq'"),
    ({"quant_method": "gptq", "bits": 4}, "'gptq'"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "'bitsandbytes'"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized",
      "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int"}}}}, "pack-quantized"),
])
def test_other_quantized_checkpoints_are_refused_by_name(tiny_model_dir, tmp_path, config, named):
    dst = _with_config(tiny_model_dir("llama"), tmp_path / "q", config)
    with pytest.raises(ModelLoadError, match=named) as info:
        resolve_model(str(dst))
    assert "AWQ, GPTQ, bitsandbytes" in str(info.value) and "does not match" not in str(info.value)


@pytest.mark.parametrize("capability,name,refused", [((8, 0), "NVIDIA A100-SXM4-80GB", True),
                                                     ((8, 9), "NVIDIA L4", False), ((9, 0), "NVIDIA H100", False)])
def test_fp8_needs_a_gpu_with_fp8_support(monkeypatch, capability, name, refused):
    """An A100 would fail inside the first fp8 kernel with a message that does not say why: refused at setup."""
    from paged_backend.runtime.setup import check_fp8_support

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    gpu = torch.device("cuda", 0)
    for quantization, kv in (("fp8", "auto"), (None, "fp8"), ("fp8", "fp8")):
        if refused:
            with pytest.raises(ValueError, match=r"needs? a GPU with fp8 support .* A100-SXM4-80GB is 8\.0"):
                check_fp8_support(gpu, quantization, kv)
        else:
            check_fp8_support(gpu, quantization, kv)
    check_fp8_support(gpu, None, "auto")  # bf16 runs anywhere
    check_fp8_support(torch.device("cpu"), "fp8", "fp8")  # the CPU runs the fp8 arithmetic in fp32
