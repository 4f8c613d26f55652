"""The vocabulary in blocks: how a head's logits are cut into ``block``-column pieces (``Vocab``), computed one
block at a time (``block_logits``: soft-cap and temperature applied, columns a block does not own at ``-inf``),
folded in vocabulary order (``reduce_blocks``) and turned into gradients block by block (``accumulate``); and the
two forms a head's unembedding takes (``[d, V]``, or a tied model's ``EmbeddingRows``; ``OutputHead`` adds the
soft-cap). Every loss of ``tailjax.head`` is built on these."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

Array = jax.Array


DEFAULT_BLOCK_SIZE = 4096
# The eval pass (``candidates_token_stats``) keeps about fourteen block-wide arrays alive per step (two KL states
# per candidate, the reference's entropy, three top-10s): at 1024 columns its temporaries stay below the plain
# KL's at 4096. Measured on the SmolLM2 eval step (3 models, 4 x 512 tokens, CPU): 480 MB at 4096, 248 at 2048,
# 170 at 1024, the same time (7.0 s) at each.
STATS_BLOCK_SIZE = 1024


@struct.dataclass
class EmbeddingRows:
  """A tied model's unembedding as its embedding's rows, ``[V, d]``: it stands for the ``[d, V]`` transpose
  (``shape``, ``ndim`` and ``dtype`` are the transpose's) and blocks of it are cut from the rows."""

  rows: Array  # [V, d]

  @property
  def shape(self) -> tuple[int, int]:
    return self.rows.shape[::-1]

  @property
  def ndim(self) -> int:
    return self.rows.ndim

  @property
  def dtype(self):
    return self.rows.dtype

  def astype(self, dtype) -> EmbeddingRows:
    return EmbeddingRows(self.rows.astype(dtype))


def _columns(unembedding: Array | EmbeddingRows, start: Array, size: int) -> Array:
  """Columns ``[start, start + size)`` of the ``[d, V]`` unembedding -> ``[d, size]``."""
  if isinstance(unembedding, EmbeddingRows):
    return jax.lax.dynamic_slice_in_dim(unembedding.rows, start, size, axis=0).T
  return jax.lax.dynamic_slice_in_dim(unembedding, start, size, axis=1)


def _add_columns(grad: Array | EmbeddingRows, start: Array, block: Array) -> Array | EmbeddingRows:
  """``grad[:, start:start + size] += block`` (``block: [d, size]``), in ``grad``'s own layout."""
  if isinstance(grad, EmbeddingRows):
    rows = jax.lax.dynamic_slice_in_dim(grad.rows, start, block.shape[1], axis=0) + block.T
    return EmbeddingRows(jax.lax.dynamic_update_slice_in_dim(grad.rows, rows, start, axis=0))
  cols = jax.lax.dynamic_slice_in_dim(grad, start, block.shape[1], axis=1) + block
  return jax.lax.dynamic_update_slice_in_dim(grad, cols, start, axis=1)


def _zeros(unembedding: Array | EmbeddingRows) -> Array | EmbeddingRows:
  return jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), unembedding)


@struct.dataclass
class OutputHead:
  """A model's output layer: ``unembedding: [d, V]`` (or ``EmbeddingRows``) and the soft-cap of its logits.

  A pytree whose soft-cap is static, so it passes through ``jax.jit`` as a constant.
  """

  unembedding: Array | EmbeddingRows
  softcap: float | None = struct.field(pytree_node=False, default=None)


class Logits(NamedTuple):
  """How a model's raw logits ``z`` become the logits of the distribution: ``cap(z) / temperature``."""

  temperature: float = 1.0
  softcap: float | None = None

  def apply(self, z: Array) -> Array:
    if self.softcap is not None:
      z = self.softcap * jnp.tanh(z / self.softcap)
    return z / self.temperature if self.temperature != 1.0 else z

  def slope(self, z: Array) -> Array | float:
    """d(logits)/d(raw logits), given the (masked, ``-inf`` where not owned) logits ``z``."""
    if self.softcap is None:
      return 1.0 / self.temperature
    capped = z * self.temperature / self.softcap  # tanh(raw / cap)
    return jnp.where(jnp.isfinite(z), (1.0 - capped * capped) / self.temperature, 0.0)


def split_head(head: Array | OutputHead, temperature: float = 1.0) -> tuple[Array, Logits]:
  """An unembedding or ``OutputHead`` -> (``[d, V]`` matrix, its logits transform)."""
  if isinstance(head, OutputHead):
    return head.unembedding, Logits(float(temperature), head.softcap)
  return head, Logits(float(temperature))


class Vocab(NamedTuple):
  """How a vocabulary of ``size`` ids is cut into ``count`` blocks of ``block`` columns."""

  size: int
  block: int
  count: int

  def columns(self, b: Array) -> tuple[Array, Array]:
    """Block ``b`` -> (first column it reads, ``[block]`` mask of columns it owns).

    The last block is shifted left to stay inside the vocabulary, so every block
    reads exactly ``block`` columns; columns an earlier block owns are masked.
    """
    nominal = b * self.block
    start = jnp.minimum(nominal, self.size - self.block)
    return start, start + jnp.arange(self.block) >= nominal


def vocab_blocks(unembedding: Array, vocab_size: int | None, block_size: int, min_block: int = 1) -> Vocab:
  if unembedding.ndim != 2:
    raise ValueError(f"unembedding must be [d, V], got shape {unembedding.shape}")
  size = unembedding.shape[1] if vocab_size is None else vocab_size
  if size > unembedding.shape[1]:
    raise ValueError(f"unembedding has {unembedding.shape[1]} columns, fewer than vocab_size={size}")
  block = min(max(block_size, min_block), size)
  return Vocab(size, block, -(-size // block))


def vocab_pair(ref_unembedding: Array, cand_unembedding: Array, vocab_size: int | None, block_size: int,
                min_block: int = 1) -> Vocab:
  v_ref, v_cand = ref_unembedding.shape[-1], cand_unembedding.shape[-1]
  if vocab_size is None and v_ref != v_cand:
    raise ValueError(f"vocabulary mismatch: reference unembedding has {v_ref} columns, candidate has {v_cand}; "
                     "if one is only padded, pass the true vocab_size")
  vocab_blocks(ref_unembedding, vocab_size, block_size, min_block)
  return vocab_blocks(cand_unembedding, vocab_size, block_size, min_block)


def block_logits(hidden: Array, unembedding: Array, vocab: Vocab, b: Array,
                  form: Logits = Logits()) -> tuple[Array, Array, Array]:
  """``[N, d]`` x block ``b`` -> (``[N, block]`` float32 logits, ``-inf`` where not owned; start; mask)."""
  start, owned = vocab.columns(b)
  w = _columns(unembedding, start, vocab.block)
  z = form.apply(jnp.dot(hidden, w, preferred_element_type=jnp.float32))
  return jnp.where(owned, z, -jnp.inf), start, owned


def reduce_blocks(vocab: Vocab, block_state, merge):
  """``merge``-fold of ``block_state(b)`` over all blocks, in vocabulary order."""
  first = block_state(jnp.asarray(0))
  out, _ = jax.lax.scan(lambda acc, b: (merge(acc, block_state(b)), None), first, jnp.arange(1, vocab.count))
  return out


def gather_owned(z: Array, ids: Array, start: Array, vocab: Vocab, b: Array) -> Array:
  """Values of ``z: [N, block]`` at global ``ids: [N, K]`` this block owns, else 0."""
  local = ids - start
  owned = (ids >= b * vocab.block) & (local < vocab.block)
  picked = jnp.take_along_axis(z, jnp.clip(local, 0, vocab.block - 1), axis=-1)
  return jnp.where(owned, picked, 0.0)


def flatten(hidden: Array, *per_token: Array | None):
  lead = hidden.shape[:-1]
  flat = [None if x is None else jnp.reshape(x, (-1,) + x.shape[len(lead):]) for x in per_token]
  return lead, jnp.reshape(hidden, (-1, hidden.shape[-1])), flat


def finish(lead: tuple[int, ...], values: Array, where: Array | None) -> Array:
  values = jnp.reshape(values, lead)
  return values if where is None else jnp.where(where, values, 0.0)


def zero_grads(hidden: Array, unembedding: Array | EmbeddingRows) -> tuple[Array, Array | EmbeddingRows]:
  return jnp.zeros(hidden.shape, jnp.float32), _zeros(unembedding)


def accumulate(grads, hidden, unembedding, g_z, start, vocab):
  """Adds block ``g_z = dL/dlogits: [N, block]`` to (d_hidden, d_unembedding)."""
  d_hidden, d_unembedding = grads
  w = _columns(unembedding, start, vocab.block)
  d_hidden = d_hidden + jnp.dot(g_z.astype(w.dtype), w.T, preferred_element_type=jnp.float32)
  d_w = jnp.dot(hidden.T, g_z.astype(hidden.dtype), preferred_element_type=jnp.float32)
  return d_hidden, _add_columns(d_unembedding, start, d_w)
