"""hetcache: fast masked video editing with Wan2.1-VACE on Hugging Face diffusers.

    import hetcache
    hetcache.enable(pipe, hetcache.HetCacheConfig.fast())
    frames = pipe(video=video, mask=mask, prompt="...").frames[0]
    print(hetcache.stats(pipe).plan)

The public names load on first use, so `import hetcache` (and the CLI's help and input checks) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from hetcache.errors import UserError

_LAZY = {
    "HetCacheConfig": "hetcache.config",
    "CacheStats": "hetcache.core",
    "HetCacheStats": "hetcache.core",
    "disable": "hetcache.api",
    "enable": "hetcache.api",
    "estimate_memory": "hetcache.memory",
    "expert_switch": "hetcache.api",
    "plan_for": "hetcache.api",
    "reset": "hetcache.api",
    "set_mask": "hetcache.api",
    "stats": "hetcache.api",
    "method_config": "hetcache.methods",
}

__all__ = ["UserError", *sorted(_LAZY)]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hetcache' has no attribute {name!r}")
