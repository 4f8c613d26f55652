"""Real checkpoints as Flax NNX decoders: ``load(spec)`` -> ``LoadedModel``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tailjax.models import gguf
from tailjax.models.config import ModelConfig
from tailjax.models.transformer import Decoder

__all__ = ["Decoder", "LoadedModel", "ModelConfig", "Tokenizer", "from_gguf", "load"]


@dataclasses.dataclass
class Tokenizer:
  """A ``tokenizers.Tokenizer`` with the two calls tailjax needs."""

  backend: object
  add_bos: bool = False
  bos_id: int | None = None

  def encode(self, text: str) -> list[int]:
    ids = self.backend.encode(text, add_special_tokens=False).ids
    return [self.bos_id, *ids] if self.add_bos and self.bos_id is not None else ids

  def decode(self, ids) -> str:
    return self.backend.decode(list(ids))


@dataclasses.dataclass
class LoadedModel:
  config: ModelConfig
  model: Decoder
  tokenizer: Tokenizer | None
  source: str

  def hidden_states(self, token_ids) -> jax.Array:
    return _hidden(self.model, jnp.asarray(token_ids))

  def logprobs(self, token_ids) -> jax.Array:
    """``[B, T]`` ids -> ``[B, T, V]`` next-token log-probabilities (materialized: tests, small inputs)."""
    hidden = self.hidden_states(token_ids)
    logits = jnp.einsum("btd,dv->btv", hidden, self.model.unembedding(), preferred_element_type=jnp.float32)
    return jax.nn.log_softmax(logits, axis=-1)


@nnx.jit
def _hidden(model: Decoder, token_ids: jax.Array) -> jax.Array:
  return model(token_ids)


def _assign(param: nnx.Param, value: np.ndarray, name: str, source: str) -> None:
  current = param.get_value()
  if current.shape != value.shape:
    raise ValueError(f"{source}: tensor {name} has shape {value.shape}, the model expects {current.shape}")
  param.set_value(jnp.asarray(value, current.dtype))


def from_gguf(path: str | Path, dtype=jnp.float32) -> LoadedModel:
  """A GGUF file (llama or qwen2 architecture) -> dequantized model + tokenizer."""
  import gguf as gguf_lib

  path = Path(path)
  try:
    reader = gguf_lib.GGUFReader(path)
  except (OSError, ValueError) as err:
    raise ValueError(f"{path}: not a readable GGUF file ({err})") from err
  cfg = gguf.read_config(reader, path)
  tensors = gguf.read_tensors(reader, cfg, path)
  # Abstract parameters (no random init): every one is filled from the file below.
  model = nnx.eval_shape(lambda: Decoder(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
  src = str(path)
  take = lambda name: tensors.pop(name) if name in tensors else _missing(src, name)
  _assign(model.embed.embedding, take("token_embd.weight"), "token_embd.weight", src)
  _assign(model.norm.scale, take("output_norm.weight"), "output_norm.weight", src)
  if not cfg.tie_word_embeddings:
    _assign(model.lm_head, take("output.weight").T, "output.weight", src)
  for i, block in enumerate(model.blocks):
    p = f"blk.{i}."
    _assign(block.attn_norm.scale, take(p + "attn_norm.weight"), p + "attn_norm.weight", src)
    _assign(block.mlp_norm.scale, take(p + "ffn_norm.weight"), p + "ffn_norm.weight", src)
    for layer, name in ((block.attn.q, "attn_q"), (block.attn.k, "attn_k"), (block.attn.v, "attn_v"),
                        (block.attn.o, "attn_output"), (block.mlp.gate, "ffn_gate"), (block.mlp.up, "ffn_up"),
                        (block.mlp.down, "ffn_down")):
      _assign(layer.kernel, take(f"{p}{name}.weight").T, f"{p}{name}.weight", src)
      if layer.bias is not None:
        _assign(layer.bias, take(f"{p}{name}.bias"), f"{p}{name}.bias", src)
  tensors.pop("rope_freqs.weight", None)
  if tensors:
    raise ValueError(f"{src}: tensors the model has no place for: {sorted(tensors)[:5]}")
  tokenizer = Tokenizer(gguf.read_tokenizer(reader, path), bool(gguf._field(reader, "tokenizer.ggml.add_bos_token")),
                        gguf._field(reader, "tokenizer.ggml.bos_token_id"))
  token_count = tokenizer.backend.get_vocab_size(with_added_tokens=False)
  if token_count > cfg.vocab_size:
    raise ValueError(f"{src}: tokenizer has {token_count} tokens, the model only {cfg.vocab_size}")
  return LoadedModel(cfg, model, tokenizer, src)


def _missing(source: str, name: str):
  raise ValueError(f"{source}: tensor {name} is missing")


def load(spec: str | Path, dtype=jnp.float32) -> LoadedModel:
  """A checkpoint by path: a ``.gguf`` file today; Hugging Face directories and tailjax checkpoints next."""
  path = Path(spec)
  if not path.exists():
    raise FileNotFoundError(f"{path}: no such model file or directory")
  if path.suffix == ".gguf":
    return from_gguf(path, dtype)
  raise ValueError(f"{path}: unsupported model spec (supported so far: a .gguf file)")
