"""All LoRA factors of one adapter as one flat vector: the packed layout of the shipped priors.

A Pyro sample site costs ~1 ms of Python per step whatever its size, and GPT-2 small has 48
adapted modules: one site per module and factor would be 96 sites per level. The shipped priors
sample one site per level instead, ``global.lora`` [P] and ``task.lora`` [T, P], with

    P = Σ_modules r · (in + out),    the vector = [A_1.flatten(), B_1.flatten(), A_2.flatten(), ...]

in module order, and :meth:`FactorLayout.unpack` views it as the per-module factors the LM takes.
Unpacking copies nothing: every segment is a view, and its backward is one ``cat`` (slicing
with ``t[:, a:b]`` instead would allocate a full-size gradient per slice).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .lora import AdaptedModule

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Segment:
    """One factor's place in the packed vector: ``vector[offset : offset + numel]`` is ``shape``."""

    module: AdaptedModule
    factor: str  # "lora_A" | "lora_B"
    offset: int
    shape: tuple[int, int]

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


class FactorLayout:
    """Where each module's ``lora_A`` [r, in] and ``lora_B`` [out, r] lie in the packed vector [P]."""

    def __init__(self, modules: Sequence[AdaptedModule]):
        self.modules = tuple(modules)
        segments, offset = [], 0
        for module in self.modules:
            for factor, shape in (("lora_A", module.shape_A), ("lora_B", module.shape_B)):
                segments.append(Segment(module, factor, offset, shape))
                offset += shape[0] * shape[1]
        self.segments: tuple[Segment, ...] = tuple(segments)
        self.size = offset

    def unpack(self, flat: torch.Tensor) -> Factors:
        """[T, P] → module name → (lora_A [T, r, in], lora_B [T, out, r]), all views of ``flat``."""
        parts = flat.split([segment.numel for segment in self.segments], dim=-1)
        views = [part.unflatten(-1, segment.shape) for part, segment in zip(parts, self.segments)]
        return {module.name: (views[2 * i], views[2 * i + 1]) for i, module in enumerate(self.modules)}

    def pack(self, factors: Factors) -> torch.Tensor:
        """The inverse of :meth:`unpack`: per-module factors [T, ...] → [T, P]."""
        return torch.cat([factors[segment.module.name][segment.factor == "lora_B"].flatten(-2)
                          for segment in self.segments], dim=-1)

    def fill(self, values: Sequence[float | torch.Tensor], device: torch.device | None = None) -> torch.Tensor | float:
        """A [P] vector holding ``values[i]`` on every entry of segment i; a plain float when all
        values are the same float (e.g. one τ^{-1/2} for every factor)."""
        if all(isinstance(value, float) for value in values) and len(set(values)) == 1:
            return values[0]
        sizes = torch.tensor([segment.numel for segment in self.segments], device=device)
        return torch.stack([torch.as_tensor(value, dtype=torch.float32, device=device) for value in values]
                           ).repeat_interleave(sizes)

    def __repr__(self) -> str:
        return f"FactorLayout(modules={len(self.modules)}, size={self.size})"
