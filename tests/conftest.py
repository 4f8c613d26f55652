import os
import sys

import jax
import numpy as np
import pytest

# The command line's persistent compilation cache stays out of the user's cache directory in tests.
os.environ["TAILJAX_COMPILE_CACHE"] = "off"
# Eight CPU devices, so sharding and mesh merges are tested on one machine.
jax.config.update("jax_num_cpu_devices", 8)

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def rng():
  return np.random.default_rng(20261123)


def pytest_collection_modifyitems(config, items):
  """Slow cases first: with ``--dist worksteal`` (the README's command) they start early, on the first worker,
  while the other takes the quick ones and then steals; none is left to run alone at the end."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
