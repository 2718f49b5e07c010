"""The integration layer: the only code that knows transformers."""
