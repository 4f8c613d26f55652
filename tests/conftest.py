import gc
import os
import sys

import jax
import numpy as np
import pytest

# The command line's persistent compilation cache stays out of the user's cache directory in tests.
os.environ["TAILJAX_COMPILE_CACHE"] = "off"
# Tests compile far more than they run: XLA's CPU backend without LLVM's optimizations compiles the suite a third
# faster (test_distill + test_lora: 125 s -> 84 s). Set before JAX starts its backend; subprocesses inherit it.
os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0",
                                                 "--xla_llvm_disable_expensive_passes=true"]))
# Eight CPU devices, so sharding and mesh merges are tested on one machine.
jax.config.update("jax_num_cpu_devices", 8)

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def rng():
  return np.random.default_rng(20261123)


MAP_BUDGET = 30_000  # of Linux's 65,530 memory maps per process (vm.max_map_count)


@pytest.fixture(autouse=True)
def compiled_programs_within_the_map_limit():
  """Each compiled XLA program holds a few memory maps, and JAX keeps every program it compiled. A worker that ran
  a few hundred tests passed Linux's per-process limit, and XLA's compiler crashed (SIGSEGV) at its next mapping:
  the rare native crash of earlier suites. Past a budget the caches are dropped; programs compile again as needed."""
  yield
  try:
    with open("/proc/self/maps") as maps:
      count = sum(1 for _ in maps)
  except OSError:  # not Linux
    return
  if count > MAP_BUDGET:
    jax.clear_caches()
    gc.collect()


def pytest_collection_modifyitems(config, items):
  """Slow cases first: with ``--dist worksteal`` (the README's command) they start early, on the first worker,
  while the other takes the quick ones and then steals; none is left to run alone at the end."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
