"""Gated DeltaNet (Qwen3.5's linear attention): the chunkwise form against the token-by-token definition
written in float64 NumPy, with several chunks per window, a window that is not a whole number of chunks,
grouped key heads, documents starting inside and at the edge of chunks, an initial state, and decays from
none to total; gradients of the two forms agree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tailjax.models import deltanet


def reference(q, k, v, g, beta, segments=None, state=None):
  """The definition, float64, one token at a time: S <- exp(g) S (zero at a document start);
  S <- S + k (b (v - S^T k))^T; o = S^T q, with q and k L2-normalised and q scaled by dk^-1/2."""
  q, k, v, g, beta = (np.asarray(x, np.float64) for x in (q, k, v, g, beta))
  b, t, hv, dv = v.shape
  rep = hv // q.shape[2]
  q, k = np.repeat(q, rep, axis=2), np.repeat(k, rep, axis=2)
  q = q / np.sqrt((q * q).sum(-1, keepdims=True) + 1e-6) / np.sqrt(q.shape[-1])
  k = k / np.sqrt((k * k).sum(-1, keepdims=True) + 1e-6)
  s = np.zeros((b, hv, q.shape[-1], dv)) if state is None else np.array(state, np.float64)
  out = np.zeros((b, t, hv, dv))
  for i in range(t):
    for r in range(b):
      if segments is not None and i and segments[r, i] != segments[r, i - 1]:
        s[r] = 0.0
      for h in range(hv):
        s[r, h] *= np.exp(g[r, i, h])
        delta = beta[r, i, h] * (v[r, i, h] - s[r, h].T @ k[r, i, h])
        s[r, h] += np.outer(k[r, i, h], delta)
        out[r, i, h] = s[r, h].T @ q[r, i, h]
  return out, s


def inputs(rng, b=2, t=150, hk=2, hv=4, dk=8, dv=6, log_decay=(-3.0, 0.0)):
  q = rng.normal(size=(b, t, hk, dk))
  k = rng.normal(size=(b, t, hk, dk))
  v = rng.normal(size=(b, t, hv, dv))
  g = rng.uniform(*log_decay, size=(b, t, hv))
  beta = rng.uniform(0, 1, size=(b, t, hv))
  return q, k, v, g, beta


# Row 0: documents start inside chunk 0, exactly at the first chunk edge (64) and inside chunk 2;
# row 1: one document, then padding (segment 0) from 140.
SEGMENTS = np.stack([np.repeat([1, 2, 3, 4], [10, 54, 30, 56]), np.repeat([1, 0], [140, 10])])


@pytest.mark.parametrize("chunk", [64, 16])
def test_chunkwise_equals_the_recurrence_in_float64(chunk, rng):
  q, k, v, g, beta = inputs(rng)
  state = rng.normal(size=(2, 4, 8, 6))
  want_out, want_state = reference(q, k, v, g, beta, SEGMENTS, state)
  with jax.enable_x64(True):
    for rule in (deltanet.gated_delta_rule, deltanet.gated_delta_rule_recurrent):
      kwargs = dict(chunk=chunk) if rule is deltanet.gated_delta_rule else {}
      got = rule(*map(jnp.asarray, (q, k, v, g, beta)), jnp.asarray(SEGMENTS), jnp.asarray(state), **kwargs)
      assert got.out.dtype == jnp.float64
      np.testing.assert_allclose(np.asarray(got.out), want_out, rtol=0, atol=1e-10)
      np.testing.assert_allclose(np.asarray(got.state), want_state, rtol=0, atol=1e-10)


@pytest.mark.parametrize("log_decay", [(-1e-4, 0.0), (-3.0, 0.0), (-60.0, -20.0)], ids=["none", "some", "total"])
def test_float32_chunkwise_stays_close_to_float64(log_decay, rng):
  """In float32 (what models run) the chunked form is as close to the float64 truth as the recurrence is."""
  q, k, v, g, beta = inputs(rng, b=1, t=200, log_decay=log_decay)
  want, _ = reference(q, k, v, g, beta)
  scale = np.abs(want).max()
  errors = {}
  for rule in (deltanet.gated_delta_rule, deltanet.gated_delta_rule_recurrent):
    got = rule(*(jnp.asarray(x, jnp.float32) for x in (q, k, v, g, beta))).out
    errors[rule.__name__] = np.abs(np.asarray(got, np.float64) - want).max() / scale
  assert errors["gated_delta_rule"] <= max(1e-5, 4 * errors["gated_delta_rule_recurrent"]), errors


def test_a_document_start_forgets_everything_before_it(rng):
  """Tokens after a start give the numbers of that document run alone."""
  q, k, v, g, beta = inputs(rng, b=1, t=100)
  segments = np.repeat([[1, 2]], [37, 63], axis=1)
  whole = deltanet.gated_delta_rule(*map(jnp.asarray, (q, k, v, g, beta)), jnp.asarray(segments)).out
  alone = deltanet.gated_delta_rule(*(jnp.asarray(x[:, 37:]) for x in (q, k, v, g, beta))).out
  np.testing.assert_allclose(np.asarray(whole[:, 37:]), np.asarray(alone), atol=2e-6)
  joined = deltanet.gated_delta_rule(*map(jnp.asarray, (q, k, v, g, beta))).out
  assert np.abs(np.asarray(joined[:, 37:] - alone)).max() > 1e-2  # without the start, the past leaks in


def test_gradients_of_the_chunked_form_equal_the_recurrence(rng):
  q, k, v, g, beta = inputs(rng, b=1, t=40, hk=1, hv=2, dk=4, dv=3)
  weights = rng.normal(size=(1, 40, 2, 3))
  with jax.enable_x64(True):
    args = tuple(map(jnp.asarray, (q, k, v, g, beta)))
    segments = jnp.asarray(np.repeat([[1, 2]], [25, 15], axis=1))

    def loss(rule, *args, **kwargs):
      return jnp.sum(rule(*args, segments, **kwargs).out * weights)

    chunked = jax.grad(lambda *a: loss(deltanet.gated_delta_rule, *a, chunk=16), argnums=range(5))(*args)
    stepped = jax.grad(lambda *a: loss(deltanet.gated_delta_rule_recurrent, *a), argnums=range(5))(*args)
  for a, b in zip(chunked, stepped):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-11)


def test_unit_lower_inverse_and_its_gradient_match_numpy_in_float64(rng):
  a = rng.normal(size=(3, 2, 9, 9)) * 0.7
  upper_ignored = a + np.triu(rng.normal(size=a.shape[-2:]) * 50)
  direction = rng.normal(size=a.shape)
  with jax.enable_x64(True):
    inverse = np.asarray(deltanet.unit_lower_inverse(jnp.asarray(upper_ignored)))
    cotangent = jax.grad(lambda x: jnp.sum(deltanet.unit_lower_inverse(x) * direction))(jnp.asarray(a))
  expected = np.linalg.inv(np.eye(9) + np.tril(a, -1))
  np.testing.assert_allclose(inverse, expected, rtol=1e-12, atol=1e-12)
  eps = 1e-6  # central differences of <T(A), direction> along a strictly lower perturbation
  step = np.tril(rng.normal(size=a.shape), -1)
  along = lambda x: np.sum(np.linalg.inv(np.eye(9) + np.tril(x, -1)) * direction)
  numeric = (along(a + eps * step) - along(a - eps * step)) / (2 * eps)
  assert np.triu(np.asarray(cotangent)).max() == 0.0 == np.triu(np.asarray(cotangent)).min()
  np.testing.assert_allclose(np.sum(np.asarray(cotangent) * step), numeric, rtol=1e-7)


def test_the_chunked_gradient_calls_no_lapack_kernel(rng):
  """jaxlib's CPU triangular solve deadlocked with two in flight on a 2-core host (unit_lower_inverse)."""
  q, k, v, g, beta = map(jnp.asarray, inputs(rng, b=1, t=130, hk=1, hv=2, dk=4, dv=3))
  grad = jax.jit(jax.grad(lambda *x: deltanet.gated_delta_rule(*x).out.sum(), argnums=range(5)))
  compiled = grad.lower(q, k, v, g, beta).compile().as_text()
  assert "custom-call" not in compiled and "custom_call" not in compiled


def test_causal_conv_taps_stay_inside_their_document(rng):
  x = rng.normal(size=(2, 12, 5)).astype(np.float32)
  kernel = rng.normal(size=(4, 5)).astype(np.float32)
  segments = np.array([[1] * 5 + [2] * 7, [3] * 12])
  run = deltanet.runs(jnp.asarray(segments), (2, 12))
  got = np.asarray(deltanet.causal_conv(jnp.asarray(x), jnp.asarray(kernel), run))
  want = np.zeros_like(got, dtype=np.float64)
  for r in range(2):
    for t in range(12):
      for j in range(4):
        source = t - 3 + j
        if source >= 0 and segments[r, source] == segments[r, t]:
          want[r, t] += x[r, source] * kernel[j]
  np.testing.assert_allclose(got, want, atol=1e-5)
