"""The ``cache:`` section of a pipeline file: where the cross-run stage cache and its tensor
store live, and how large they may grow. Free of torch, so validating a file stays cheap."""

from __future__ import annotations

from pydantic import Field

from ..core.config import StrictModel, UsablePath

DEFAULT_CACHE_NAME = ".compresspipe-cache"
ENV_CACHE_DIR = "COMPRESSPIPE_CACHE_DIR"
ENV_NO_CACHE = "COMPRESSPIPE_NO_CACHE"  # "1": as --no-cache


class CacheConfig(StrictModel):
    """Stage outputs reused across runs, keyed by everything that determines them."""

    enabled: bool = Field(True, description="Reuse and record stage outputs (--no-cache or "
                          "COMPRESSPIPE_NO_CACHE=1: off). Tensors go to the store either way.")
    dir: UsablePath | None = Field(
        None, description="Cache and tensor store directory. Default: '.compresspipe-cache' "
        "beside the output directory (runs/.compresspipe-cache for runs/<name>); the "
        "COMPRESSPIPE_CACHE_DIR environment variable and --cache-dir override it.")
    max_gb: float = Field(20.0, gt=0, le=1_000_000,
                          description="Size limit; least recently used entries are evicted "
                          "after each stage (tensors a run directory still uses stay).")
