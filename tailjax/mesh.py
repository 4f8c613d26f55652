"""Where arrays live: one mesh, one table of logical-axis rules, multi-host start-up.

tailjax runs on JAX's own SPMD runtime. Models name logical axes on their parameters
(``vocab``, ``embed``, ``heads``, ``kv_heads``, ``mlp``, ``experts``, ``norm``: see
``tailjax.models.layers``) and batches are ``[batch, ...]``; this module alone decides
which mesh axes those map to. The jitted steps are unchanged: XLA partitions them
(GSPMD), so a sketch summed over a batch sharded across ``data`` is merged by the
all-reduce it inserts, the same integer counts on any mesh.

Mesh axes: ``data`` (batch), ``fsdp`` (batch and parameters' ``embed`` dimension), ``expert``
(batch and the experts of mixture-of-experts layers: each device stores ``E / expert`` of
them) and ``model`` (heads, MLP and vocabulary columns). ``--mesh data=4,model=2``; ``auto`` puts
every device on ``data``. A parameter dimension that a mesh axis does not divide is
replicated along it rather than refused (small test models, odd head counts).
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "expert", "model")
BATCH = ("data", "fsdp", "expert")
# logical axis -> mesh axes it is split over
RULES: dict[str, tuple[str, ...]] = {
    "batch": BATCH,
    "vocab": ("model",),
    "embed": ("fsdp",),
    "heads": ("model",),
    "kv_heads": ("model",),
    "mlp": ("model",),
    "experts": ("expert",),
    "norm": (),
}


def parse(text: str | None, devices=None) -> Mesh:
  """``"data=4,model=2"`` (axes left out have size 1; one size may be -1: the rest) or ``auto`` -> ``Mesh``."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  sizes = {axis: 1 for axis in AXES}
  if text in (None, "", "auto"):
    sizes["data"] = devices.size
  else:
    for part in text.split(","):
      name, _, value = part.partition("=")
      if name.strip() not in sizes or not value.strip().lstrip("-").isdigit():
        raise ValueError(f"--mesh {text!r}: expected comma-separated AXIS=SIZE with AXIS in {AXES}")
      sizes[name.strip()] = int(value)
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1:
      raise ValueError(f"--mesh {text!r}: at most one axis may be -1")
    if free:
      sizes[free[0]] = devices.size // math.prod(s for s in sizes.values() if s != -1)
  if math.prod(sizes.values()) != devices.size:
    raise ValueError(f"--mesh {text!r}: {dict(sizes)} needs {math.prod(sizes.values())} devices, "
                     f"{devices.size} are available")
  return Mesh(devices.reshape(tuple(sizes[a] for a in AXES)), AXES)


def _mesh_spec(logical: PartitionSpec | tuple, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
  """Logical names -> mesh axes, replicating a dimension its mesh axes do not divide."""
  out = []
  for name, size in zip(tuple(logical) + (None,) * (len(shape) - len(logical)), shape):
    axes = tuple(a for a in RULES.get(name, ()) if mesh.shape[a] > 1) if name else ()
    out.append(axes if axes and size % math.prod(mesh.shape[a] for a in axes) == 0 else None)
  return PartitionSpec(*(a[0] if isinstance(a, tuple) and len(a) == 1 else a for a in out))


def parameter_shardings(state: nnx.State, mesh: Mesh | None):
  """The ``NamedSharding`` of every variable of ``state`` (arrays or abstract shapes) on ``mesh``; without a
  mesh, the first local device for all of them."""
  if mesh is None:
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda _: one, state)
  logical = nnx.get_partition_spec(state)
  return jax.tree.map(lambda spec, value: NamedSharding(mesh, _mesh_spec(spec, value.shape, mesh)), logical, state,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def variable_sharding(variable: nnx.Variable, mesh: Mesh | None) -> jax.sharding.Sharding:
  """The sharding of one variable (array or abstract shape), as ``parameter_shardings`` gives it."""
  if mesh is None:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  logical = nnx.get_partition_spec(variable).get_value()
  return NamedSharding(mesh, _mesh_spec(logical, variable.get_value().shape, mesh))


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
  """Places every parameter of ``model`` on ``mesh`` by its logical axis names (in place; returns it)."""
  state = nnx.state(model)
  nnx.update(model, jax.tree.map(jax.device_put, state, parameter_shardings(state, mesh)))
  return model


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(BATCH, *(None,) * (ndim - 1)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def data_parallelism(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH)


def global_batch(array: np.ndarray, mesh: Mesh) -> jax.Array:
  """A host array every process holds in full -> one global array split over the batch axes.

  Each process hands over only the rows its own devices hold, so the same call works on one
  host and on a pod.
  """
  if array.shape[0] % data_parallelism(mesh):
    raise ValueError(f"a batch of {array.shape[0]} rows does not split over {data_parallelism(mesh)} data shards; "
                     "choose a batch size that is a multiple")
  return jax.make_array_from_callback(array.shape, batch_sharding(mesh, array.ndim), lambda index: array[index])


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None) -> None:
  """Joins a multi-process run: explicit arguments (GPU clusters), else JAX's own detection (TPU pods,
  SLURM, ``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``). A no-op for one process."""
  coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
    num_processes = int(os.environ["JAX_NUM_PROCESSES"])
  if process_id is None and "JAX_PROCESS_ID" in os.environ:
    process_id = int(os.environ["JAX_PROCESS_ID"])
  if coordinator is None and num_processes is None and not _on_pod():
    return
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)


def _on_pod() -> bool:
  """Asked to join a cluster JAX detects by itself: a TPU slice (tpu/pod.py sets TAILJAX_MULTIHOST=1), SLURM."""
  return os.environ.get("TAILJAX_MULTIHOST") == "1" or "SLURM_JOB_ID" in os.environ


def is_writer() -> bool:
  """Only process 0 writes reports and run files."""
  return jax.process_index() == 0
