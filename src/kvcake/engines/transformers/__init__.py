"""The transformers engine: the only code that knows transformers' caches, masks and attention functions."""
