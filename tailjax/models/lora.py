"""Low-rank adapters (LoRA; Hu et al., 2021) on a decoder's linear layers.

An adapted layer computes ``y = x W + b + (alpha / r) (d(x) A) B``: ``A: [in, r]`` (He-uniform) and
``B: [r, out]`` (zeros, so an adapted model starts equal to its base) are ``nnx.LoRAParam``s in float32 beside the
frozen kernel ``W``, which keeps its dtype. ``d`` is dropout on the adapter's input (rate ``dropout``, the kept
inputs scaled by ``1 / (1 - dropout)``, as in Hu et al.'s and PEFT's ``lora_dropout``) during a training step
that gave the layers keys (``dropout_keys``); otherwise, and at ``dropout = 0``, ``d(x) = x``. In stacked layers
(``tailjax.models.transformer.Stack``) adapters carry the kernels' leading ``[repeats]`` axis. ``merge`` folds
them into the kernels, ``W + (alpha / r) A B``, and removes them: the result is a plain model.

``targets`` name linear layers by attribute: ``q``, ``k``, ``v``, ``o`` (every softmax family; Gated DeltaNet's
projections too), ``gate``, ``up``, ``down`` (dense MLPs and an MoE's shared expert; routed experts are einsums
over stacked expert weights, not linear layers, and are left alone), or any other linear layer's name
(``q_a``, ``kv_b`` of multi-head latent attention, ...).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tailjax import configs
from tailjax.models.layers import Linear

DEFAULT_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """``rank`` r of each adapter, ``alpha`` (the update is scaled by ``alpha / rank``), ``targets`` and
  ``dropout`` (the module docstring)."""

  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = DEFAULT_TARGETS
  dropout: float = 0.0

  def __post_init__(self):
    object.__setattr__(self, "targets", configs.items(self.targets))
    configs.check_types(self, "lora")
    if self.rank < 1:
      raise ValueError(f"lora rank {self.rank!r}: expected a whole number >= 1")
    if not self.alpha > 0:
      raise ValueError(f"lora alpha {self.alpha!r}: expected > 0")
    if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
      raise ValueError(f"lora targets {self.targets!r}: expected names of linear layers, e.g. {DEFAULT_TARGETS}")
    if not 0 <= self.dropout < 1:
      raise ValueError(f"lora dropout {self.dropout!r}: expected a rate in [0, 1)")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @classmethod
  def from_dict(cls, fields: dict[str, Any]) -> LoraConfig:
    configs.refuse_unknown(cls, fields, "lora")
    return cls(**fields)

  def to_dict(self) -> dict[str, Any]:
    return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets), "dropout": self.dropout}


def _linears(model: nnx.Module):
  for path, module in nnx.iter_graph(model):
    if isinstance(module, Linear) and path:
      yield path, module


def adapt(model: nnx.Module, config: LoraConfig, rngs: nnx.Rngs) -> int:
  """Adds adapters to every linear layer of ``model`` named in ``config.targets`` (in place) -> how many. A name
  of ``DEFAULT_TARGETS`` the model lacks is passed over (an MoE model without dense MLPs has no ``gate``); any
  other unknown name is refused, as is a set of targets that matches nothing."""
  names = {str(path[-1]) for path, _ in _linears(model)}
  missing = sorted(set(config.targets) - names - set(DEFAULT_TARGETS))
  if missing or not set(config.targets) & names:
    raise ValueError(f"lora targets {missing or sorted(config.targets)}: this model has no linear layer of that "
                     f"name (it has {sorted(names)})")
  count = 0
  for path, module in _linears(model):
    if str(path[-1]) not in config.targets:
      continue
    if module.lora_a is not None:
      raise ValueError(f"{'/'.join(map(str, path))}: already has adapters")
    kernel = module.kernel
    *lead, d_in, d_out = kernel.shape
    a = nnx.initializers.he_uniform()(rngs.params(), (*lead, d_in, config.rank), jnp.float32)
    module.lora_a = nnx.LoRAParam(a)
    module.lora_b = nnx.LoRAParam(jnp.zeros((*lead, config.rank, d_out), jnp.float32))
    module.lora_scale = config.scale
    module.lora_dropout = config.dropout
    count += 1
  return count


class DropoutKey(nnx.Variable):
  """An adapted layer's dropout key for one training forward (``[repeats]`` keys in stacked layers)."""


def dropout_keys(model: nnx.Module, key: jax.Array) -> int:
  """Gives every adapted layer with a dropout rate its own key drawn from ``key`` (in place, on the model of one
  training forward: a model without keys drops nothing) -> how many layers."""
  count = 0
  for number, (_, module) in enumerate(_linears(model)):
    if module.lora_a is None or not module.lora_dropout:
      continue
    lead = module.lora_a.shape[:-2]
    layer_key = jax.random.fold_in(key, number)
    module.lora_key = DropoutKey(jax.random.split(layer_key, lead) if lead else layer_key)
    count += 1
  return count


def delta(module: Linear) -> jax.Array:
  """``scale * A B``: the adapted layer's change of kernel, ``[..., in, out]`` float32."""
  return module.lora_scale * jnp.einsum("...ir,...ro->...io", module.lora_a[...], module.lora_b[...])


def merge(model: nnx.Module) -> int:
  """Folds every adapter into its kernel (in the kernel's dtype) and removes it, in place -> how many."""
  count = 0
  for _, module in list(_linears(model)):
    if module.lora_a is None:
      continue
    kernel = module.kernel[...]
    module.kernel.set_value((kernel.astype(jnp.float32) + delta(module)).astype(kernel.dtype))
    del module.lora_a, module.lora_b, module.lora_scale, module.lora_dropout
    count += 1
  return count


def adapted(model: nnx.Module) -> bool:
  return any(module.lora_a is not None for _, module in _linears(model))
