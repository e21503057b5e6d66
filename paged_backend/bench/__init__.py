"""Benchmarks: our engine against peers in the same run, and against the hardware floor."""

from paged_backend.bench.workload import SHAPES, make_model_dir, word_level_tokenizer, workload_a

__all__ = ["SHAPES", "make_model_dir", "word_level_tokenizer", "workload_a"]
