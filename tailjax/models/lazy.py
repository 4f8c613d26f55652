"""Tensors read on demand, one box at a time: what lets each device load only its own shards.

A ``LazyTensor`` has a ``shape`` and ``read(box)``, the NumPy array of one box of it, a box being
one ``slice`` per axis with concrete bounds and step 1 (``box_of`` makes one from the index
``jax.make_array_from_callback`` hands over). The checkpoint readers return lazies over
memory-mapped files (safetensors' ``get_slice``; GGUF's quantized rows, dequantized row range by
row range), and the loaders compose them:

- ``Transposed``: the last two axes swapped (PyTorch's ``[out, in]`` -> tailjax's ``[in, out]``);
- ``Part``: a range along one axis (Phi-3's fused ``qkv_proj`` cut into q, k, v);
- ``Strided``: every ``step``-th index along one axis (gpt-oss's interleaved gate and up columns);
- ``Stacked``: tensors stacked on a new leading axis (experts stored one by one);
- ``RowsPermuted``: rows reordered (llama.cpp's rotary permutation of q/k undone);
- ``Mapped``: an elementwise function (Gemma's GGUF norms stored as ``1 + w``);
- ``Squeezed``: a length-1 axis dropped (PyTorch's ``[C, 1, K]`` depthwise convolution weights),

so nothing is read until a device asks for its box, and then only that box (plus, for a
permutation, the rows it draws from). Reads come back in the file's own dtype (bfloat16 stays
bfloat16); dequantized GGUF blocks come back in float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

Box = tuple[slice, ...]


def box_of(index: tuple, shape: Sequence[int]) -> Box:
  """An index (slices, possibly open, one per leading axis) -> a full box with concrete bounds."""
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  out = []
  for s, size in zip(index, shape):
    start, stop, step = s.indices(size)
    if step != 1:
      raise ValueError(f"box {index}: only unit steps")
    out.append(slice(start, stop))
  return tuple(out)


class LazyTensor:
  """``shape`` and ``read(box) -> np.ndarray`` of ``[stop - start for each axis]``."""

  shape: tuple[int, ...]

  def read(self, box: Box) -> np.ndarray:
    raise NotImplementedError


@dataclasses.dataclass(frozen=True, eq=False)
class Stored(LazyTensor):
  """A tensor in a file: ``reader(box)`` reads that box (and only it) in the file's layout."""

  shape: tuple[int, ...]
  reader: Callable[[Box], np.ndarray]

  def read(self, box: Box) -> np.ndarray:
    return self.reader(box)


@dataclasses.dataclass(frozen=True, eq=False)
class Transposed(LazyTensor):
  """The last two axes of ``base`` swapped."""

  base: LazyTensor

  @property
  def shape(self):
    *lead, a, b = self.base.shape
    return (*lead, b, a)

  def read(self, box: Box) -> np.ndarray:
    *lead, a, b = box
    return np.swapaxes(self.base.read((*lead, b, a)), -1, -2)


@dataclasses.dataclass(frozen=True, eq=False)
class Part(LazyTensor):
  """``base[..., start:stop, ...]`` along ``axis`` (non-negative)."""

  base: LazyTensor
  axis: int
  start: int
  stop: int

  @property
  def shape(self):
    shape = list(self.base.shape)
    shape[self.axis] = self.stop - self.start
    return tuple(shape)

  def read(self, box: Box) -> np.ndarray:
    box = list(box)
    s = box[self.axis]
    box[self.axis] = slice(self.start + s.start, self.start + s.stop)
    return self.base.read(tuple(box))


@dataclasses.dataclass(frozen=True, eq=False)
class Strided(LazyTensor):
  """``base[..., start::step, ...]`` along ``axis`` (non-negative); a box reads the span it draws from."""

  base: LazyTensor
  axis: int
  start: int
  step: int

  @property
  def shape(self):
    shape = list(self.base.shape)
    shape[self.axis] = len(range(self.start, shape[self.axis], self.step))
    return tuple(shape)

  def read(self, box: Box) -> np.ndarray:
    box = list(box)
    s = box[self.axis]
    if s.stop <= s.start:
      box[self.axis] = slice(self.start, self.start)
      return self.base.read(tuple(box))
    box[self.axis] = slice(self.start + self.step * s.start, self.start + self.step * (s.stop - 1) + 1)
    span = self.base.read(tuple(box))
    return span[(slice(None),) * self.axis + (slice(None, None, self.step),)]


@dataclasses.dataclass(frozen=True, eq=False)
class Stacked(LazyTensor):
  """Equal-shaped ``parts`` stacked on a new leading axis."""

  parts: tuple[LazyTensor, ...]

  @property
  def shape(self):
    return (len(self.parts), *self.parts[0].shape)

  def read(self, box: Box) -> np.ndarray:
    first, *rest = box
    return np.stack([self.parts[i].read(tuple(rest)) for i in range(first.start, first.stop)])


@dataclasses.dataclass(frozen=True, eq=False)
class RowsPermuted(LazyTensor):
  """Row ``i`` of the result is row ``order[i]`` of ``base`` (axis 0); a box reads the span of rows it draws from."""

  base: LazyTensor
  order: np.ndarray

  @property
  def shape(self):
    return self.base.shape

  def read(self, box: Box) -> np.ndarray:
    rows = self.order[box[0]]
    if rows.size == 0:
      return self.base.read((slice(0, 0), *box[1:]))
    low, high = int(rows.min()), int(rows.max()) + 1
    return self.base.read((slice(low, high), *box[1:]))[rows - low]


@dataclasses.dataclass(frozen=True, eq=False)
class Mapped(LazyTensor):
  """``fn(base)`` for an elementwise ``fn``."""

  base: LazyTensor
  fn: Callable[[np.ndarray], np.ndarray]

  @property
  def shape(self):
    return self.base.shape

  def read(self, box: Box) -> np.ndarray:
    return self.fn(self.base.read(box))



@dataclasses.dataclass(frozen=True, eq=False)
class Squeezed(LazyTensor):
  """``base`` without its length-1 axis ``axis`` (non-negative)."""

  base: LazyTensor
  axis: int

  def __post_init__(self):
    if self.base.shape[self.axis] != 1:
      raise ValueError(f"axis {self.axis} of a {tuple(self.base.shape)} tensor is not of length 1")

  @property
  def shape(self):
    return tuple(n for i, n in enumerate(self.base.shape) if i != self.axis)

  def read(self, box: Box) -> np.ndarray:
    box = (*box[:self.axis], slice(0, 1), *box[self.axis:])
    return np.squeeze(self.base.read(box), axis=self.axis)
