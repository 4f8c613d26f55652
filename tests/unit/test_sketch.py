import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from tailjax.stats import BucketSpec, HostHistogram, LogHistogram

QS = [0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999]


def heavy_tailed(rng, n=400_000):
  """KLD-like: a lognormal bulk around 1e-3 and a 1% tail four orders of magnitude above."""
  bulk = rng.lognormal(np.log(1e-3), 1.5, n - n // 100)
  tail = rng.lognormal(np.log(10.0), 1.0, n // 100)
  return rng.permutation(np.concatenate([bulk, tail])).astype(np.float32)


def sketch_of(values, spec=BucketSpec(), where=None):
  return jax.jit(lambda v, w: LogHistogram.empty(spec).add(v, w))(values, where).host()


@pytest.mark.parametrize("accuracy", [0.005, 0.02])
def test_quantiles_within_relative_accuracy(rng, accuracy):
  x = heavy_tailed(rng)
  h = sketch_of(x, BucketSpec(relative_accuracy=accuracy))
  exact = np.quantile(x.astype(np.float64), QS, method="lower")
  assert np.max(np.abs(h.quantiles(QS) / exact - 1)) <= accuracy * 1.001
  assert h.n == x.size and h.nan == 0
  np.testing.assert_allclose(h.mean, x.astype(np.float64).mean(), rtol=1e-6)
  assert (h.min, h.max) == (float(x.min()), float(x.max()))


def test_signed_values_zeros_and_tiny_negatives(rng):
  x = np.concatenate([rng.standard_normal(50_000) * 3, np.zeros(1000), -rng.uniform(1e-10, 1e-8, 500),
                      rng.uniform(0, 1e-13, 100)]).astype(np.float32)
  h = sketch_of(x)
  exact = np.quantile(x.astype(np.float64), QS, method="lower")
  big = np.abs(exact) >= 1e-12
  np.testing.assert_allclose(h.quantiles(QS)[big], exact[big], rtol=0.005)
  assert h.counts[h.spec.size // 2] == 1000  # the zero slot holds exactly the zeros
  assert h.n == x.size


def test_nan_inf_and_masks_are_counted_not_averaged():
  x = np.array([1.0, 2.0, np.nan, np.inf, -np.inf, 4.0, 100.0], np.float32)
  where = np.array([True, True, True, True, True, True, False])
  h = sketch_of(x, where=where)
  assert (h.n, h.nan, h.n_inf, h.n_finite) == (6, 1, 2, 3)
  assert h.mean == pytest.approx(7 / 3)
  assert h.quantile(0.0) == -np.inf and h.quantile(1.0) == np.inf
  assert h.quantile(0.5) == pytest.approx(2.0, rel=0.005)


def test_empty_and_all_equal():
  empty = sketch_of(np.zeros(0, np.float32))
  assert empty.n == 0 and np.isnan(empty.mean) and np.isnan(empty.quantile(0.5))
  assert np.isnan(empty.tail_share())
  masked = sketch_of(np.ones(5, np.float32), where=np.zeros(5, bool))
  assert masked.n == 0
  same = sketch_of(np.full(1000, 0.37, np.float32))
  np.testing.assert_array_equal(same.quantiles(QS), np.float32(0.37))  # clamped to the exact min = max


def test_thresholds_give_exact_spike_rates(rng):
  x = heavy_tailed(rng, 100_000)
  spec = BucketSpec(thresholds=(0.5, 0.1, 1e-3, 0.0, 1e6, -1.0))
  h = sketch_of(x, spec)
  for t in spec.thresholds:
    assert h.fraction_above(t) == np.mean(x > np.float32(t))
  np.testing.assert_allclose(h.quantiles(QS), np.quantile(x.astype(np.float64), QS, method="lower"), rtol=0.005)
  with pytest.raises(KeyError, match="threshold 0.7 was not declared"):
    h.fraction_above(0.7)
  # A value exactly at a threshold is not above it.
  at = sketch_of(np.array([0.5, 0.5, 0.6], np.float32), BucketSpec(thresholds=(0.5,)))
  assert at.fraction_above(0.5) == pytest.approx(1 / 3)


def test_tail_share(rng):
  x = heavy_tailed(rng).astype(np.float64)
  h = sketch_of(x.astype(np.float32))
  top = np.sort(x)[-x.size // 100:]
  assert h.tail_share(0.01) == pytest.approx(top.sum() / x.sum(), rel=0.01)
  assert h.tail_share(0.01) > 0.9  # the KLD shape the mission describes


def test_sharded_merge_is_bit_identical_to_one_pass(rng):
  x = heavy_tailed(rng, 8 * 4096).reshape(8, 4096)
  x[3, 7], x[5, 9] = np.nan, np.inf
  where = rng.random(x.shape) > 0.1
  spec = BucketSpec(thresholds=(0.5,))
  one_pass = jax.jit(lambda v, w: LogHistogram.empty(spec).add(v, w))(x, where)
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))

  @jax.jit
  @jax.shard_map(mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P())
  def sharded(v, w):
    return LogHistogram.empty(spec).add(v, w).psum("data")

  merged = sharded(x, where)
  np.testing.assert_array_equal(merged.counts, one_pass.counts)
  assert int(merged.nan) == int(one_pass.nan) == 1
  assert (float(merged.min), float(merged.max)) == (float(one_pass.min), float(one_pass.max))
  np.testing.assert_allclose(merged.host().mean, one_pass.host().mean, rtol=1e-6)
  # Merging per-batch sketches by addition, on device or on host, is exact too.
  parts = [jax.jit(lambda v, w: LogHistogram.empty(spec).add(v, w))(x[i], where[i]) for i in range(8)]
  on_device, on_host = parts[0], parts[0].host()
  for p in parts[1:]:
    on_device, on_host = on_device.merge(p), on_host.merge(p.host())
  np.testing.assert_array_equal(on_device.counts, one_pass.counts)
  np.testing.assert_array_equal(on_host.counts, np.asarray(one_pass.counts))


def test_json_round_trip_and_spec_mismatch(rng):
  h = sketch_of(heavy_tailed(rng, 10_000), BucketSpec(thresholds=(0.5,)))
  back = HostHistogram.from_dict(json.loads(json.dumps(h.to_dict())))
  np.testing.assert_array_equal(back.counts, h.counts)
  assert back.spec == h.spec and back.quantiles(QS).tolist() == h.quantiles(QS).tolist()
  assert len(json.dumps(h.to_dict())) < 64_000
  other = sketch_of(np.ones(3, np.float32), BucketSpec(relative_accuracy=0.01))
  with pytest.raises(ValueError, match="different bucket specs"):
    h.merge(other)


def test_state_size_and_bad_specs():
  spec = BucketSpec()
  assert spec.size * 4 <= 64 * 1024
  assert len(spec.representative()) == spec.size
  with pytest.raises(ValueError, match="relative_accuracy"):
    BucketSpec(relative_accuracy=0.0)
  with pytest.raises(ValueError, match="min_value < max_value"):
    BucketSpec(min_value=1.0, max_value=0.5)
