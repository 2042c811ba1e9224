"""hetcache: fast masked video editing with Wan2.1-VACE on Hugging Face diffusers.

    import hetcache
    hetcache.enable(pipe, hetcache.HetCacheConfig.fast())
    frames = pipe(video=video, mask=mask, prompt="...").frames[0]
    print(hetcache.stats(pipe).plan)
"""

from hetcache.api import disable, enable, plan_for, reset, set_mask, stats
from hetcache.config import HetCacheConfig
from hetcache.engine import HetCacheStats
from hetcache.errors import UserError

__all__ = [
    "HetCacheConfig",
    "HetCacheStats",
    "UserError",
    "disable",
    "enable",
    "plan_for",
    "reset",
    "set_mask",
    "stats",
]
__version__ = "0.1.0"
