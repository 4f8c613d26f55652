"""Per-layer divergence: models of one layout run together, their residual streams compared layer by layer."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tailjax import stats
from tailjax.eval import summaries
from tailjax.eval.step import LAYER_SPEC
from tailjax.models import Decoder, ModelConfig, lockstep, quantize_model
from tailjax.models.quantize import QuantSpec
from helpers import TINY

# a dense first layer apart, then MoE layers alternating full and sliding attention: three stacks
MIXED = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=5, num_heads=4, num_kv_heads=2,
                    sliding_window=4, layer_types=("full", "full", "sliding", "full", "sliding"), num_experts=4,
                    num_experts_per_tok=2, moe_intermediate_size=16, dense_layers=(0,))


def layer_states(model: Decoder, tokens) -> list[np.ndarray]:
  """The residual stream after each layer, one layer at a time (``Decoder.block``), float64."""
  x, positions, masks, per_layer, shared = model.stream_inputs(tokens)
  states = []
  for layer in range(model.cfg.num_layers):
    out = model.block(layer)(x, positions, masks, None, shared)
    x, shared = out.x, out.shared
    states.append(np.asarray(x, np.float64))
  return states


def copy_of(model: Decoder) -> Decoder:
  graph, state = nnx.split(model)
  return nnx.merge(graph, jax.tree.map(jnp.array, state))


@pytest.mark.parametrize("cfg", [TINY, MIXED], ids=["dense", "moe-three-stacks"])
def test_forward_together_equals_separate_forwards_and_float64_divergence(cfg, rng):
  ref = Decoder(cfg, rngs=nnx.Rngs(0))
  rounded = copy_of(ref)
  quantize_model(rounded, QuantSpec.parse("int4-g16"))
  tokens = jnp.asarray(rng.integers(0, 64, (2, 9)))
  outputs, div = lockstep.forward_together([ref, rounded, ref], tokens)
  for model, out in zip((ref, rounded), outputs):
    alone = model.forward(tokens)
    np.testing.assert_allclose(out.hidden, alone.hidden, rtol=1e-5, atol=1e-6)
    assert len(out.experts) == len(alone.experts) == (4 if cfg.num_experts else 0)
    for got, want in zip(out.experts, alone.experts):
      np.testing.assert_array_equal(got, want)
  assert div.rel_error.shape == div.cos_distance.shape == (2, cfg.num_layers, 2, 9)
  np.testing.assert_array_equal(div.rel_error[1], 0.0)  # the reference against itself
  for layer, (r, c) in enumerate(zip(layer_states(ref, tokens), layer_states(rounded, tokens))):
    rel = np.linalg.norm(c - r, axis=-1) / np.linalg.norm(r, axis=-1)
    cos = np.sum(c * r, -1) / (np.linalg.norm(c, axis=-1) * np.linalg.norm(r, axis=-1))
    np.testing.assert_allclose(div.rel_error[0, layer], rel, rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(div.cos_distance[0, layer], 1 - cos, rtol=2e-2, atol=1e-7)
    assert np.all(rel > 0)


def test_cosine_distance_keeps_its_precision_near_zero():
  """Two states 1e-5 apart in angle: float32 ``1 - cos`` rounds to 0 or noise; the half squared chord does not."""
  r = np.random.default_rng(0).normal(size=(4, 64))
  c = r + 1e-5 * np.random.default_rng(1).normal(size=(4, 64))
  rel, dist = lockstep.divergence(jnp.asarray(r, jnp.float32), jnp.asarray(c, jnp.float32))
  cos = np.sum(c * r, -1) / (np.linalg.norm(c, axis=-1) * np.linalg.norm(r, axis=-1))
  np.testing.assert_allclose(dist, 1 - cos, rtol=0.05)  # ~1e-11 each: far below float32's 6e-8 next to 1
  np.testing.assert_allclose(rel, np.linalg.norm(c - r, axis=-1) / np.linalg.norm(r, axis=-1), rtol=1e-3)


def test_the_layer_that_breaks_is_found(rng):
  """A candidate changed in layer 3 alone: no divergence before it, the largest rise at it; the report says so."""
  cfg = dataclasses.replace(TINY, num_layers=6)
  ref = Decoder(cfg, rngs=nnx.Rngs(0))
  broken = copy_of(ref)
  kernel = broken.layers[0].blocks[0].mlp.down.kernel  # [layers, in, out]
  kernel.set_value(kernel.get_value().at[3].multiply(1.5))
  tokens = jnp.asarray(rng.integers(0, 64, (3, 16)))
  _, div = lockstep.forward_together([ref, broken], tokens)
  np.testing.assert_array_equal(div.rel_error[0, :3], 0.0)
  assert np.all(div.rel_error[0, 3:] > 1e-3)
  sketch = lambda values: [stats.HostHistogram.from_sketch(stats.LogHistogram.empty(LAYER_SPEC).add(v)) for v in values]
  layers = summaries.layer_report({"rel_error": sketch(div.rel_error[0]), "cos_distance": sketch(div.cos_distance[0])})
  assert layers["breaks_at"] == 3 and layers["rel_error"]["median"][:3] == [0.0, 0.0, 0.0]
  assert layers["cosine"]["median"][2] == pytest.approx(1.0, abs=1e-12) and layers["cosine"]["p1"][5] < 1.0
  with pytest.raises(ValueError, match="layers line up"):
    lockstep.forward_together([ref, Decoder(TINY, rngs=nnx.Rngs(1))], tokens)
