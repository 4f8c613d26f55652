"""MXFP4 (OCP microscaling FP4): how gpt-oss checkpoints store their experts, dequantized box by box.

Each row of ``R`` values along the input axis is cut into groups of 32. A group is 16 bytes of
``blocks`` (two FP4 E2M1 codes per byte, the low nibble first) and one byte of ``scales``, a power
of two biased by 127: ``value = FP4[code] * 2^(scale - 127)`` with
``FP4 = [0, .5, 1, 1.5, 2, 3, 4, 6]`` and the code's high bit the sign. ``blocks: [..., rows, G, 16]``,
``scales: [..., rows, G]`` -> ``[..., rows, 32 G]``: PyTorch's ``[out, in]`` layout per expert,
as transformers' ``convert_moe_packed_tensors`` gives before its transpose. A box reads only the
groups its columns fall in.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tailjax.models import lazy

GROUP = 32
FP4 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class Dequantized(lazy.LazyTensor):
  """The float32 values of MXFP4 ``blocks: [..., rows, G, 16]`` (uint8) with ``scales: [..., rows, G]`` (uint8)."""

  blocks: lazy.LazyTensor
  scales: lazy.LazyTensor
  source: str = "MXFP4 tensor"

  def __post_init__(self):
    if tuple(self.blocks.shape[:-1]) != tuple(self.scales.shape) or self.blocks.shape[-1] != GROUP // 2:
      raise ValueError(f"{self.source}: MXFP4 blocks {tuple(self.blocks.shape)} and scales "
                       f"{tuple(self.scales.shape)} do not pair ([..., rows, G, 16] with [..., rows, G])")

  @property
  def shape(self):
    *lead, groups, _ = self.blocks.shape
    return (*lead, groups * GROUP)

  def read(self, box: lazy.Box) -> np.ndarray:
    *lead, columns = box
    first, last = columns.start // GROUP, -(-columns.stop // GROUP)
    groups = (*lead, slice(first, last))
    codes = np.asarray(self.blocks.read((*groups, slice(0, GROUP // 2))), np.uint8)
    exponent = np.asarray(self.scales.read(groups), np.int32) - 127
    values = np.empty((*codes.shape[:-1], GROUP), np.float32)
    values[..., 0::2], values[..., 1::2] = FP4[codes & 0x0F], FP4[codes >> 4]
    values = np.ldexp(values, exponent[..., None]).reshape(*codes.shape[:-2], -1)
    return values[..., columns.start - first * GROUP:columns.stop - first * GROUP]
