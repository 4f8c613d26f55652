"""JAX's persistent compilation cache, on by default for the command line.

A run compiles one batch step per set of shapes (several seconds per model, more with depth);
with the cache a second run of the same shapes loads the compiled executables from disk.
``TAILJAX_COMPILE_CACHE`` names the directory, or ``off``; the default is
``$XDG_CACHE_HOME/tailjax/jax`` (``~/.cache/tailjax/jax``). Entries are keyed by the program, the
compiler options and the device kind, so a stale entry is never used for another program.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "TAILJAX_COMPILE_CACHE"


def directory() -> Path | None:
  """Where compiled programs are kept, or None when ``TAILJAX_COMPILE_CACHE=off``."""
  chosen = os.environ.get(ENV)
  if chosen is not None and chosen.lower() in ("off", "0", "none", ""):
    return None
  if chosen:
    return Path(chosen).expanduser()
  return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "tailjax" / "jax"


def enable(path: str | Path | None = None, min_compile_seconds: float = 1.0) -> Path | None:
  """Turns the cache on (``path``, else ``directory()``) for programs that took at least
  ``min_compile_seconds`` to compile; returns the directory, or None if it is off."""
  import jax

  target = Path(path) if path is not None else directory()
  if target is None:
    return None
  target.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(target))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
  return target
