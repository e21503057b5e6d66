"""Structured outputs: grammar-constrained decoding with xgrammar (spec, compile cache, matchers)."""
