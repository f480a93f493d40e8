"""Diagonal Normals over whole factor tensors whose log-densities cost a pass or two, not ten.

``dist.Normal(loc, scale).to_event(n).log_prob(x)`` evaluates ``-(x - loc)² / (2σ²) - log σ - c``
element by element and then sums: on a [K, P] task site of GPT-2 small (K = 8, P = 2.4M) every one
of those ~7 passes, and as many in backward, allocates and walks a 76 MB tensor. Here:

- :class:`SummedNormal` (the priors' Normal, built with :func:`normal`): the sum is
  ``-‖(x - loc) / σ‖² / 2 - Σ log σ - n·log √(2π)``; with one σ for every entry (a fixed or learned
  τ^{-1/2}) ‖x − loc‖² is one :class:`SquaredDistance`: a subtraction and a norm forward, a
  product and a sum backward, and no [K, P] tensor for a ``loc`` the tasks plate broadcasts.
- :class:`DrawnRows` (the mean-field guide's Normal): K rows given as separate ``loc`` and
  ``log σ`` tensors, drawn and scored in one pass per row (:class:`DrawRows`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import TorchDistribution
from torch.autograd.function import once_differentiable
from torch.distributions import constraints

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
NOISE_CHUNK = 2**19  #: numbers drawn by one generator (2 MB): small enough to share a [P] row among threads


class SquaredDistance(torch.autograd.Function):
    """``‖value − loc‖²`` over the dims ``event_dims``, ``loc`` broadcast to ``value``.

    Autograd's own chain (subtract, norm) takes four passes over ``value`` backward; this one
    takes two: ``∂/∂value = 2g·(value − loc)`` from the difference kept from forward, and
    ``∂/∂loc`` = minus its sum over the dims ``loc`` was broadcast along.
    """

    @staticmethod
    def forward(ctx, value: torch.Tensor, loc: torch.Tensor, event_dims: int) -> torch.Tensor:
        difference = value - loc
        ctx.save_for_backward(difference)
        ctx.shapes, ctx.event_dims = (value.shape, loc.shape), event_dims
        return squared_norm(difference, event_dims)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (difference,) = ctx.saved_tensors
        grad_difference = difference * (2 * grad).reshape(grad.shape + (1,) * ctx.event_dims)
        value_shape, loc_shape = ctx.shapes
        grad_loc = -grad_difference.sum_to_size(loc_shape) if ctx.needs_input_grad[1] else None
        return grad_difference.sum_to_size(value_shape), grad_loc, None


class SummedNormal(dist.Independent):
    """``Independent(Normal(loc, scale), n)`` with a fused log-density; build it with :func:`normal`.

    ``compact`` holds ``loc`` and ``scale`` as given, before any broadcasting (by ``Normal`` or by
    a plate's ``expand``), so the log-density reads a [P] ``loc`` once per row instead of an
    expanded [K, P] copy of it.
    """

    compact: tuple[torch.Tensor, torch.Tensor | float] | None = None

    def expand(self, batch_shape, _instance=None):
        new = super().expand(batch_shape, _instance)
        new.compact = self.compact
        return new

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        loc, scale = self.compact or (self.base_dist.loc, self.base_dist.scale)
        shape = torch.broadcast_shapes(value.shape, self.batch_shape + self.event_shape)
        event_dims = self.reinterpreted_batch_ndims
        size = math.prod(shape[len(shape) - event_dims:])
        if not torch.is_tensor(scale) or all(stride == 0 for stride in scale.stride()):  # one σ, e.g. τ^{-1/2}
            sigma = torch.as_tensor(scale[(0,) * scale.dim()] if torch.is_tensor(scale) else scale,
                                    dtype=value.dtype, device=value.device)
            squares = SquaredDistance.apply(value, loc, event_dims) / sigma**2
            log_scales = size * sigma.log()
        else:
            squares = squared_norm((value - loc) / scale, event_dims)
            log_scales = event_sum(scale.log().expand(shape), event_dims)
        return (-0.5 * squares - log_scales - size * LOG_SQRT_2PI).expand(shape[:len(shape) - event_dims])


def normal(loc: torch.Tensor, scale: float | torch.Tensor, event_dims: int) -> SummedNormal:
    """``Normal(loc, scale)`` with its rightmost ``event_dims`` dims as one event, fused log-density."""
    normal = SummedNormal(dist.Normal(loc, scale), event_dims)
    normal.compact = loc, scale
    return normal


def event_sum(tensor: torch.Tensor, event_dims: int) -> torch.Tensor:
    """The sum over the rightmost ``event_dims`` dims (none: the tensor; ``sum(())`` would sum all)."""
    return tensor.sum(tuple(range(-event_dims, 0))) if event_dims else tensor


def squared_norm(tensor: torch.Tensor, event_dims: int) -> torch.Tensor:
    """``event_sum(tensor²)`` in one fused pass."""
    return torch.linalg.vector_norm(tensor, dim=tuple(range(-event_dims, 0))) ** 2 if event_dims else tensor.square()


def stacked_shape(row_shape: torch.Size, dim: int | None, count: int) -> torch.Size:
    """The shape of ``count`` rows of ``row_shape`` stacked along ``dim`` (None: one row, unstacked)."""
    if dim is None:
        return torch.Size(row_shape)
    position = len(row_shape) + 1 + dim
    return torch.Size((*row_shape[:position], count, *row_shape[position:]))


def row(tensor: torch.Tensor, dim: int | None, index: int) -> torch.Tensor:
    """Row ``index`` of ``tensor`` along ``dim``; the tensor itself when ``dim`` is None."""
    return tensor if dim is None else tensor.select(dim, index)


@functools.cache
def noise_threads(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="bora-noise")


def fill_standard_normal(tensors: Sequence[torch.Tensor]) -> None:
    """Fill every tensor with Normal(0, 1) noise, in place.

    On the CPU torch draws normals on one core (~4 ns a number: 80 ms for the 19M of a [8, P]
    GPT-2 small site); there every chunk of ``NOISE_CHUNK`` numbers has its own generator, seeded
    from torch's global one, and the chunks are filled in parallel on torch's threads. A seed
    fixes the draw whatever the number of threads (e.g. one per process under torchrun).
    """
    if tensors[0].device.type != "cpu":
        for tensor in tensors:
            tensor.normal_()
        return
    chunks = [chunk for tensor in tensors
              for chunk in (tensor.view(-1).split(NOISE_CHUNK) if tensor.is_contiguous() else [tensor])]
    seeds = torch.randint(0, 2**62, (len(chunks),)).tolist()

    def fill(chunk: torch.Tensor, seed: int) -> torch.Tensor:
        return chunk.normal_(generator=torch.Generator().manual_seed(seed))

    workers = min(torch.get_num_threads(), len(chunks))
    list(noise_threads(workers).map(fill, chunks, seeds) if workers > 1 else map(fill, chunks, seeds))


class DrawRows(torch.autograd.Function):
    """A draw ``z_k = loc_k + exp(s_k)·ε_k``, ε_k ~ Normal(0, 1), of K rows and its log-density

        log q(z_k) = -Σ s_k - ‖ε_k‖² / 2 - n·log √(2π),    ε_k held fixed,

    the formula's value and gradient (along the draw ∂ log q / ∂loc = 0, ∂ log q / ∂s = -1), row by
    row into the stacked [..., K, ...] result: no stacked copy of the locs or scales, one draw of
    noise, ``exp`` and ``add`` per row forward, one ``addcmul`` per row backward.

    ``apply(dim, event_dims, *locs, *log_scales)`` → (z stacked along ``dim``, log q [..., K, ...]
    of z's batch shape); ``dim`` None: a single row, not stacked. Without gradients (a posterior
    draw for prediction) z is drawn in place and log q is None.
    """

    @staticmethod
    def forward(ctx, dim: int | None, event_dims: int, *rows: torch.Tensor):
        locs, log_scales = rows[:len(rows) // 2], rows[len(rows) // 2:]
        first = locs[0]
        shape = stacked_shape(first.shape, dim, len(locs))
        value = first.new_empty(shape)
        scored = any(ctx.needs_input_grad)
        scaled_noise = first.new_empty(shape) if scored else value
        log_q = first.new_empty(shape[:len(shape) - event_dims]) if scored else None
        batch_dim = None if dim is None else dim + event_dims
        noises = [row(scaled_noise, dim, index) for index in range(len(locs))]
        fill_standard_normal(noises)
        for index, (loc, log_scale, noise) in enumerate(zip(locs, log_scales, noises)):
            if scored:
                row(log_q, batch_dim, index).copy_(-event_sum(log_scale, event_dims) - 0.5 * squared_norm(noise, event_dims))
            torch.add(loc, noise.mul_(log_scale.exp()), out=row(value, dim, index))  # (may be noise itself)
        if scored:
            log_q -= math.prod(shape[len(shape) - event_dims:]) * LOG_SQRT_2PI
            ctx.save_for_backward(scaled_noise)
        ctx.dim, ctx.batch_dim, ctx.event_dims, ctx.num_rows = dim, batch_dim, event_dims, len(locs)
        return value, log_q

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_value: torch.Tensor, grad_log_q: torch.Tensor):
        (scaled_noise,) = ctx.saved_tensors
        grad_locs, grad_log_scales = [], []
        for index in range(ctx.num_rows):
            grad_loc, grad_row_log_q = row(grad_value, ctx.dim, index), row(grad_log_q, ctx.batch_dim, index)
            grad_locs.append(grad_loc)
            grad_log_scales.append(torch.addcmul(-grad_row_log_q.reshape(grad_row_log_q.shape + (1,) * ctx.event_dims),
                                                 grad_loc, row(scaled_noise, ctx.dim, index)))
        return None, None, *grad_locs, *grad_log_scales


class DrawnRows(TorchDistribution):
    """``Normal(loc_k, exp(s_k))`` of K rows given as separate tensors (a guide's tasks, or one
    unstacked row), stacked along ``dim``: drawn and scored by :class:`DrawRows`. At any value
    other than its own draw the log-density is :class:`SummedNormal`'s, on the stacked rows.

    Args:
        locs, log_scales: K tensors each, of one row's shape.
        dim: the rows' dim in a value (negative, left of the event dims); None: one row, unstacked.
        event_dims: the rightmost dims that form one event.
    """

    arg_constraints: dict = {}
    has_rsample = True

    def __init__(self, locs: Sequence[torch.Tensor], log_scales: Sequence[torch.Tensor], dim: int | None,
                 event_dims: int):
        self.locs, self.log_scales, self.dim = list(locs), list(log_scales), dim
        shape = stacked_shape(self.locs[0].shape, dim, len(self.locs))
        split = len(shape) - event_dims
        super().__init__(shape[:split], shape[split:], validate_args=False)
        self._draw: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def support(self):
        return constraints.independent(constraints.real, len(self.event_shape))

    def expand(self, batch_shape, _instance=None):
        if torch.Size(batch_shape) == self.batch_shape:
            return self
        return self.stacked().expand(batch_shape)

    def stacked(self) -> SummedNormal:
        """The same distribution with its rows stacked (one more copy of them)."""
        def stack(rows):
            return rows[0] if self.dim is None else torch.stack(rows, self.dim)
        return normal(stack(self.locs), stack(self.log_scales).exp(), len(self.event_shape))

    @property
    def mean(self) -> torch.Tensor:
        return self.stacked().mean

    @property
    def variance(self) -> torch.Tensor:
        return self.stacked().variance

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        if sample_shape:
            return self.stacked().rsample(sample_shape)
        value, log_q = DrawRows.apply(self.dim, len(self.event_shape), *self.locs, *self.log_scales)
        self._draw = None if log_q is None else (value, log_q)
        return value

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._draw is not None and value is self._draw[0]:
            return self._draw[1]
        return self.stacked().log_prob(value)
