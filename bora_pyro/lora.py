"""Multi-task LoRA layers: a frozen base linear layer plus one low-rank update per row.

A :class:`MultiTaskLoRA` wraps one frozen ``nn.Linear`` (weight ``[out, in]``) or transformers'
``Conv1D`` (GPT-2; weight ``[in, out]``) and adds exactly one thing: for a batch whose row ``b``
belongs to task ``t_b``,

    y_b = base(x_b) + (alpha / r) · x_b A_{t_b}ᵀ B_{t_b}ᵀ,    A_t ∈ R^{r×in},  B_t ∈ R^{out×r}.

The factors are not parameters of the layer: they are values of Pyro sample sites, handed in for
one forward pass with :meth:`MultiTaskLoRA.set_adapters`. A mixed-task batch is one forward pass:
the rows' factors are gathered and applied with batched matmuls, never a Python loop over tasks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


@dataclass(frozen=True)
class AdaptedModule:
    """Name and factor shapes of one adapted module: ``lora_A`` is [rank, in], ``lora_B`` [out, rank]."""

    name: str
    in_features: int
    out_features: int
    rank: int

    @property
    def shape_A(self) -> tuple[int, int]:
        return (self.rank, self.in_features)

    @property
    def shape_B(self) -> tuple[int, int]:
        return (self.out_features, self.rank)

    @property
    def num_params(self) -> int:
        return self.rank * (self.in_features + self.out_features)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an ``nn.Linear`` or a transformers ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        in_features, out_features = module.weight.shape
        return in_features, out_features
    raise TypeError(f"cannot adapt {type(module).__name__}: only nn.Linear and Conv1D are supported")


class MultiTaskLoRA(nn.Module):
    """A frozen linear layer plus per-row LoRA updates.

    Args:
        base_layer: the frozen ``nn.Linear`` or ``Conv1D``; kept by reference, never copied.
        rank: LoRA rank ``r``.
        alpha: LoRA scaling numerator; the update is scaled by ``alpha / rank``.

    Without adapters set (outside :meth:`set_adapters`) the layer is exactly its base layer.
    """

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_features(base_layer)
        self.rank = rank
        self.scaling = alpha / rank
        self.lora_A: torch.Tensor | None = None
        self.lora_B: torch.Tensor | None = None
        self.row_tasks: torch.Tensor | None = None

    def set_adapters(
        self, lora_A: torch.Tensor | None, lora_B: torch.Tensor | None, row_tasks: torch.Tensor | None
    ) -> None:
        """Use ``lora_A`` [T, r, in] and ``lora_B`` [T, out, r] for the next forward passes;
        row ``b`` of the batch uses task ``row_tasks[b]`` (an index into the first dim, [batch]),
        or factor ``b`` when ``row_tasks`` is None. ``lora_A=None`` removes the adapters."""
        self.lora_A, self.lora_B, self.row_tasks = lora_A, lora_B, row_tasks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch, ..., in] → [batch, ..., out]; also [batch · tokens, in] (OPT flattens its MLP
        input), since only the row-major order of the leading dims matters."""
        result = self.base_layer(x)
        if self.lora_A is None:
            return result
        A, B = self.lora_A, self.lora_B  # [T, r, in], [T, out, r]
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(A.dtype)
        if A.shape[0] == 1:  # one adapter for every row: plain matmuls, as peft
            down = (x.reshape(-1, x.shape[-1]) @ A[0].T).unsqueeze(0)  # [1, batch · tokens, r]
        else:
            if self.row_tasks is not None:
                # index_select, not A[row_tasks]: its backward (index_add_) is ~5x faster on the CPU
                A, B = A.index_select(0, self.row_tasks), B.index_select(0, self.row_tasks)  # [batch, r, in], [batch, out, r]
            down = x.reshape(A.shape[0], -1, x.shape[-1]) @ A.transpose(1, 2)  # [batch, tokens, r]
        if down.dtype != result.dtype:  # a low-precision base without autocast: the update in the adapters' dtype
            return result + (self.scaling * (down @ B.transpose(1, 2))).reshape(result.shape).to(result.dtype)
        # result + scaling · down Bᵀ in one call: no separate pass to scale the update and to add it
        return torch.baddbmm(result.reshape(down.shape[0], -1, result.shape[-1]), down, B.transpose(1, 2),
                             alpha=self.scaling).view(result.shape)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scaling={self.scaling:g}"


def kaiming_uniform_A(shape: tuple[int, int], generator: torch.Generator | None = None) -> torch.Tensor:
    """peft's LoRA init of ``lora_A`` [r, in]: ``kaiming_uniform_(a=sqrt(5))`` = U(±1/sqrt(in))."""
    bound = 1.0 / math.sqrt(shape[1])
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound
