"""Feature cache: CLIP run once over a data set, the head trained from memory-mapped token maps.

`build_cache` / `build_cache_from_args` write it (resumable, sharded over `torchrun` processes),
`CachedRetrievalDataset` reads it. Format: `format.py`; see docs/reproduction.md for when to use it.
"""

from .dataset import RUN_KEYS, CachedClipDataset, CachedRetrievalDataset, check_settings, load_manifest
from .format import FORMAT, MANIFEST_NAME, CacheMismatchError
from .run import build_cache_from_args, run_settings, weights_identity
from .writer import build_cache, encode_clip_tokens, encode_text_features, expected_bytes, plan_split

__all__ = ["FORMAT", "MANIFEST_NAME", "RUN_KEYS", "CacheMismatchError", "CachedClipDataset", "CachedRetrievalDataset",
           "build_cache", "build_cache_from_args", "check_settings", "encode_clip_tokens", "encode_text_features",
           "expected_bytes", "load_manifest", "plan_split", "run_settings", "weights_identity"]
