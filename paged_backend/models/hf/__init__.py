"""Any Hugging Face decoder-only model through transformers' own modeling code, with our paged attention."""
