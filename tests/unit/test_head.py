import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference as ref
from tailjax import head, losses


def model_pair(rng, n=(2, 19), d=24, v=1000, noise=0.05):
  h = rng.standard_normal(n + (d,)).astype(np.float32)
  w = (rng.standard_normal((d, v)) / np.sqrt(d) * 3).astype(np.float32)
  h_c = (h + noise * rng.standard_normal(h.shape)).astype(np.float32)
  w_c = (w + noise * rng.standard_normal(w.shape) / np.sqrt(d)).astype(np.float32)
  return h, w, h_c, w_c


def logits(h, w):
  return jnp.einsum("...d,dv->...v", h, w, precision="highest")


@pytest.mark.parametrize("block_size", [1, 128, 333, 1000, 4096])
def test_token_stats_match_materialized_losses(rng, block_size):
  h, w, h_c, w_c = model_pair(rng)
  targets = rng.integers(0, 1000, (2, 19))
  a, c = logits(h, w), logits(h_c, w_c)
  with jax.default_matmul_precision("highest"):
    got = head.token_stats(ref_hidden=h, ref_unembedding=w, cand_hidden=h_c, cand_unembedding=w_c, targets=targets,
                           block_size=block_size)
  np.testing.assert_allclose(got.kld, ref.kl(a, c), rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(got.ref_ce, ref.cross_entropy(a, targets), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got.cand_ce, ref.cross_entropy(c, targets), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got.ref_top1_prob, np.exp(ref.f64(a).max(-1) - ref.lse(a)), rtol=1e-5)
  np.testing.assert_array_equal(got.top1_agreement, losses.top1_agreement(ref_logits=a, cand_logits=c))
  np.testing.assert_allclose(got.logprob_delta,
                             losses.target_logprob_delta(ref_logits=a, cand_logits=c, targets=targets), atol=2e-5)
  assert got.kld.shape == (2, 19)


def test_candidates_share_one_pass_and_match_float64(rng):
  h, w, h_c, w_c = model_pair(rng)
  candidates = [(h_c, w_c), (h, w_c * 1.5), (h_c * 0.5, w)]
  targets = rng.integers(0, 1000, (2, 19))
  where = rng.random((2, 19)) < 0.8
  a = logits(h, w)
  with jax.default_matmul_precision("highest"):
    result = head.candidates_token_stats(ref_hidden=h, ref_unembedding=w, candidates=candidates, targets=targets,
                                         where=where, block_size=333)
  stats = result.candidates  # one type with or without the reference's top-K
  assert len(stats) == 3 and result.reference_topk is None
  for got, (hc, wc) in zip(stats, candidates):
    c = logits(hc, wc)
    np.testing.assert_allclose(got.kld, np.where(where, ref.kl(a, c), 0), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(got.ref_ce, np.where(where, ref.cross_entropy(a, targets), 0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.cand_ce, np.where(where, ref.cross_entropy(c, targets), 0), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got.top1_agreement,
                                  np.where(where, losses.top1_agreement(ref_logits=a, cand_logits=c), 0))
  with jax.default_matmul_precision("highest"):
    again, top = head.candidates_token_stats(ref_hidden=h, ref_unembedding=w, candidates=candidates, targets=targets,
                                             where=where, block_size=333, reference_topk=7)
  for x, y in zip(again, stats):
    np.testing.assert_array_equal(x.kld, y.kld)
  logprobs = ref.f64(a) - ref.lse(a)[..., None]
  order = np.argsort(-logprobs, axis=-1, kind="stable")[..., :7]
  np.testing.assert_array_equal(top.ids, order)
  np.testing.assert_allclose(top.logprobs, np.take_along_axis(logprobs, order, -1), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="reference_topk=1001"):
    head.candidates_token_stats(ref_hidden=h, ref_unembedding=w, candidates=candidates, targets=targets,
                                reference_topk=1001)


@pytest.mark.parametrize("block_size", [1, 7, 333, 1000])
def test_reverse_kl_entropy_and_top_k_overlaps_match_float64(rng, block_size):
  """The values of the same vocabulary pass beyond KLD: KL(cand || ref), H(p_ref), top-5 / top-10 overlap and the
  reference's top-1 among the candidate's top 5, against NumPy in float64, with ties (logits on a coarse grid:
  the lower token id ranks first, as for the arg-max)."""
  h, w, h_c, w_c = model_pair(rng)
  w, w_c = np.round(w * 2) / 2, np.round(w_c * 2) / 2  # coarse weights ...
  h, h_c = np.round(h), np.round(h_c)  # ... and integer states: many exactly equal logits
  targets = rng.integers(0, 1000, (2, 19))
  a, c = ref.f64(logits(h, w)), ref.f64(logits(h_c, w_c))
  assert max(len(row) - len(np.unique(row)) for row in a.reshape(-1, a.shape[-1])) > 100  # ties are common
  with jax.default_matmul_precision("highest"):
    got = head.token_stats(ref_hidden=h, ref_unembedding=w, cand_hidden=h_c, cand_unembedding=w_c, targets=targets,
                           block_size=block_size)
  np.testing.assert_allclose(got.reverse_kld, ref.kl(c, a), rtol=1e-4, atol=1e-7)
  p = np.exp(a - ref.lse(a)[..., None])
  np.testing.assert_allclose(got.ref_entropy, -(p * np.log(np.maximum(p, 1e-300))).sum(-1), rtol=1e-5, atol=1e-6)
  rank = lambda z, n: np.argsort(-z, axis=-1, kind="stable")[..., :n]  # stable: the lower id first among equals
  shared = lambda n: np.array([[len(set(x) & set(y)) for x, y in zip(xs, ys)] for xs, ys in zip(rank(a, n), rank(c, n))])
  np.testing.assert_array_equal(np.round(np.asarray(got.top5_overlap) * 5), shared(5))  # counts, exactly
  np.testing.assert_array_equal(np.round(np.asarray(got.top10_overlap) * 10), shared(10))
  np.testing.assert_array_equal(got.top1_in_top5, (rank(c, 5) == rank(a, 1)).any(-1).astype(np.float32))
  assert 0 < np.mean(got.top5_overlap) < 1  # neither all nor none: the comparison could fail


@pytest.mark.parametrize("block_size", [1, 100, 1000])
def test_logprobs_and_argmax_in_one_pass_match_float64(rng, block_size):
  h, w, _, _ = model_pair(rng)
  w[:, 17] = w[:, 901] = 2 * h[0, 0]  # ids 17 and 901 tie for the top of token (0, 0): the first must win
  ids = rng.integers(0, 1000, (2, 19, 5))
  a = ref.f64(logits(h, w))
  with jax.default_matmul_precision("highest"):
    got, argmax = head.logprobs_and_argmax(h, w, ids, block_size=block_size)
  np.testing.assert_allclose(got, np.take_along_axis(a - ref.lse(a)[..., None], ids, -1), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(argmax, np.argmax(np.asarray(logits(h, w)), -1))
  assert argmax[0, 0] == 17
  assert argmax.shape == (2, 19) and got.shape == (2, 19, 5)


def exact_model_pair(rng, n=48, d=64, v=5000, flips=1):
  """Weights on a 2^-12 grid and hidden states in {-1, 0, 1}: every float32 logit is exact,
  so materialized and blockwise paths see identical logits, and float64 is the truth."""
  h = rng.integers(-1, 2, (n, d)).astype(np.float32)
  w = (rng.integers(-4096, 4097, (d, v)) / 4096).astype(np.float32)
  w_c = w.copy()
  rows, cols = rng.integers(0, d, flips * v), rng.integers(0, v, flips * v)
  w_c[rows, cols] += rng.choice([-1, 1], flips * v) / 4096
  return h, w, w_c


def test_fused_kl_keeps_precision_down_to_1e_minus_8(rng):
  h, w, w_c = exact_model_pair(rng)
  a, c = h @ w.astype(np.float64), h @ w_c.astype(np.float64)
  assert np.array_equal(a, np.asarray(logits(h, w), np.float64))  # the construction is exact
  want = ref.kl(a, c)
  assert want.min() < 1e-8 < want.max()
  for fn in (lambda: head.token_stats(ref_hidden=h, ref_unembedding=w, cand_hidden=h, cand_unembedding=w_c,
                                      targets=np.zeros(48, np.int32), block_size=512).kld,
             lambda: head.kl_divergence(ref_hidden=h, ref_unembedding=w, cand_hidden=h, cand_unembedding=w_c,
                                        block_size=700)):
    got = np.asarray(fn())
    assert np.all(got >= 0)
    assert np.max(np.abs(got - want) / want) < 0.01


@pytest.mark.parametrize("block_size", [1, 333, 1000])
def test_jensen_shannon_second_pass_matches_float64(rng, block_size):
  """JS(p_ref, p_cand) from the second pass, two candidates at once (near and far), against float64; bounded by
  log 2; absent unless asked."""
  h, w, h_c, w_c = model_pair(rng)
  _, _, h_far, w_far = model_pair(rng, noise=1.5)
  a, c, far = (ref.f64(logits(x, y)) for x, y in ((h, w), (h_c, w_c), (h_far, w_far)))
  targets = rng.integers(0, 1000, (2, 19))
  with jax.default_matmul_precision("highest"):
    near_stats, far_stats = head.candidates_token_stats(
        ref_hidden=h, ref_unembedding=w, candidates=[(h_c, w_c), (h_far, w_far)], targets=targets,
        block_size=block_size, jensen_shannon=True).candidates
    plain = head.token_stats(ref_hidden=h, ref_unembedding=w, cand_hidden=h_c, cand_unembedding=w_c, targets=targets)
  np.testing.assert_allclose(near_stats.jensen_shannon, ref.jensen_shannon(a, c, 0.5), rtol=1e-4, atol=1e-8)
  np.testing.assert_allclose(far_stats.jensen_shannon, ref.jensen_shannon(a, far, 0.5), rtol=1e-4, atol=1e-7)
  assert 0.05 < np.max(far_stats.jensen_shannon) <= np.log(2)
  assert plain.jensen_shannon is None


def test_jensen_shannon_keeps_precision_down_to_1e_minus_8(rng):
  """Exact float32 logits (float64 is the truth): JS within 1% down to ~1e-9, never negative."""
  h, w, w_c = exact_model_pair(rng)
  a, c = h @ w.astype(np.float64), h @ w_c.astype(np.float64)
  want = ref.jensen_shannon(a, c, 0.5)
  assert want.min() < 1e-8 < want.max()
  got = np.asarray(head.token_stats(ref_hidden=h, ref_unembedding=w, cand_hidden=h, cand_unembedding=w_c,
                                    targets=np.zeros(48, np.int32), block_size=512, jensen_shannon=True).jensen_shannon)
  assert np.all(got >= 0) and np.max(np.abs(got - want) / want) < 0.01


def test_jensen_shannon_block_handles_ruled_out_tokens():
  """A token one model rules out (-inf) carries half its mass times log 2; both ruling it out, nothing."""
  from tailjax import online

  a = np.array([[0.0, -np.inf, 1.0, -np.inf, 0.5]], np.float32)
  b = np.array([[0.3, 2.0, -np.inf, -np.inf, 0.5]], np.float32)
  lse = lambda z: np.log(np.sum(np.exp(z.astype(np.float64)), -1))
  p, q = np.exp(a - lse(a)[:, None]), np.exp(b - lse(b)[:, None])
  m = (p + q) / 2
  part = lambda x: np.where(x > 0, x * np.log(np.where(x > 0, x, 1) / np.where(m > 0, m, 1)), 0.0)
  want = 0.5 * (part(p) + part(q)).sum(-1)
  shift = online.kl_shift(online.kl_block(jnp.asarray(a), jnp.asarray(b)))  # the KL is inf: the shift is still exact
  got = online.js_block(jnp.asarray(a), jnp.asarray(b), jnp.asarray(lse(a), jnp.float32),
                        jnp.asarray(lse(b), jnp.float32), shift)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_argmax_ties_across_blocks():
  h = jnp.ones((1, 1))
  w = jnp.array([[0.0, 5.0, 1.0, 5.0, 5.0, 2.0]])
  w_c = jnp.array([[0.0, 4.0, 1.0, 5.0, 5.0, 2.0]])
  for block in (1, 2, 4):
    stats = head.token_stats(ref_hidden=h, ref_unembedding=w, cand_hidden=h, cand_unembedding=w_c,
                             targets=jnp.zeros(1, jnp.int32), block_size=block)
    np.testing.assert_array_equal(stats.top1_agreement, [0.0])  # ref picks id 1, cand id 3
    stats = head.token_stats(ref_hidden=h, ref_unembedding=w, cand_hidden=h, cand_unembedding=w,
                             targets=jnp.zeros(1, jnp.int32), block_size=block)
    np.testing.assert_array_equal(stats.top1_agreement, [1.0])
    top = head.teacher_topk(h, w, 3, block_size=block)
    np.testing.assert_array_equal(top.ids, [[1, 3, 4]])


def test_padded_vocabulary_and_mismatch(rng):
  h, w, h_c, w_c = model_pair(rng, v=300)
  targets = rng.integers(0, 300, (2, 19))
  padded = np.concatenate([w_c, rng.standard_normal((w_c.shape[0], 20)).astype(np.float32) * 9], axis=1)
  with jax.default_matmul_precision("highest"):
    want = head.token_stats(ref_hidden=h, ref_unembedding=w, cand_hidden=h_c, cand_unembedding=w_c, targets=targets,
                            block_size=64)
    got = head.token_stats(ref_hidden=h, ref_unembedding=w, cand_hidden=h_c, cand_unembedding=padded, targets=targets,
                           vocab_size=300, block_size=64)
  for g, x in zip(got, want):
    if x is None:  # jensen_shannon: not asked
      assert g is None
    else:
      np.testing.assert_allclose(g, x, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="reference unembedding has 300 columns, candidate has 320"):
    head.token_stats(ref_hidden=h, ref_unembedding=w, cand_hidden=h_c, cand_unembedding=padded, targets=targets)
  with pytest.raises(ValueError, match="fewer than vocab_size=400"):
    head.cross_entropy(h, w, targets, vocab_size=400)
  with pytest.raises(ValueError, match=r"must be \[d, V\]"):
    head.cross_entropy(h, w[None], targets)


def test_masks(rng):
  h, w, h_c, w_c = model_pair(rng)
  targets = rng.integers(0, 1000, (2, 19))
  where = rng.random((2, 19)) > 0.3
  full = head.token_stats(ref_hidden=h, ref_unembedding=w, cand_hidden=h_c, cand_unembedding=w_c, targets=targets,
                          jensen_shannon=True)
  masked = head.token_stats(ref_hidden=h, ref_unembedding=w, cand_hidden=h_c, cand_unembedding=w_c, targets=targets,
                            where=where, jensen_shannon=True)
  for f, m in zip(full, masked):  # every value, Jensen-Shannon included
    np.testing.assert_array_equal(m, np.where(where, f, 0.0))
  np.testing.assert_array_equal(head.cross_entropy(h, w, targets, where=np.zeros((2, 19), bool)), 0.0)


@pytest.mark.parametrize("normalization", ["full", "topk", "tail"])
def test_topk_kl_value_and_gradient_match_materialized(rng, normalization):
  h, w, h_s, w_s = model_pair(rng, v=700, noise=0.3)
  teacher = head.teacher_topk(h, w, 9, temperature=1.5, block_size=128)
  fused = lambda hs, ws: head.topk_kl_divergence(student_hidden=hs, student_unembedding=ws, teacher=teacher,
                                                 normalization=normalization, temperature=1.5,
                                                 block_size=128).sum()
  plain = lambda hs, ws: losses.topk_kl_divergence(student_logits=logits(hs, ws), teacher=teacher,
                                                   normalization=normalization,
                                                   temperature=1.5).sum()
  with jax.default_matmul_precision("highest"):
    v_fused, g_fused = jax.value_and_grad(fused, (0, 1))(h_s, w_s)
    v_plain, g_plain = jax.value_and_grad(plain, (0, 1))(h_s, w_s)
  np.testing.assert_allclose(v_fused, v_plain, rtol=1e-5)
  for gf, gp in zip(g_fused, g_plain):
    np.testing.assert_allclose(gf, gp, rtol=1e-4, atol=1e-5)


def test_teacher_topk_matches_materialized(rng):
  h, w, _, _ = model_pair(rng, v=1500)
  with jax.default_matmul_precision("highest"):
    got = head.teacher_topk(h, w, 40, temperature=0.7, block_size=256)
    want = losses.teacher_topk(logits(h, w), 40, temperature=0.7)
  np.testing.assert_array_equal(got.ids, want.ids)
  np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="k=1501"):
    head.teacher_topk(h, w, 1501)


def test_cross_entropy_and_kl_gradients_match_materialized(rng):
  h, w, h_c, w_c = model_pair(rng, v=900, noise=0.2)
  targets = rng.integers(0, 900, (2, 19))
  cases = [
      (lambda hc, wc: head.cross_entropy(hc, wc, targets, block_size=200).sum(),
       lambda hc, wc: losses.cross_entropy(logits(hc, wc), targets).sum()),
      (lambda hc, wc: head.kl_divergence(ref_hidden=h, ref_unembedding=w, cand_hidden=hc, cand_unembedding=wc,
                                         temperature=2.0, block_size=200).sum(),
       lambda hc, wc: losses.kl_divergence(ref_logits=logits(h, w) / 2, cand_logits=logits(hc, wc) / 2).sum()),
  ]
  with jax.default_matmul_precision("highest"):
    for fused, plain in cases:
      v_fused, g_fused = jax.value_and_grad(fused, (0, 1))(h_c, w_c)
      v_plain, g_plain = jax.value_and_grad(plain, (0, 1))(h_c, w_c)
      np.testing.assert_allclose(v_fused, v_plain, rtol=1e-5)
      for gf, gp in zip(g_fused, g_plain):
        np.testing.assert_allclose(gf, gp, rtol=1e-4, atol=1e-6)
  # The reference is a frozen teacher: no gradient reaches it.
  g_ref = jax.grad(lambda hr: head.kl_divergence(ref_hidden=hr, ref_unembedding=w, cand_hidden=h_c,
                                                 cand_unembedding=w_c).sum())(h)
  np.testing.assert_array_equal(g_ref, 0.0)


def test_bfloat16_and_jit(rng):
  h, w, h_c, w_c = model_pair(rng)
  targets = rng.integers(0, 1000, (2, 19))
  bf = lambda x: jnp.asarray(x, jnp.bfloat16)
  fn = jax.jit(functools.partial(head.token_stats, block_size=256))
  got = fn(ref_hidden=bf(h), ref_unembedding=bf(w), cand_hidden=bf(h_c), cand_unembedding=bf(w_c), targets=targets)
  a, c = (jnp.einsum("...d,dv->...v", bf(x), bf(y), preferred_element_type=jnp.float32)
          for x, y in ((h, w), (h_c, w_c)))
  assert got.kld.dtype == jnp.float32
  np.testing.assert_allclose(got.kld, losses.kl_divergence(ref_logits=a, cand_logits=c), rtol=1e-3, atol=1e-6)
  grads = jax.grad(lambda x: head.cross_entropy(x, bf(w_c), targets).sum())(bf(h_c))
  assert grads.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(grads, np.float32)))


def test_temporary_memory_is_flat_in_vocabulary():
  """Compiled temp memory of the fused pass stays ~[tokens, block]; the materialized one grows with V."""
  n, d, block = 256, 64, 1024
  temps = {}
  for v in (8192, 32768):
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((n, d), (d, v), (n, d), (d, v))]
    args.append(jax.ShapeDtypeStruct((n,), jnp.int32))
    stats = lambda hr, wr, hc, wc, t: head.token_stats(ref_hidden=hr, ref_unembedding=wr, cand_hidden=hc,
                                                       cand_unembedding=wc, targets=t, block_size=block)
    fused = jax.jit(stats).lower(*args).compile()
    naive = jax.jit(lambda hr, wr, hc, wc, t: losses.kl_divergence(ref_logits=hr @ wr, cand_logits=hc @ wc))
    naive = naive.lower(*args).compile()
    temps[v] = (fused.memory_analysis().temp_size_in_bytes, naive.memory_analysis().temp_size_in_bytes)
  assert temps[32768][0] < 1.2 * temps[8192][0]
  assert temps[32768][1] > 3 * temps[8192][1]
  assert temps[32768][0] * 10 < temps[32768][1]


def capped(z, cap):
  return cap * np.tanh(ref.f64(z) / cap)


@pytest.mark.parametrize("block_size", [128, 1000])
def test_final_logit_softcap_values_and_gradients_match_float64(rng, block_size):
  """Gemma 2's soft-cap, applied blockwise before every softmax: values and gradients vs float64 on the
  materialized capped logits (caps of 3 and 5 bite: the raw logits reach ~10)."""
  h, w, h_c, w_c = model_pair(rng)
  targets = rng.integers(0, 1000, (2, 19))
  ref_head, cand_head = head.OutputHead(jnp.asarray(w), 5.0), head.OutputHead(jnp.asarray(w_c), 3.0)
  raw_a, raw_c = ref.f64(logits(h, w)), ref.f64(logits(h_c, w_c))
  assert np.abs(raw_c).max() > 6
  a, c = capped(raw_a, 5.0), capped(raw_c, 3.0)
  with jax.default_matmul_precision("highest"):
    stats = head.token_stats(ref_hidden=h, ref_unembedding=ref_head, cand_hidden=h_c, cand_unembedding=cand_head,
                             targets=targets, block_size=block_size)
    ce = head.cross_entropy(h_c, cand_head, targets, block_size=block_size)
    top = head.teacher_topk(h, ref_head, 6, block_size=block_size)
    topk_kl = head.topk_kl_divergence(student_hidden=h_c, student_unembedding=cand_head, teacher=top,
                                      block_size=block_size)
    d_ce = jax.grad(lambda x, u: head.cross_entropy(x, head.OutputHead(u, 3.0), targets, block_size=block_size).sum(),
                    argnums=(0, 1))(h_c, w_c)
    d_kl = jax.grad(lambda x: head.kl_divergence(ref_hidden=h, ref_unembedding=ref_head, cand_hidden=x,
                                                 cand_unembedding=cand_head, temperature=2.0,
                                                 block_size=block_size).sum())(h_c)
  np.testing.assert_allclose(stats.kld, ref.kl(a, c), rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(stats.ref_ce, ref.cross_entropy(a, targets), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ce, ref.cross_entropy(c, targets), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(topk_kl, ref.topk_kl(c, a, 6, "full"), rtol=1e-4, atol=1e-6)
  assert np.abs(ref.kl(a, c) - ref.kl(raw_a, raw_c)).max() > 0.1  # the caps change the answer
  # d CE / d raw logits = (softmax(c) - onehot) * (1 - tanh^2); then through the matmul.
  g_c = np.exp(c - ref.lse(c)[..., None]) - np.eye(1000)[targets]
  g_raw = g_c * (1 - np.tanh(raw_c / 3.0)**2)
  np.testing.assert_allclose(d_ce[0], g_raw @ ref.f64(w_c).T, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(d_ce[1], np.einsum("ntd,ntv->dv", ref.f64(h_c), g_raw), rtol=1e-4, atol=1e-5)
  # d KL(p || q) / d raw candidate logits at temperature T = (q_T - p_T) / T * (1 - tanh^2).
  p, q = (np.exp(z / 2.0 - ref.lse(z / 2.0)[..., None]) for z in (a, c))
  g_raw = (q - p) / 2.0 * (1 - np.tanh(raw_c / 3.0)**2)
  np.testing.assert_allclose(d_kl, g_raw @ ref.f64(w_c).T, rtol=1e-4, atol=1e-6)


def test_embedding_rows_equal_the_transposed_matrix_in_values_and_gradients(rng):
  """A tied model's ``[V, d]`` embedding rows stand for its ``[d, V]`` transpose: every loss and gradient equal,
  the gradient in the rows' layout, and the compiled pass holds no transposed vocabulary matrix."""
  h, w, h_c, w_c = model_pair(rng, v=900, noise=0.2)
  targets = rng.integers(0, 900, (2, 19))
  rows = lambda x: head.EmbeddingRows(jnp.asarray(x).T)
  stats = head.token_stats(ref_hidden=h, ref_unembedding=rows(w), cand_hidden=h_c, cand_unembedding=rows(w_c),
                           targets=targets, block_size=200)
  plain = head.token_stats(ref_hidden=h, ref_unembedding=w, cand_hidden=h_c, cand_unembedding=w_c, targets=targets,
                           block_size=200)
  for got, want in zip(stats, plain):
    if want is None:  # jensen_shannon: not asked
      assert got is None
    else:
      np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(head.teacher_topk(h, rows(w), 7, block_size=200).logprobs,
                             head.teacher_topk(h, w, 7, block_size=200).logprobs, rtol=2e-5, atol=1e-6)
  for loss in (lambda hc, u: head.cross_entropy(hc, u, targets, block_size=200).sum(),
               lambda hc, u: head.kl_divergence(
                   ref_hidden=h, ref_unembedding=rows(w) if isinstance(u, head.EmbeddingRows) else w, cand_hidden=hc,
                   cand_unembedding=u, block_size=200).sum()):
    (g_h, g_rows), (p_h, p_w) = jax.grad(loss, (0, 1))(h_c, rows(w_c)), jax.grad(loss, (0, 1))(h_c, jnp.asarray(w_c))
    assert isinstance(g_rows, head.EmbeddingRows) and g_rows.rows.shape == (900, 24)
    np.testing.assert_allclose(g_h, p_h, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(g_rows.rows, p_w.T, rtol=2e-5, atol=1e-6)
  n, d, v = 256, 64, 32768
  shapes = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((n, d), (v, d), (n, d), (v, d))]
  tied = lambda hr, er, hc, ec, t: head.token_stats(ref_hidden=hr, ref_unembedding=head.EmbeddingRows(er),
                                                    cand_hidden=hc, cand_unembedding=head.EmbeddingRows(ec), targets=t,
                                                     block_size=1024)
  transposed = lambda hr, er, hc, ec, t: head.token_stats(ref_hidden=hr, ref_unembedding=er.T, cand_hidden=hc,
                                                          cand_unembedding=ec.T, targets=t, block_size=1024)
  temp = lambda fn: jax.jit(fn).lower(*shapes, jax.ShapeDtypeStruct((n,), jnp.int32)).compile() \
      .memory_analysis().temp_size_in_bytes
  assert temp(transposed) - temp(tied) >= 2 * v * d * 4  # each transpose costs a whole matrix; rows only blocks


@pytest.mark.parametrize("objective", ["reverse_kl", "jsd-0.1", "jsd-0.5", "jsd-0.9"])
def test_student_divergences_value_and_gradient_match_float64(rng, objective):
  """Reverse KL and generalized JSD from hidden states (blocks of 333 over 1000 ids, temperature 2, a soft-capped
  teacher) against the materialized definitions in float64: values and gradients in the student's hidden states
  and unembedding; none reach the teacher."""
  h, w, h_c, w_c = model_pair(rng, noise=0.4)
  beta = None if objective == "reverse_kl" else float(objective.split("-")[1])
  teacher = head.OutputHead(jnp.asarray(w), softcap=5.0)

  def fused(hs, ws, ht=jnp.asarray(h)):
    common = dict(teacher_hidden=ht, teacher_unembedding=teacher, student_hidden=hs, student_unembedding=ws,
                  temperature=2.0, block_size=333)
    if beta is None:
      return head.reverse_kl_divergence(**common)
    return head.jensen_shannon(**common, beta=beta)

  def materialized(hs, ws):  # in float64
    lp = jax.nn.log_softmax(5.0 * jnp.tanh(logits(jnp.asarray(h, jnp.float64), jnp.asarray(w, jnp.float64)) / 5.0) / 2)
    lq = jax.nn.log_softmax(logits(hs, ws) / 2)
    if beta is None:
      return jnp.sum(jnp.exp(lq) * (lq - lp), -1)
    lm = jnp.logaddexp(jnp.log(beta) + lp, jnp.log1p(-beta) + lq)
    return beta * jnp.sum(jnp.exp(lp) * (lp - lm), -1) + (1 - beta) * jnp.sum(jnp.exp(lq) * (lq - lm), -1)

  with jax.default_matmul_precision("highest"):
    value, grads = jax.value_and_grad(lambda hs, ws: fused(hs, ws).sum(), (0, 1))(jnp.asarray(h_c), jnp.asarray(w_c))
    per_token = fused(jnp.asarray(h_c), jnp.asarray(w_c))
    with jax.enable_x64():
      want, want_grads = jax.value_and_grad(lambda hs, ws: materialized(hs, ws).sum(), (0, 1))(
          jnp.asarray(h_c, jnp.float64), jnp.asarray(w_c, jnp.float64))
      want_tokens = np.asarray(materialized(jnp.asarray(h_c, jnp.float64), jnp.asarray(w_c, jnp.float64)))
    teacher_grad = jax.grad(lambda ht: fused(jnp.asarray(h_c), jnp.asarray(w_c), ht).sum())(jnp.asarray(h))
  assert per_token.shape == (2, 19) and np.all(want_tokens > 0.01)  # the distributions differ: values that tell
  np.testing.assert_allclose(per_token, want_tokens, rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(value, want, rtol=1e-4)
  for got, expected in zip(grads, want_grads):
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-5 * np.abs(expected).max())
  np.testing.assert_array_equal(teacher_grad, 0.0)
  with pytest.raises(ValueError, match="beta=1.0"):
    head.jensen_shannon(teacher_hidden=h, teacher_unembedding=w, student_hidden=h_c,
                                    student_unembedding=w_c, beta=1.0)


@pytest.mark.parametrize("block_size", [1, 5, 64])
def test_reference_entropy_keeps_precision_on_near_certain_tokens(rng, block_size):
  """H(p_ref) within 1% of float64 from 1e-8 to ~1 nat: a near-certain token's entropy is the mass beside its top
  entry, which log(sum) would round away (with ties at the top and blocks split anywhere)."""
  margins = np.linspace(2.0, 27.0, 40)  # top logit above the rest: H from ~1 down to ~1e-9
  rows = rng.standard_normal((margins.size, 64)).astype(np.float32)
  rows[:, 7] = rows.max(-1) + margins
  rows[::5, 40] = rows[::5, 7]  # a tie at the top every fifth row
  a = ref.f64(rows)
  p = np.exp(a - ref.lse(a)[..., None])
  want = -(p * np.log(p)).sum(-1)
  assert want.min() < 1e-8 and want.max() > 0.5
  eye = np.eye(rows.shape[0], dtype=np.float32)
  stats = head.token_stats(ref_hidden=eye, ref_unembedding=rows, cand_hidden=eye, cand_unembedding=rows,
                           targets=np.zeros(rows.shape[0], int), block_size=block_size)
  np.testing.assert_allclose(stats.ref_entropy, want, rtol=1e-2)
