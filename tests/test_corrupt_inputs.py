"""Issue 13, defect 4: corrupt model files and configs get the project's own clear errors."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
from gguf import GGUFValueType
from gguf.constants import GGUF_MAGIC

from paged_backend.loader import CorruptWeightsError, resolve_model
from paged_backend.loader.gguf_file import read_gguf


def _str(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


def _gguf(*kvs: bytes) -> bytes:
    """A GGUF v3 header with no tensors and the given raw key/value records."""
    return struct.pack("<IIQQ", GGUF_MAGIC, 3, 0, len(kvs)) + b"".join(kvs)


def _kv(key: str, vtype: GGUFValueType, payload: bytes) -> bytes:
    return _str(key.encode()) + struct.pack("<I", vtype) + payload


def _string_array(*lengths_and_bytes: bytes) -> bytes:
    return struct.pack("<IQ", GGUFValueType.STRING, len(lengths_and_bytes)) + b"".join(lengths_and_bytes)


CORRUPT = {
    # a token whose length field says 2**63 bytes
    "huge string length": _gguf(_kv("tokenizer.ggml.tokens", GGUFValueType.ARRAY,
                                    _string_array(_str(b"a"), struct.pack("<Q", 2**63) + b"xyz"))),
    "huge array count": _gguf(_kv("tokenizer.ggml.scores", GGUFValueType.ARRAY,
                                  struct.pack("<IQ", GGUFValueType.FLOAT32, 2**62))),
    "alignment 0": _gguf(_kv("general.alignment", GGUFValueType.UINT32, struct.pack("<I", 0))),
    # arrays of arrays, 100k deep
    "deep nesting": _gguf(_kv("x", GGUFValueType.ARRAY,
                              struct.pack("<IQ", GGUFValueType.ARRAY, 1) * 100_000)),
    "bad value type": _gguf(_kv("x", 99, b"")),
}


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_corrupt_gguf_header_is_corrupt_weights_error(tmp_path, name):
    path = tmp_path / "bad.gguf"
    path.write_bytes(CORRUPT[name])
    with pytest.raises(CorruptWeightsError, match="bad.gguf"):
        read_gguf(path)


@pytest.mark.parametrize("metadata", [
    {},  # no block_count, embedding_length, ...
    {"llama.block_count": 2, "llama.embedding_length": 64, "llama.attention.head_count": 0},
], ids=["missing keys", "zero heads"])
def test_corrupt_gguf_metadata_is_corrupt_weights_error(tmp_path, metadata):
    kvs = [_kv("general.architecture", GGUFValueType.STRING, _str(b"llama"))]
    kvs += [_kv(k, GGUFValueType.UINT32, struct.pack("<I", v)) for k, v in metadata.items()]
    path = tmp_path / "meta.gguf"
    path.write_bytes(_gguf(*kvs))
    with pytest.raises(CorruptWeightsError, match="meta.gguf"):
        resolve_model(str(path))


def test_valid_handmade_header_still_reads(tmp_path):
    path = tmp_path / "ok.gguf"
    path.write_bytes(_gguf(_kv("tokenizer.ggml.tokens", GGUFValueType.ARRAY, _string_array(_str(b"a"), _str(b"bc"))),
                           _kv("general.alignment", GGUFValueType.UINT32, struct.pack("<I", 64))))
    f = read_gguf(path)
    assert f.get("tokenizer.ggml.tokens") == ["a", "bc"] and f.get("general.alignment") == 64


def test_invalid_custom_chat_template_is_value_error(smollm_tokenizer):
    from paged_backend.chat import render_chat_text
    from paged_backend.loader import load_tokenizer

    tok = load_tokenizer(resolve_model("smollm2-135m-instruct"))
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="chat template"):
        render_chat_text(tok, msgs, chat_template="{% if %}")
    with pytest.raises(ValueError, match="chat template.*no system"):
        render_chat_text(tok, msgs, chat_template="{{ raise_exception('no system message') }}")


def test_max_position_embeddings_zero_is_refused(tiny_model_dir, tmp_path):
    from paged_backend import LLM

    model = tmp_path / "zero-context"
    shutil.copytree(tiny_model_dir("llama"), model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["max_position_embeddings"] = 0
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="max_position_embeddings=0"):
        LLM(str(model), device="cpu", dtype="float32")
