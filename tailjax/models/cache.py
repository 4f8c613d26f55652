"""What a decoder keeps between decoding steps: a cache of ``S`` slots per row, filled left to right.

A batch of prompts of different lengths is left-padded: row ``b``'s prompt starts at slot ``start[b]`` and every
row's next token goes to the same slot ``index``, so one step serves the whole batch. A token in slot ``s`` of row
``b`` has position ``s - start[b]``; a query in slot ``q`` sees slot ``s`` when ``start[b] <= s <= q`` (and, per
layer type, ``q - s < window`` for sliding layers, the same chunk of positions for Llama 4's chunked ones).

Per layer, what the mixer needs of the past (``layer_cache``):

- softmax attention, multi-latent attention, retention: ``KVCache``, keys and values of every slot as the layer
  attends to them (after RoPE and norms; MLA's expanded per-head keys and values, not its latent);
- Gated DeltaNet: ``DeltaCache``, its recurrent state and the last ``K - 1`` inputs of each causal convolution;
- Gemma 4's KV-sharing layers: nothing (they read the cache of the layer they share, via ``SharedKV``).

``Decoder.init_cache`` builds them in the model's layout (a leading ``[repeats]`` axis per stacked block) and
``Decoder.decode`` runs ``T`` new tokens (a prompt, then one at a time) through the layers against them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from tailjax.models.config import ModelConfig

Array = jax.Array


class KVCache(NamedTuple):
  """``k: [B, S, kv_heads, hd]``, ``v: [B, S, kv_heads, vd]`` every slot's keys and values; ``index: []`` int32,
  the slot the next token is written to."""

  k: Array
  v: Array
  index: Array

  def write(self, k: Array, v: Array) -> KVCache:
    """``k, v: [B, T, ...]`` the new tokens' keys and values, written at ``index .. index + T - 1``."""
    at = (0, self.index, 0, 0)
    return KVCache(jax.lax.dynamic_update_slice(self.k, k.astype(self.k.dtype), at),
                   jax.lax.dynamic_update_slice(self.v, v.astype(self.v.dtype), at), self.index + k.shape[1])


class DeltaCache(NamedTuple):
  """A Gated DeltaNet layer between steps: ``state: [B, Hv, dk, dv]`` float32 after the last token; ``conv_q,
  conv_k, conv_v: [B, K - 1, width]`` the last ``K - 1`` inputs of each causal convolution (zeros before the
  prompt)."""

  state: Array
  conv_q: Array
  conv_k: Array
  conv_v: Array


LayerCache = KVCache | DeltaCache | None


class DecodeCache(NamedTuple):
  """A decoder's state between steps: ``layers[stack][position]`` each block's ``LayerCache`` with a leading
  ``[repeats]`` axis (``tailjax.models.transformer.stack_layout``); ``start: [B]`` int32 each row's first prompt
  slot; ``index: []`` int32 the next slot; ``length`` (static) ``S``, the slots."""

  layers: tuple[tuple[LayerCache, ...], ...]
  start: Array
  index: Array

  @property
  def length(self) -> int:
    return next(c.k.shape[2] for stack in self.layers for c in stack if isinstance(c, KVCache))


def layer_cache(cfg: ModelConfig, layer: int, batch: int, length: int, dtype) -> LayerCache:
  """Zeros for layer ``layer`` of a decode of ``batch`` rows and ``length`` slots (the module docstring)."""
  kind = cfg.layer_type(layer)
  if cfg.block == "gemma4" and cfg.kv_shared(layer):
    return None
  index = jnp.zeros((), jnp.int32)
  if kind == "linear":
    keys, values = cfg.linear_num_key_heads * cfg.linear_key_head_dim, cfg.linear_num_value_heads
    state = jnp.zeros((batch, values, cfg.linear_key_head_dim, cfg.linear_value_head_dim), jnp.float32)
    conv = lambda width: jnp.zeros((batch, cfg.linear_conv_kernel - 1, width), dtype)
    return DeltaCache(state, conv(keys), conv(keys), conv(values * cfg.linear_value_head_dim))
  if cfg.attention == "mla":
    h = cfg.num_heads
    return KVCache(jnp.zeros((batch, length, h, cfg.head_dim), dtype),
                   jnp.zeros((batch, length, h, cfg.value_head_dim), dtype), index)
  hd, kv = cfg.attention_dims(kind)
  return KVCache(jnp.zeros((batch, length, kv, hd), dtype), jnp.zeros((batch, length, kv, hd), dtype), index)


class SlotInputs(NamedTuple):
  """For ``T`` new tokens at slots ``index .. index + T - 1``: ``positions: [B, T]``; ``masks`` per layer type,
  ``[B, T, S]`` which slots each new token sees (``"linear"``: ``[B, T]`` document runs, padding apart)."""

  positions: Array
  masks: dict[str, Array]


def slot_inputs(cfg: ModelConfig, start: Array, index: Array, t: int, length: int) -> SlotInputs:
  """Positions and masks of ``T`` new tokens written at ``index`` into a cache of ``length`` slots whose rows
  start at ``start: [B]`` (the module docstring). A padding slot sees itself only (no all-masked softmax row) and
  has position 0 (no position-dependent scale of a negative position turns it, and then every value, to NaN)."""
  query = index + jnp.arange(t)  # [T] slots
  key = jnp.arange(length)  # [S]
  positions = jnp.maximum(query[None, :] - start[:, None], 0)  # [B, T]; padding at 0, as a forward pass puts it
  own = key[None, None, :] == query[None, :, None]  # [1, T, S]
  seen = (key[None, None, :] <= query[None, :, None]) & (key[None, None, :] >= start[:, None, None])  # [B, T, S]
  masks = {"full": seen | own, "linear": (query[None, :] >= start[:, None]).astype(jnp.int32)}
  if cfg.sliding_window is not None:
    masks["sliding"] = seen & (query[None, :, None] - key[None, None, :] < cfg.sliding_window) | own
  if cfg.attention_chunk_size:
    chunk = lambda slots: (slots - start[:, None]) // cfg.attention_chunk_size  # [B, n]
    masks["chunked"] = seen & (chunk(query)[:, :, None] == chunk(key)[:, None, :]) | own
  return SlotInputs(positions, masks)
