"""Data: where the corpus comes from (sources, fetch, documents), how it becomes token
files (corpus, cuts, tokenizer), and how training reads them (dataset)."""
