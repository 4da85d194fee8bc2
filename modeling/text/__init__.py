"""The text a model reads: language codes, each model family's prompt template, test sets and parallel data."""
