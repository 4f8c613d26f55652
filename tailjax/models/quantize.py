"""Weight-only round-to-nearest (RTN) quantization: the candidates a quantization engineer compares.

A candidate runs with the *dequantized* weights, so its forward pass is the reference's
code on different numbers, exactly what an eval of the quantization error needs.
Groups run along each linear layer's input dimension (the rows of tailjax's ``[in, out]``
kernel, the columns of PyTorch's weight), as in GPTQ/AWQ and llama.cpp; a last group
shorter than ``group_size`` is quantized on its own.

- symmetric: ``scale = max|w| / (2^(b-1) - 1)``, ``q`` in ``[-(2^(b-1) - 1), 2^(b-1) - 1]``
  (zero and ``±max|w|`` exact);
- asymmetric: ``scale = (max - min) / (2^b - 1)``, integer zero point ``z = round(-min / scale)``,
  ``q`` in ``[0, 2^b - 1]``, ``w ≈ (q - z) * scale``.

Every block's linear kernels are quantized, the experts of a mixture-of-experts MLP each on its
own (``[E, in, out]`` stacks, groups inside each expert). Embeddings, the unembedding, norms and
MoE routers stay in full precision (the usual RTN baseline; AWQ and GPTQ keep routers too).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

_SPEC = re.compile(r"^int(?P<bits>\d+)(?:-g(?P<group>\d+|none))?(?:-(?P<mode>sym|asym))?$")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """``int4`` = 4 bits, groups of 128, symmetric; ``int3-g64-asym``; ``int8-gnone`` (one group per column)."""

  bits: int
  group_size: int | None = 128
  symmetric: bool = True

  def __post_init__(self):
    if not 2 <= self.bits <= 8:
      raise ValueError(f"quantization to {self.bits} bits: supported are 2..8")
    if self.group_size is not None and self.group_size < 1:
      raise ValueError(f"group size {self.group_size} must be positive")

  @classmethod
  def parse(cls, text: str) -> QuantSpec:
    match = _SPEC.match(text.strip().lower())
    if match is None:
      raise ValueError(f"quantization {text!r}: expected int<bits>[-g<group>|-gnone][-sym|-asym], e.g. int4-g128")
    group = match["group"]
    return cls(int(match["bits"]), 128 if group is None else None if group == "none" else int(group),
               match["mode"] != "asym")

  def __str__(self) -> str:
    group = "none" if self.group_size is None else self.group_size
    return f"int{self.bits}-g{group}-{'sym' if self.symmetric else 'asym'}"


def fake_quantize(kernel: jax.Array, spec: QuantSpec) -> jax.Array:
  """``[in, out]`` kernel -> the dequantized ``[in, out]`` kernel it rounds to (same dtype), in float32."""
  d_in, d_out = kernel.shape
  group = min(spec.group_size or d_in, d_in)
  pad = -d_in % group
  # Edge padding repeats the last row, so it changes no group's min or max; it is cut off below.
  w = jnp.pad(kernel.astype(jnp.float32), ((0, pad), (0, 0)), mode="edge").reshape(-1, group, d_out)
  if spec.symmetric:
    qmax = 2**(spec.bits - 1) - 1
    scale = jnp.max(jnp.abs(w), axis=1, keepdims=True) / qmax
    scale = jnp.where(scale > 0, scale, 1.0)
    dequantized = jnp.clip(jnp.round(w / scale), -qmax, qmax) * scale
  else:
    qmax = 2**spec.bits - 1
    low, high = jnp.min(w, axis=1, keepdims=True), jnp.max(w, axis=1, keepdims=True)
    scale = (high - low) / qmax
    scale = jnp.where(scale > 0, scale, 1.0)
    zero = jnp.round(-low / scale)
    dequantized = (jnp.clip(jnp.round(w / scale) + zero, 0, qmax) - zero) * scale
  return dequantized.reshape(-1, d_out)[:d_in].astype(kernel.dtype)


def quantize_model(model: nnx.Module, spec: QuantSpec) -> int:
  """Replace every transformer-block linear kernel (and expert) by its RTN rounding, in place; returns how
  many ``[in, out]`` kernels that is (each layer of a stack and each of an MoE layer's E experts counts
  once). Each kernel keeps its sharding: on a mesh every device rounds its own shard (groups run along
  the input axis, which ``fsdp`` splits into whole groups when it divides them)."""
  from tailjax.models.moe import MoE

  count = 0
  for path, module in nnx.iter_graph(model):
    params = ((module.kernel,) if isinstance(module, nnx.Linear) and "blocks" in path else
              (module.gate, module.up, module.down) if isinstance(module, MoE) else ())
    for param in params:  # [..., in, out]: leading axes are layers of a stack, then experts
      kernels = param.get_value()
      param.set_value(_rounder(spec, kernels.sharding, kernels.ndim - 2)(kernels))
      count += math.prod(kernels.shape[:-2])
  return count


@functools.lru_cache(maxsize=64)
def _rounder(spec: QuantSpec, sharding, leading: int):
  """``fake_quantize`` over ``leading`` stacked axes, compiled once per (spec, sharding, leading), its output in
  the input's sharding."""
  one = functools.partial(fake_quantize, spec=spec)
  for _ in range(leading):
    one = jax.vmap(one)
  return jax.jit(one, out_shardings=sharding)
