"""`bench throughput --structured json`: every request constrained to one JSON schema, timed
against the same requests unconstrained in the same run.

The schema is a long array of records (bounded fields), so a request keeps producing JSON for
its whole output length, through every kind of grammar state (keys, enums, bounded integers,
strings). The shapes' word-level tokenizer has no '{' or '"' token, so for this run a shape gets a
byte-level tokenizer (the 256 byte symbols, then filler words up to the model's vocabulary).
"""

from __future__ import annotations

from pathlib import Path

BENCH_SCHEMA = {
    "type": "array",
    "minItems": 100,  # more records than any output length holds: the grammar never ends early
    "items": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 99999},
            "name": {"type": "string", "maxLength": 16},
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
            "active": {"type": "boolean"},
        },
        "required": ["id", "name", "tags", "active"],
    },
}


def byte_level_tokenizer(vocab_size: int):
    """A real fast tokenizer that can write any text (ids 0-2 special, 3-258 the byte symbols)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    for i in range(len(vocab), vocab_size):
        vocab[f"t{i}"] = i
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", pad_token="<unk>")


def use_byte_level_tokenizer(model_dir: Path, vocab_size: int) -> None:
    byte_level_tokenizer(vocab_size).save_pretrained(model_dir)
