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
