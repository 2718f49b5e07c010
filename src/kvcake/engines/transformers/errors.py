"""The transformers engine's error about caches (re-exported by :mod:`kvcake`)."""

from __future__ import annotations


class UnsupportedCacheError(ValueError):
    """A cache kvcake cannot compress (another kind, or one that already holds tokens), or a kvcake cache used where
    it cannot be continued exactly (outside a compress block of its model and method, or cropped after decode-time
    eviction)."""


__all__ = ["UnsupportedCacheError"]
