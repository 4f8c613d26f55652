"""A decoder's parameters in an orbax checkpoint: written as they are, restored straight into their shardings.

``restore`` builds the target from the abstract decoder (shape, dtype, the ``NamedSharding`` that
``tailjax.mesh`` gives each parameter) and lets orbax read every device's part into it, so no
parameter is ever whole on one device unless it is meant to be.

Checkpoints written before blocks were stacked (``tailjax.models.transformer``: one
``blocks/<layer>`` subtree per layer, parameters without the leading ``[repeats]`` axis) are
converted on load: each layer is read on the host, the layers of a stack are stacked into
their rows and placed. That reads the model once on one host, which checkpoints of that age
(distilled students) afford.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import nnx

from tailjax import files
from tailjax import mesh as meshes
from tailjax.models.transformer import Decoder, slot


def save(model: Decoder, directory: Path) -> None:
  """Every ``nnx.Param`` of ``model`` into the orbax checkpoint ``directory`` (replaced if there)."""
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory, nnx.state(model, nnx.Param), force=True)


def restore(directory: Path, model: Decoder, device_mesh: jax.sharding.Mesh | None = None, kind=nnx.Param) -> None:
  """Fill the abstract ``model`` (``nnx.eval_shape``) from the checkpoint ``directory``, in place: each parameter
  in the dtype ``model`` declares, in its sharding on ``device_mesh``; a per-layer checkpoint is converted.
  ``kind``: the variables the checkpoint holds (``nnx.LoRAParam``: a trainer's checkpoint of adapters)."""
  import orbax.checkpoint as ocp

  abstract = nnx.state(model, kind)
  placement = meshes.parameter_shardings(abstract, device_mesh)
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      stored = _stored_tree(checkpointer, directory)
      if _is_per_layer(stored):
        nnx.update(model, _converted(checkpointer, directory, stored, model, abstract, placement))
        return
      target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, placement)
      nnx.update(model, checkpointer.restore(directory, target))
  except Exception as err:  # orbax and TensorStore raise bare Exception for damaged data, among others
    raise ValueError(f"{directory}: unreadable parameters ({files.reason(err)}): a damaged or partly written "
                     "checkpoint; write it again (or take the checkpoint before it)") from err


def is_per_layer(directory: Path) -> bool:
  """Whether the orbax checkpoint ``directory`` holds parameters in the layout before stacking (``blocks/<layer>``)."""
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as checkpointer:
    return _is_per_layer(_stored_tree(checkpointer, directory))


def _stored_tree(checkpointer, directory: Path) -> dict:
  """The checkpoint's tree of array metadata; a missing or damaged metadata file is a ``ValueError``."""
  metadata = checkpointer.metadata(directory)
  tree = getattr(getattr(metadata, "item_metadata", None), "tree", None)
  if not isinstance(tree, dict):
    raise ValueError("no readable parameter metadata")
  return tree


def _is_per_layer(stored: dict) -> bool:
  return "blocks" in stored and "layers" not in stored


def _converted(checkpointer, directory: Path, stored: dict, model: Decoder, abstract: nnx.State,
               placement) -> nnx.State:
  """A per-layer checkpoint (``blocks/<layer>/...``) read on the host, its layers stacked into ``model``'s rows."""
  host = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=host), stored)
  flat = {_names(path): np.asarray(value)
          for path, value in jax.tree_util.tree_flatten_with_path(checkpointer.restore(directory, target))[0]}
  rows: dict[tuple[str, ...], dict[int, np.ndarray]] = {}
  values: dict[tuple[str, ...], np.ndarray] = {}
  for path, value in flat.items():
    if path[0] != "blocks":
      values[path] = value
      continue
    where = slot(model.cfg, int(path[1]))
    rows.setdefault(("layers", str(where.stack), "blocks", str(where.position), *path[2:]), {})[where.row] = value
  for path, parts in rows.items():
    values[path] = np.stack([parts[r] for r in range(len(parts))])

  def place(path, variable, sharding):
    key = _names(path)  # ends in "value", as orbax stores a variable
    if key not in values:
      raise KeyError(f"parameter {'/'.join(key[:-1])} is not in the checkpoint")
    value = values[key]
    if value.shape != variable.shape:
      raise ValueError(f"parameter {'/'.join(key[:-1])} has shape {value.shape}, the model expects {variable.shape}")
    return jax.device_put(value.astype(variable.dtype), sharding)

  return jax.tree_util.tree_map_with_path(place, abstract, placement)


def _names(path) -> tuple[str, ...]:
  """A JAX key path -> orbax's names of its steps (dict keys, list indices and attributes as strings)."""
  return tuple(str(next(getattr(k, a) for a in ("key", "idx", "name") if hasattr(k, a))) for k in path)
