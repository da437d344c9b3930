"""The keyword that carries the generation cache, which transformers 5.24 renamed from `past_key_values` to `cache`.

The project's models take `cache`, the current name. `generate` on transformers 5.23 (the declared minimum) still
passes `past_key_values`, and reads the cache back from outputs under that name, so the models accept it
(`take_cache`), and name the cache in their outputs and in calls into a wrapped LLM with `CACHE_NAME`, the name the
installed release uses.
"""

from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast


CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
LEGACY_CACHE_NAME = "past_key_values"


def take_cache(cache: Cache | None, kwargs: dict) -> Cache | None:
    """The cache passed as `cache`, or as `past_key_values` (removed from `kwargs`); both at once is an error."""
    legacy = kwargs.pop(LEGACY_CACHE_NAME, None)
    if legacy is None:
        return cache
    if cache is not None:
        raise ValueError("Pass the cache once, as `cache` (`past_key_values` is its pre-5.24 name), not as both.")
    return legacy


def cache_kwarg(cache: Cache | None) -> dict[str, Cache | None]:
    """`{name: cache}` under the name the installed transformers uses, for outputs and wrapped models."""
    return {CACHE_NAME: cache}
