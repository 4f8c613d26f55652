import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import reference as ref
from tailjax import head, losses


def logits_pair(rng, shape, scale=3.0, noise=0.3, offset=0.0):
  a = (rng.standard_normal(shape) * scale).astype(np.float32)
  b = (a + noise * rng.standard_normal(shape) + offset).astype(np.float32)
  return a, b


def test_cross_entropy_matches_float64(rng):
  logits = (rng.standard_normal((3, 17, 501)) * 4).astype(np.float32)
  targets = rng.integers(0, 501, (3, 17))
  got = losses.cross_entropy(logits, targets)
  assert got.shape == (3, 17) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref.cross_entropy(logits, targets), rtol=1e-5, atol=1e-5)


def test_kl_matches_float64_across_scales(rng):
  for noise in (1e-2, 1e-1, 1.0, 5.0):
    a, b = logits_pair(rng, (4, 9, 700), noise=noise)
    np.testing.assert_allclose(losses.kl_divergence(ref_logits=a, cand_logits=b), ref.kl(a, b), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("offset", [0.0, 7.0, -300.0])
def test_kl_keeps_precision_down_to_1e_minus_8(rng, offset):
  """Near-lossless candidates: within 1% of float64 on the same float32 logits, never negative."""
  worst = {}
  for noise in (3e-5, 1e-4, 1e-3, 1e-2):
    a, b = logits_pair(rng, (64, 32000), noise=noise, offset=offset)
    got, want = np.asarray(losses.kl_divergence(ref_logits=a, cand_logits=b)), ref.kl(a, b)
    assert np.all(got >= 0)
    worst[noise] = np.max(np.abs(got - want) / want)
    assert want.min() < 1e-8 or noise > 3e-5
  assert max(worst.values()) < 0.01, worst


def test_textbook_kl_is_what_we_fix(rng):
  """The float32 textbook formula fails on these inputs (so the precision test above can fail)."""
  a, b = logits_pair(rng, (64, 32000), noise=1e-4)
  lp, lq = jax.nn.log_softmax(a), jax.nn.log_softmax(b)
  textbook = np.asarray(jnp.sum(jnp.exp(lp) * (lp - lq), -1))
  assert np.max(np.abs(textbook - ref.kl(a, b)) / ref.kl(a, b)) > 1.0


def test_kl_bfloat16_inputs(rng):
  a, b = logits_pair(rng, (8, 5, 300), noise=0.05)
  a16, b16 = jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)
  got = losses.kl_divergence(ref_logits=a16, cand_logits=b16)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref.kl(np.asarray(a16, np.float32), np.asarray(b16, np.float32)), rtol=1e-4)


def test_extreme_logits_stay_finite_and_correct(rng):
  shape = (6, 2000)
  a = rng.uniform(-1e4, 1e4, shape).astype(np.float32)
  b = rng.uniform(-1e4, 1e4, shape).astype(np.float32)
  near = (a + rng.uniform(-1e-2, 1e-2, shape)).astype(np.float32)
  targets = rng.integers(0, 2000, 6)
  for cand in (b, near):
    got = np.asarray(losses.kl_divergence(ref_logits=a, cand_logits=cand))
    assert np.all(np.isfinite(got)) and np.all(got >= 0)
    np.testing.assert_allclose(got, ref.kl(a, cand), rtol=1e-3, atol=1e-6)
  np.testing.assert_allclose(losses.cross_entropy(a, targets), ref.cross_entropy(a, targets), rtol=1e-6)
  np.testing.assert_allclose(losses.jensen_shannon(ref_logits=a, cand_logits=b), ref.jensen_shannon(a, b, 0.5),
                             rtol=1e-3, atol=1e-6)


def test_candidate_ruling_out_a_reference_token_is_infinite():
  a = jnp.array([[0.0, 0.0, 0.0]])
  b = jnp.array([[0.0, 0.0, -jnp.inf]])
  assert np.isinf(losses.kl_divergence(ref_logits=a, cand_logits=b)[0])
  assert losses.kl_divergence(ref_logits=b, cand_logits=a)[0] == pytest.approx(np.log(3 / 2), rel=1e-6)


def test_nan_logits_propagate_for_the_statistics_to_count():
  a = jnp.zeros((2, 4)).at[1, 2].set(jnp.nan)
  got = losses.kl_divergence(ref_logits=a, cand_logits=jnp.zeros((2, 4)))
  assert got[0] == 0.0 and np.isnan(got[1])


def test_reverse_kl_and_jensen_shannon(rng):
  a, b = logits_pair(rng, (5, 7, 211), noise=1.0)
  np.testing.assert_allclose(losses.reverse_kl_divergence(ref_logits=a, cand_logits=b), ref.kl(b, a), rtol=1e-4, atol=1e-7)
  for beta in (0.5, 0.1, 0.9):
    np.testing.assert_allclose(losses.jensen_shannon(ref_logits=a, cand_logits=b, beta=beta),
                               ref.jensen_shannon(a, b, beta), rtol=1e-4,
                               atol=1e-7)
  assert np.all(np.asarray(losses.jensen_shannon(ref_logits=a, cand_logits=b)) <= np.log(2))
  with pytest.raises(ValueError, match="beta"):
    losses.jensen_shannon(ref_logits=a, cand_logits=b, beta=1.0)


def test_top1_agreement_with_ties():
  a = jnp.array([[1.0, 3.0, 3.0, 0.0], [5.0, 5.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
  b = jnp.array([[1.0, 3.0, 2.0, 0.0], [4.0, 5.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
  # Ties go to the lowest id: ref picks 1, 0, 0; cand picks 1, 1, 1.
  np.testing.assert_array_equal(losses.top1_agreement(ref_logits=a, cand_logits=b), [1.0, 0.0, 0.0])


def test_target_logprob_delta_sign(rng):
  a, b = logits_pair(rng, (4, 6, 50), noise=0.5)
  targets = rng.integers(0, 50, (4, 6))
  want = ref.cross_entropy(a, targets) - ref.cross_entropy(b, targets)
  np.testing.assert_allclose(losses.target_logprob_delta(ref_logits=a, cand_logits=b, targets=targets), want,
                             rtol=1e-5, atol=1e-5)
  boosted = b.copy()
  np.put_along_axis(boosted, targets[..., None], 50.0, axis=-1)
  assert np.all(np.asarray(losses.target_logprob_delta(ref_logits=a, cand_logits=boosted, targets=targets)) > 0)


def test_masks_zero_out_tokens_and_empty_masks(rng):
  a, b = logits_pair(rng, (2, 8, 40))
  targets = rng.integers(0, 40, (2, 8))
  where = rng.random((2, 8)) > 0.5
  for fn in (lambda **kw: losses.kl_divergence(ref_logits=a, cand_logits=b, **kw),
             lambda **kw: losses.cross_entropy(a, targets, **kw),
             lambda **kw: losses.jensen_shannon(ref_logits=a, cand_logits=b, **kw),
             lambda **kw: losses.top1_agreement(ref_logits=a, cand_logits=b, **kw),
             lambda **kw: losses.topk_kl_divergence(student_logits=b, teacher=a, k=5, **kw)):
    full, masked = np.asarray(fn()), np.asarray(fn(where=where))
    np.testing.assert_array_equal(masked, np.where(where, full, 0.0))
    np.testing.assert_array_equal(fn(where=np.zeros((2, 8), bool)), 0.0)
  empty = losses.kl_divergence(ref_logits=np.zeros((0, 40), np.float32), cand_logits=np.zeros((0, 40), np.float32))
  assert empty.shape == (0,)


def test_vocabulary_padding_and_mismatch(rng):
  a, b = logits_pair(rng, (3, 100))
  padded = np.concatenate([b, rng.standard_normal((3, 28)).astype(np.float32) * 50], -1)
  np.testing.assert_allclose(losses.kl_divergence(ref_logits=a, cand_logits=padded, vocab_size=100), ref.kl(a, b),
                             rtol=1e-5)
  with pytest.raises(ValueError, match=r"reference has 100 entries, candidate has 128"):
    losses.kl_divergence(ref_logits=a, cand_logits=padded)
  with pytest.raises(ValueError, match=r"100 vocabulary entries, fewer than the declared vocab_size=120"):
    losses.kl_divergence(ref_logits=a, cand_logits=padded, vocab_size=120)


def test_two_distribution_functions_take_keywords_only(rng):
  """Which distribution is the reference (teacher) is said by name, never by position."""
  a, b = logits_pair(rng, (2, 5))
  for fn in (losses.kl_divergence, losses.reverse_kl_divergence, losses.jensen_shannon, losses.top1_agreement):
    with pytest.raises(TypeError, match="positional"):
      fn(a, b)
  with pytest.raises(TypeError, match="positional"):
    losses.topk_kl_divergence(b, a, k=2)
  with pytest.raises(TypeError, match="positional"):
    head.kl_divergence(a, np.eye(5, dtype=np.float32), b, np.eye(5, dtype=np.float32))


def test_jit_vmap_grad(rng):
  a, b = logits_pair(rng, (3, 4, 30), noise=0.5)
  targets = rng.integers(0, 30, (3, 4))
  kl = lambda x, y: losses.kl_divergence(ref_logits=x, cand_logits=y)
  jitted, mapped = jax.jit(kl)(a, b), jax.vmap(kl)(a, b)
  np.testing.assert_allclose(jitted, losses.kl_divergence(ref_logits=a, cand_logits=b), rtol=1e-6)
  np.testing.assert_allclose(mapped, losses.kl_divergence(ref_logits=a, cand_logits=b), rtol=1e-6)
  a64, b64 = a.astype(np.float64), b.astype(np.float64)
  with jax.enable_x64(True):
    for fn in (lambda x, y: losses.kl_divergence(ref_logits=x, cand_logits=y),
               lambda x, y: losses.jensen_shannon(ref_logits=x, cand_logits=y),
               lambda x, y: losses.cross_entropy(x, targets) + losses.cross_entropy(y, targets),
               lambda x, y: losses.topk_kl_divergence(student_logits=y, teacher=x, k=7),
               lambda x, y: losses.topk_kl_divergence(student_logits=y, teacher=x, k=7, normalization="tail",
                                                      temperature=2.0)):
      check_grads(fn, (a64, b64), order=1, modes=("rev",), atol=1e-3, rtol=1e-3)


def test_kl_gradient_is_q_minus_p(rng):
  a, b = logits_pair(rng, (5, 64), noise=1e-3)
  grad = jax.grad(lambda y: losses.kl_divergence(ref_logits=a, cand_logits=y).sum())(b)
  want = np.exp(ref.f64(jax.nn.log_softmax(b))) - np.exp(ref.f64(jax.nn.log_softmax(a)))
  np.testing.assert_allclose(grad, want, atol=1e-7)
  assert np.all(np.isfinite(jax.grad(lambda y: losses.kl_divergence(ref_logits=a, cand_logits=y).sum())(a)))


@pytest.mark.parametrize("normalization", ["full", "topk", "tail"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_kl_matches_float64(rng, normalization, temperature):
  student, teacher = logits_pair(rng, (2, 6, 300), noise=1.5)
  for k in (1, 5, 40):
    got = losses.topk_kl_divergence(student_logits=student, teacher=teacher, k=k, normalization=normalization,
                                    temperature=temperature)
    want = ref.topk_kl(student, teacher, k, normalization, temperature)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    cached = losses.teacher_topk(teacher, k, temperature=temperature)
    np.testing.assert_allclose(
        losses.topk_kl_divergence(student_logits=student, teacher=cached, normalization=normalization,
                                  temperature=temperature), got,
        rtol=1e-6)


def test_topk_with_k_equal_vocab_is_full_kl(rng):
  student, teacher = logits_pair(rng, (4, 50), noise=1.0)
  for normalization in ("full", "topk", "tail"):
    np.testing.assert_allclose(losses.topk_kl_divergence(student_logits=student, teacher=teacher, k=50,
                                                         normalization=normalization),
                               ref.kl(teacher, student), rtol=1e-4, atol=1e-6)


def test_kl_chain_rule_identity(rng):
  """full KL = binary KL of top-K mass + M KL(head) + (1 - M) KL(tail); "tail" form = binary + M KL(head)."""
  student, teacher = logits_pair(rng, (8, 400), noise=2.0)
  k = 12
  lp, lq = jax.nn.log_softmax(ref.f64(teacher)), jax.nn.log_softmax(ref.f64(student))
  p, q = np.exp(np.asarray(lp, np.float64)), np.exp(np.asarray(lq, np.float64))
  ids = np.argsort(-p, -1, kind="stable")
  head_ids, tail_ids = ids[:, :k], ids[:, k:]
  take = lambda x, i: np.take_along_axis(x, i, -1)
  mass_p, mass_q = take(p, head_ids).sum(-1), take(q, head_ids).sum(-1)
  binary = ref.kl_probs(np.stack([mass_p, 1 - mass_p], -1), np.stack([mass_q, 1 - mass_q], -1))
  kl_tail = ref.kl_probs(take(p, tail_ids) / (1 - mass_p)[:, None], take(q, tail_ids) / (1 - mass_q)[:, None])
  head_kl = np.asarray(losses.topk_kl_divergence(student_logits=student, teacher=teacher, k=k, normalization="topk"),
                       np.float64)
  tail_form = np.asarray(losses.topk_kl_divergence(student_logits=student, teacher=teacher, k=k, normalization="tail"),
                         np.float64)
  full_kl = np.asarray(losses.kl_divergence(ref_logits=teacher, cand_logits=student), np.float64)
  np.testing.assert_allclose(full_kl, binary + mass_p * head_kl + (1 - mass_p) * kl_tail, rtol=1e-4)
  np.testing.assert_allclose(tail_form, binary + mass_p * head_kl, rtol=1e-4)
  full_form = np.asarray(losses.topk_kl_divergence(student_logits=student, teacher=teacher, k=k), np.float64)
  np.testing.assert_allclose(full_form, head_kl - np.log(mass_q), rtol=1e-4)


def test_teacher_topk_ties_and_bad_k():
  logits = jnp.array([[0.0, 2.0, 2.0, 1.0, 2.0]])
  top = losses.teacher_topk(logits, 3)
  np.testing.assert_array_equal(top.ids, [[1, 2, 4]])
  np.testing.assert_allclose(jnp.exp(top.logprobs).sum() + jnp.exp(jax.nn.log_softmax(logits))[0, [0, 3]].sum(), 1.0,
                             rtol=1e-6)
  with pytest.raises(ValueError, match="k=6"):
    losses.teacher_topk(logits, 6)
  with pytest.raises(ValueError, match="k is required"):
    losses.topk_kl_divergence(student_logits=logits, teacher=logits)
  with pytest.raises(ValueError, match="normalization"):
    losses.topk_kl_divergence(student_logits=logits, teacher=logits, k=2, normalization="bogus")


def test_topk_kl_under_jit_with_static_options(rng):
  student, teacher = logits_pair(rng, (3, 20))
  fn = jax.jit(functools.partial(losses.topk_kl_divergence, k=4, normalization="tail"))
  np.testing.assert_allclose(fn(student_logits=student, teacher=teacher), ref.topk_kl(student, teacher, 4, "tail"),
                             rtol=1e-4)


def _masked_kl(ref_logits, cand_logits):
  """Float64 KL(p || q) summed where p > 0 only (a -inf logit: p = 0, no term)."""
  lp, lq = ref.f64(ref_logits), ref.f64(cand_logits)
  lp, lq = lp - ref.lse(lp)[..., None], lq - ref.lse(lq)[..., None]
  p = np.exp(lp)
  with np.errstate(invalid="ignore"):  # -inf - -inf where both rule a token out: no term
    return np.sum(np.where(p > 0, p * (np.where(p > 0, lp - lq, 0)), 0.0), axis=-1)


def _masked_js(ref_logits, cand_logits):
  lp, lq = ref.f64(ref_logits), ref.f64(cand_logits)
  p, q = np.exp(lp - ref.lse(lp)[..., None]), np.exp(lq - ref.lse(lq)[..., None])
  m = (p + q) / 2
  part = lambda x: np.where(x > 0, x * np.log(np.where(x > 0, x, 1) / m), 0.0)
  return 0.5 * np.sum(part(p) + part(q), axis=-1)


@pytest.mark.parametrize("neg", [-1e9, -1e30, float(np.finfo(np.float32).min)])
def test_large_finite_negative_masks_count_as_zero_probability(rng, neg):
  """JAX code masks with -1e9 or finfo.min as often as with -inf: wherever the reference's probability underflows
  to 0 the token adds nothing (the candidate's mass there still counts), as for -inf; materialized and fused."""
  a, b = logits_pair(rng, (3, 6, 97))
  masked = rng.random(a.shape) < 0.3
  with_neg = np.where(masked, neg, a).astype(np.float32)
  want_kl, want_js = _masked_kl(np.where(masked, -np.inf, a), b), _masked_js(np.where(masked, -np.inf, a), b)
  assert want_kl.min() > 1e-3
  np.testing.assert_allclose(losses.kl_divergence(ref_logits=with_neg, cand_logits=b), want_kl, rtol=1e-5)
  np.testing.assert_allclose(losses.jensen_shannon(ref_logits=with_neg, cand_logits=b), want_js, rtol=1e-4)
  # the candidate masked the same way as the reference: only the unmasked tokens compared
  both = np.where(masked, neg, b).astype(np.float32)
  np.testing.assert_allclose(losses.kl_divergence(ref_logits=with_neg, cand_logits=both),
                             _masked_kl(np.where(masked, -np.inf, a), np.where(masked, -np.inf, b)), rtol=1e-5)
  # the fused head: one-hot hidden states select each token's row of logits exactly
  rows = with_neg.reshape(-1, 97)
  eye = np.eye(rows.shape[0], dtype=np.float32)
  for block_size in (7, 97):
    stats = head.token_stats(ref_hidden=eye, ref_unembedding=rows, cand_hidden=eye,
                             cand_unembedding=b.reshape(-1, 97), targets=np.zeros(rows.shape[0], int),
                             block_size=block_size, jensen_shannon=True)
    np.testing.assert_allclose(stats.kld, want_kl.reshape(-1), rtol=1e-5)
    np.testing.assert_allclose(stats.jensen_shannon, want_js.reshape(-1), rtol=1e-4)
    np.testing.assert_allclose(
        head.kl_divergence(ref_hidden=eye, ref_unembedding=rows, cand_hidden=eye,
                           cand_unembedding=b.reshape(-1, 97), block_size=block_size), want_kl.reshape(-1), rtol=1e-5)
