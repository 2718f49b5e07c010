"""What differs between transformers releases, handled in one place.

* The cache keyword: model forwards take the cache as ``cache`` (transformers >= 5.3) or ``past_key_values``
  (before, and a deprecated alias until 5.40). :func:`cache_keyword` names the one a model takes,
  :func:`cache_argument` finds a cache passed under either name, and :func:`output_cache` reads it from outputs.
* Multimodal models keep the decoder's configuration in a sub-config: :func:`text_config`.
"""

from __future__ import annotations

import inspect
from typing import Any

CACHE_NAMES = ("cache", "past_key_values")


def cache_keyword(model: Any) -> str:
    """The name the model's forward takes its cache under."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_argument(kwargs: dict[str, Any], own: str) -> Any:
    """Move a cache passed under the other name to ``own`` (the model's) and return it (None if none given).

    An unknown keyword would be ignored by the model and sent on to the attention functions, so a cache passed as
    ``past_key_values`` to a model that takes ``cache`` (or the reverse) is renamed.
    """
    for alias in CACHE_NAMES:
        if alias != own and alias in kwargs:
            value = kwargs.pop(alias)
            if kwargs.get(own) is None:
                kwargs[own] = value
    return kwargs.get(own)


def output_cache(out: Any) -> Any:
    """The cache a model forward or ``generate(return_dict_in_generate=True)`` returned, under either name."""
    for name in CACHE_NAMES:
        if name in out and out[name] is not None:
            return out[name]
    return None


def text_config(model: Any) -> Any:
    """The decoder's configuration (the text part of a multimodal model's)."""
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


__all__ = ["CACHE_NAMES", "cache_argument", "cache_keyword", "output_cache", "text_config"]
