"""Will an evaluation fit? Per-device weights and the compiled step's temporaries, before any weight is read.

From the models' configs alone (``tailjax.models.load_config``), abstract parameters in the run's
dtype are placed on the mesh by ``tailjax.mesh``'s rules and the eval batch step is compiled for
them (``tailjax.step.step_temp_bytes``): nothing is allocated or run, so a user sizes
``batch_size`` and the mesh before holding the devices. The compiler is the local backend's: on a
CPU the temporaries of a half-precision run include one 16-bit copy of the stacked layer weights
(``tailjax.models.transformer.ScanRows``), which accelerators do not make; plan on the target device
kind for its own figure.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from tailjax import mesh, models
from tailjax.eval import step
from tailjax.eval.config import EvalConfig


@dataclasses.dataclass
class Plan:
  devices: int
  device_kind: str
  dtypes: list[str]  # per model, reference first
  weights_bytes: int  # per device, every model together
  temp_bytes: int  # per device, the compiled batch step
  device_bytes: int | None  # what one device holds, when known
  batch_size: int  # windows per step planned for
  seq_len: int  # tokens per window planned for
  note: str | None = None  # how the temporaries were estimated, when not by the run's own compile

  @property
  def fits(self) -> bool | None:
    return None if self.device_bytes is None else self.weights_bytes + self.temp_bytes <= self.device_bytes

  def lines(self) -> list[str]:
    gib = lambda b: f"{b / 2**30:.2f} GiB"
    verdict = ("fits" if self.fits else "does NOT fit") if self.fits is not None else "device memory unknown"
    room = f" of {gib(self.device_bytes)}" if self.device_bytes is not None else ""
    return [f"plan on {self.devices} x {self.device_kind} for batches of {self.batch_size} windows x {self.seq_len} "
            f"tokens, parameters {', '.join(self.dtypes)}:",
            f"  weights per device {gib(self.weights_bytes)} + compiled step temporaries {gib(self.temp_bytes)} = "
            f"{gib(self.weights_bytes + self.temp_bytes)}{room}: {verdict}"] + \
        ([f"  ({self.note})"] if self.note else [])


def plan_eval(reference: str, candidates: Sequence[str], *, batch_size: int, seq_len: int, dtype: str = "auto",
              device_mesh: jax.sharding.Mesh | None = None, device_bytes: int | None = None) -> Plan:
  """The memory plan of ``tailjax eval`` with these models (specs; ``@int4`` candidates are the reference's
  shape) on ``[batch_size, seq_len]`` windows. ``device_bytes`` defaults to what the first device reports."""
  if not candidates:
    raise ValueError("give at least one candidate (a model spec, or @int4 for the reference quantized) to plan")
  reference = models.ModelSpec.parse(reference).unlabelled
  parsed = [models.ModelSpec.parse(spec) for spec in candidates]
  specs = [reference, *(reference if spec.of_reference else spec.unlabelled for spec in parsed)]
  configs = [models.load_config(spec) for spec in specs]
  dtypes = [models.resolve_dtype(spec, dtype) for spec in specs]
  abstract = nnx.eval_shape(lambda: tuple(models.Decoder(cfg, dtype=models.DTYPES[d], rngs=nnx.Rngs(0))
                                          for cfg, d in zip(configs, dtypes)))
  state = nnx.state(abstract, nnx.Param)
  if device_mesh is None:
    weights = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state))
  else:
    weights = sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize for x, s in
                  zip(jax.tree.leaves(state), jax.tree.leaves(mesh.parameter_shardings(state, device_mesh))))
  note = None
  if jax.default_backend() == "cpu" and any(d in ("bfloat16", "float16") for d in dtypes):
    note = "on a CPU the temporaries hold a 16-bit copy of the layer weights, which accelerators do not"
  temp = step.step_temp_bytes(abstract, batch_size, seq_len, configs[0].vocab_size, device_mesh)
  device = jax.devices()[0]
  if device_bytes is None:
    device_bytes = (device.memory_stats() or {}).get("bytes_limit") if device.platform != "cpu" else None
  count = 1 if device_mesh is None else int(np.prod(list(device_mesh.shape.values())))
  return Plan(count, device.device_kind, dtypes, int(weights), int(temp), device_bytes, batch_size, seq_len, note)


def plan_config(config: EvalConfig, device_bytes: int | None = None) -> Plan:
  """``plan_eval`` of the run ``config`` describes, resolved as ``tailjax.eval.run`` resolves it: its reference
  and candidates (or the embedded default's), its batch on its mesh, its windows' length."""
  device_mesh = mesh.parse(config.mesh) if config.mesh else None
  return plan_eval(config.reference_spec(), config.candidate_specs(), batch_size=config.batch_size_on(device_mesh),
                   seq_len=config.window_protocol().seq_len, dtype=config.dtype, device_mesh=device_mesh,
                   device_bytes=device_bytes)
