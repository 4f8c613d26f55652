
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tailjax import losses, models
from tailjax.models import Decoder, ModelConfig
from helpers import TINY, smollm2_path, write_tiny_gguf


def test_decoder_is_causal_and_keeps_packed_documents_apart(rng):
  model = Decoder(TINY, rngs=nnx.Rngs(0))
  tokens = rng.integers(0, 64, (2, 12))
  h = model(jnp.asarray(tokens))
  assert h.shape == (2, 12, 32) and model.unembedding().shape == (32, 64)
  changed = tokens.copy()
  changed[:, 8:] = (changed[:, 8:] + 1) % 64
  np.testing.assert_allclose(model(jnp.asarray(changed))[:, :8], h[:, :8], atol=1e-5)
  # Two documents packed into one row behave as if run alone; padding (segment 0) is isolated.
  a, b = tokens[0, :5], tokens[1, :7]
  packed = np.concatenate([a, b])[None]
  segments = np.array([[1] * 5 + [2] * 7])
  out = model(jnp.asarray(packed), jnp.asarray(segments))
  np.testing.assert_allclose(out[0, :5], model(jnp.asarray(a[None]))[0], atol=1e-5)
  np.testing.assert_allclose(out[0, 5:], model(jnp.asarray(b[None]))[0], atol=1e-5)
  padded = model(jnp.asarray(np.concatenate([a, [0, 0]])[None]), jnp.asarray([[1] * 5 + [0, 0]]))
  np.testing.assert_allclose(padded[0, :5], model(jnp.asarray(a[None]))[0], atol=1e-5)


@pytest.mark.parametrize("kind", ["causal", "window", "segments", "bfloat16"])
def test_causal_attention_matches_float64_reference(kind, rng):
  from reference import attention
  from tailjax.models.attention import causal_attention

  b, t, heads, kv, d = 2, 300, 6, 2, 16  # 300 tokens: three query chunks, the last one short
  q, k, v = (rng.normal(size=(b, t, n, d)) * 3 for n in (heads, kv, kv))
  index = np.arange(t)
  mask = np.broadcast_to(index[:, None] >= index[None, :], (b, t, t))
  window = 37 if kind == "window" else None
  if window:
    mask = mask & (index[:, None] - index[None, :] < window)
  if kind == "segments":
    segments = np.sort(rng.integers(0, 4, (b, t)), axis=1)
    mask = mask & (segments[:, :, None] == segments[:, None, :]) | np.eye(t, dtype=bool)
  dtype = jnp.bfloat16 if kind == "bfloat16" else jnp.float32
  args = [jnp.asarray(x, dtype) for x in (q, k, v)]
  out = causal_attention(*args, jnp.asarray(mask), window)
  assert out.shape == (b, t, heads, d) and out.dtype == dtype
  expected = attention(*(np.asarray(x.astype(jnp.float32)) for x in args), mask)
  tolerance = dict(rtol=1e-2, atol=1e-2) if kind == "bfloat16" else dict(atol=2e-5)  # bf16: rounding of the output
  np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), expected, **tolerance)
  if kind == "segments":  # gradients (distillation trains through it) agree with jax's own attention
    loss = lambda f: lambda *a: jnp.sum(f(*a) * jnp.asarray(v[..., :1].repeat(heads // kv, 2), jnp.float32))
    ours = jax.grad(loss(lambda *a: causal_attention(*a, jnp.asarray(mask))), argnums=(0, 1, 2))(*args)
    theirs = jax.grad(loss(lambda *a: jax.nn.dot_product_attention(*a, mask=jnp.asarray(mask)[:, None])),
                      argnums=(0, 1, 2))(*args)
    for a, e in zip(ours, theirs):
      np.testing.assert_allclose(a, e, atol=2e-4)


def test_model_specs_parse_in_one_place():
  parse = models.ModelSpec.parse
  assert parse("q4=model.gguf@int4-g64") == ("model.gguf", "int4-g64", "q4")
  assert parse("@int3-g64-asym").of_reference and parse("@int3").quantization == "int3"
  assert parse("runs/lr=1e-4/checkpoints/7") == ("runs/lr=1e-4/checkpoints/7", "", None)  # '=' inside the path
  assert parse("a=b.gguf", labelled=False) == ("a=b.gguf", "", None)
  assert parse("me@host/m.gguf@int4") == ("me@host/m.gguf", "int4", None)  # the last '@' quantizes
  assert parse("x=m.gguf@int4").unlabelled == "m.gguf@int4" and parse("m.gguf").unlabelled == "m.gguf"


def test_gguf_round_trip_gives_the_same_model(tmp_path, rng):
  model = Decoder(TINY, rngs=nnx.Rngs(1))
  path = tmp_path / "tiny.gguf"
  write_tiny_gguf(path, model)
  loaded = models.load(path)
  assert loaded.config == TINY.__class__(**{**TINY.to_dict(), "max_position_embeddings": 128})
  tokens = rng.integers(0, 64, (2, 10))
  np.testing.assert_allclose(loaded.hidden_states(tokens), model(jnp.asarray(tokens)), atol=1e-5)
  logprobs = loaded.logprobs(tokens)
  assert logprobs.shape == (2, 10, 64)
  np.testing.assert_allclose(jnp.exp(logprobs).sum(-1), 1.0, rtol=1e-5)
  assert loaded.tokenizer.encode("ab") and loaded.tokenizer.decode(loaded.tokenizer.encode("abe")) == "abe"


def test_bad_model_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.gguf: no such model"):
    models.load(tmp_path / "nope.gguf")
  junk = tmp_path / "junk.gguf"
  junk.write_bytes(b"not a gguf file at all")
  with pytest.raises(ValueError, match="junk.gguf: not a readable GGUF file"):
    models.load(junk)
  model = Decoder(TINY, rngs=nnx.Rngs(2))
  write_tiny_gguf(tmp_path / "gpt2.gguf", model, arch="gpt2")
  with pytest.raises(ValueError, match=r"gpt2.gguf: GGUF architecture 'gpt2' is not supported"):
    models.load(tmp_path / "gpt2.gguf")
  with pytest.raises(ValueError, match="not a model"):
    models.load(tmp_path)
  with pytest.raises(ValueError, match="quantization 'int9x'"):
    models.load(f"{tmp_path / 'junk.gguf'}@int9x")


def rtn_reference(w, bits, group, symmetric):
  """Float64 NumPy round-to-nearest, groups along axis 0 (last group may be short)."""
  out = np.empty_like(w, np.float64)
  for start in range(0, w.shape[0], group):
    g = w[start:start + group].astype(np.float64)
    if symmetric:
      qmax = 2**(bits - 1) - 1
      scale = np.abs(g).max(0) / qmax
      scale[scale == 0] = 1
      out[start:start + group] = np.clip(np.round(g / scale), -qmax, qmax) * scale
    else:
      qmax = 2**bits - 1
      scale = (g.max(0) - g.min(0)) / qmax
      scale[scale == 0] = 1
      zero = np.round(-g.min(0) / scale)
      out[start:start + group] = (np.clip(np.round(g / scale) + zero, 0, qmax) - zero) * scale
  return out


@pytest.mark.parametrize("text", ["int4", "int3-g64", "int2-g32-asym", "int8-gnone", "int5-g100-asym"])
def test_fake_quantize_matches_float64_reference(text, rng):
  spec = models.QuantSpec.parse(text)
  w = rng.standard_normal((300, 24)).astype(np.float32) * np.exp(rng.uniform(-3, 3, (1, 24))).astype(np.float32)
  w[:, 0] = 0.0  # an all-zero column must stay zero, not NaN
  got = np.asarray(models.fake_quantize(jnp.asarray(w), spec), np.float64)
  group = spec.group_size or 300
  want = rtn_reference(w, spec.bits, group, spec.symmetric)
  close = np.isclose(got, want, rtol=1e-5, atol=1e-7)
  assert close.mean() > 0.999  # float32 vs float64 may round a value sitting on a .5 boundary differently
  assert np.all(got[:, 0] == 0)
  for start in range(0, 300, group):  # each group uses at most 2^bits levels, within half a step of w
    levels = [len(np.unique(got[start:start + group, j])) for j in range(24)]
    assert max(levels) <= 2**spec.bits - (1 if spec.symmetric else 0)
  step = np.abs(np.diff(np.sort(want, axis=0), axis=0)).max()
  assert np.abs(got - w).max() <= step
  assert str(spec) == str(models.QuantSpec.parse(str(spec)))


def test_quantized_candidate_and_checkpoint_round_trip(tmp_path, rng):
  model = Decoder(TINY, rngs=nnx.Rngs(3))
  write_tiny_gguf(tmp_path / "tiny.gguf", model)
  reference = models.load(tmp_path / "tiny.gguf")
  candidate = models.load(f"{tmp_path / 'tiny.gguf'}@int3-g16")
  assert candidate.name.endswith("tiny.gguf@int3-g16-sym") and candidate.quantization.bits == 3
  down = lambda loaded: loaded.model.layers[0].blocks[0].mlp.down.kernel[...][1]  # layer 1
  np.testing.assert_array_equal(down(candidate), models.fake_quantize(down(reference), models.QuantSpec(3, 16)))
  np.testing.assert_array_equal(candidate.model.embed.embedding[...], reference.model.embed.embedding[...])
  tokens = rng.integers(0, 64, (2, 10))
  kl = losses.kl_divergence(ref_logits=reference.logprobs(tokens), cand_logits=candidate.logprobs(tokens))
  assert 0 < float(kl.mean()) < 1

  saved = models.save_checkpoint(candidate, tmp_path / "ckpt")
  again = models.load(saved)
  assert again.config == candidate.config
  np.testing.assert_array_equal(again.hidden_states(tokens), candidate.hidden_states(tokens))
  assert again.tokenizer.encode("abe") == candidate.tokenizer.encode("abe")
  assert again.tokenizer.fingerprint() == reference.tokenizer.fingerprint()
  half = models.load(saved, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  assert half.model.layers[0].blocks[0].attn.q.kernel[...].dtype == jnp.bfloat16
  np.testing.assert_allclose(half.logprobs(tokens), again.logprobs(tokens), atol=0.1)
  (saved / "tailjax_model.json").write_text("{")
  with pytest.raises(ValueError, match="tailjax_model.json: not a readable tailjax checkpoint"):
    models.load(saved)


@pytest.mark.parametrize("fields", [dict(qkv_bias=True), dict(
    qk_norm=True, sandwich_norms=True, norm_unit_offset=True, num_experts=4, num_experts_per_tok=2,
    moe_intermediate_size=16, dense_layers=(1,)), dict(  # Gemma 4 with every part it can have
    block="gemma4", num_layers=4, layer_types=("sliding", "full") * 2, sliding_window=3, full_head_dim=16,
    full_num_kv_heads=1, full_values_from_keys=True, per_layer_input_size=4, per_layer_vocab_size=40,
    num_kv_shared_layers=2, shared_kv_mlp_factor=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
    router="scaled_softmax", qk_norm=True, sandwich_norms=True), dict(  # GLM-4.7-Flash: latent attention, groups
    attention="mla", head_dim=12, rotary_dim=4, value_head_dim=6, q_lora_rank=8, kv_lora_rank=8, num_kv_heads=4,
    qkv_bias=True, o_bias=True, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
    router="sigmoid_groups", router_groups=(2, 1), shared_expert_size=16)])
def test_every_parameter_names_its_logical_axes(fields):
  cfg = models.ModelConfig(**{**TINY.to_dict(), **fields})
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  specs = jax.tree.leaves(nnx.get_partition_spec(nnx.state(model, nnx.Param)),
                          is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert len(specs) == len(params)
  assert all(len(spec) == p.ndim for spec, p in zip(specs, params))
  assert sum(p.size for p in params) == cfg.num_params


def test_layers_are_stacked_by_their_period_and_a_per_layer_checkpoint_loads_converted(tmp_path, rng):
  """Sliding, full, sliding: period 2 (layers 0-1 stacked once) and layer 2 left over; a checkpoint written before
  stacking (``blocks/<layer>``) loads into that layout with the same numbers, and one missing a layer says so."""
  import orbax.checkpoint as ocp

  from tailjax.models.transformer import LayerSlot, StackSpan, slot, stack_layout

  cfg = ModelConfig(**{**TINY.to_dict(), "num_layers": 3, "sliding_window": 4,
                       "layer_types": ("sliding", "full", "sliding")})
  assert stack_layout(cfg) == (StackSpan(0, 2, 1), StackSpan(2, 1, 1))
  assert slot(cfg, 1) == LayerSlot(0, 0, 1) and slot(cfg, 2) == LayerSlot(1, 0, 0)
  assert stack_layout(TINY) == (StackSpan(0, 1, 2),)  # Llama-shaped: every layer alike, one scan
  model = Decoder(cfg, rngs=nnx.Rngs(5))
  saved = models.save_checkpoint(models.LoadedModel(cfg, model, None, "random"), tmp_path / "ckpt")
  tokens = jnp.asarray(rng.integers(0, 64, (2, 9)))
  want = np.asarray(model(tokens))

  valued = lambda tree: {k: valued(v) if isinstance(v, dict) else {"value": np.asarray(v)} for k, v in tree.items()}
  pure = lambda module: valued(nnx.to_pure_dict(nnx.state(module, nnx.Param)))
  old = {"embed": pure(model.embed), "norm": pure(model.norm), "lm_head": {"value": np.asarray(model.lm_head[...])},
         "blocks": {str(i): pure(model.block(i)) for i in range(cfg.num_layers)}}
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(saved / "params", old, force=True)
  again = models.load(saved)
  assert again.model.layers[0].blocks[1].attn.q.kernel[...].shape == (1, 32, 32)
  np.testing.assert_allclose(np.asarray(again.hidden_states(tokens)), want, rtol=1e-6, atol=1e-6)

  del old["blocks"]["2"]
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(saved / "params", old, force=True)
  with pytest.raises(ValueError, match=r"params: unreadable parameters .*layers/1/blocks/0/.* not in the checkpoint"):
    models.load(saved)


def test_retention_matches_its_recurrent_form(rng):
  """Parallel retention (what the model runs) == the recurrence S_n = gamma S_{n-1} + k_n^T v_n in float64."""
  cfg = models.ModelConfig(**{**TINY.to_dict(), "attention": "retention", "num_kv_heads": 4})
  model = Decoder(cfg, rngs=nnx.Rngs(4))
  attn = model.block(0).attn
  attn.norm_scale.set_value(jnp.asarray(1 + 0.1 * rng.standard_normal(attn.norm_scale.shape), jnp.float32))
  x = rng.standard_normal((1, 9, 32)).astype(np.float32)
  t = x.shape[1]
  got, _ = attn(jnp.asarray(x), jnp.arange(t)[None], jnp.tril(jnp.ones((t, t), bool))[None])
  f64 = lambda a: np.asarray(a, np.float64)
  q, k, v = (f64(x[0]) @ f64(layer.kernel[...]) for layer in (attn.q, attn.k, attn.v))
  heads, hd = cfg.num_heads, cfg.head_dim
  outs = []
  for h in range(heads):
    gamma = 1 - 2.0**(-5 - h)
    state = np.zeros((hd, hd))
    rows = []
    for n in range(t):
      state = gamma * state + np.outer(k[n, h * hd:(h + 1) * hd], v[n, h * hd:(h + 1) * hd]) / np.sqrt(hd)
      rows.append(q[n, h * hd:(h + 1) * hd] @ state)
    o = np.array(rows)
    o = (o - o.mean(-1, keepdims=True)) / np.sqrt(o.var(-1, keepdims=True) + cfg.rms_norm_eps)
    outs.append(o * f64(attn.norm_scale[...])[h] + f64(attn.norm_bias[...])[h])
  want = np.concatenate(outs, -1) @ f64(attn.o.kernel[...])
  np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-4)
  assert models.PRESETS["tinystories-34m"].num_params == 33_460_992  # the paper's "~34M"


@pytest.mark.e2e  # a real model or the command line
@pytest.mark.slow
def test_smollm2_equals_transformers_and_its_tokenizer():
  """The real GGUF through tailjax vs through transformers + PyTorch: same tokens, same log-probs."""
  import torch
  import transformers
  from pydoc_data.topics import topics

  path = smollm2_path()
  ours = models.load(path)
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
  text = topics["assert"] + topics["if"] + "\n\tUnicode: naïve café — 東京 🙂 1234567"
  ids = ours.tokenizer.encode(text)
  assert ids == hf_tokenizer(text)["input_ids"]
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
  window = np.asarray([ids[:96]])
  with torch.no_grad():
    want = torch.log_softmax(hf_model(torch.as_tensor(window)).logits.double(), -1).numpy()
  diff = np.abs(np.asarray(ours.logprobs(window), np.float64) - want).max()
  assert diff <= 1e-3, diff
  # greedy decoding with the cache, two prompts of different lengths in one left-padded batch
  from tailjax import generate

  prompts = ["def fibonacci(n):", "The three primary colours are"]
  config = generate.GenerateConfig(max_new_tokens=16, batch_size=2, eos_ids=())
  got = [g.token_ids for g in generate.generate(ours, prompts, config)]
  with torch.no_grad():
    hf_model.generation_config.eos_token_id = None
    want = [tuple(hf_model.generate(torch.as_tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=16, do_sample=False)[0, len(ids):].tolist())
            for ids in map(ours.tokenizer.encode, prompts)]
  assert got == want


@pytest.mark.e2e  # a real model or the command line
@pytest.mark.slow
def test_smollm2_predicts_real_text(smollm2):
  """A real 135M model on text nobody here wrote: CE far below the uniform ln(49152) = 10.8 nats."""
  from pydoc_data.topics import topics

  m = smollm2
  assert (m.config.num_layers, m.config.hidden_size, m.config.num_kv_heads, m.config.vocab_size) == (30, 576, 3, 49152)
  ids = m.tokenizer.encode(topics["assert"])[:128]
  assert m.tokenizer.decode(ids).startswith('The "assert" statement')
  logprobs = m.logprobs(np.asarray([ids]))
  ce = losses.cross_entropy(logprobs[:, :-1], jnp.asarray([ids[1:]]))
  assert float(ce.mean()) < 3.5 and float(jnp.median(ce)) < 2.5
