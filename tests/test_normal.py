"""The fused Normals of ``models/normal.py`` against torch's ``Normal``: values and gradients."""

import pytest
import torch
from torch.distributions import Normal

from bora_pyro.models.normal import NOISE_CHUNK, DrawnRows, fill_standard_normal, normal


def leaf(*shape: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float64).requires_grad_()


def gradients(total: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(total, tensors))


@pytest.mark.parametrize("scale_kind", ["float", "learned", "per-entry"])
def test_summed_normal_is_torch_normal_summed(scale_kind):
    """A prior's task site: loc [P] broadcast over K tasks by the plate's expand, value [K, P]."""
    generator = torch.Generator().manual_seed(0)
    value, loc = leaf(3, 5, generator=generator), leaf(5, generator=generator)
    scale = {"float": 0.7, "learned": leaf(generator=generator).exp(),
             "per-entry": leaf(5, generator=generator).exp()}[scale_kind]
    inputs = [value, loc] + ([scale] if torch.is_tensor(scale) else [])
    weights = torch.randn(3, generator=generator, dtype=torch.float64)

    fused = normal(loc, scale, 1).expand([3]).log_prob(value)
    reference = Normal(loc, scale).log_prob(value).sum(-1)
    torch.testing.assert_close(fused, reference)
    torch.testing.assert_close(gradients((weights * fused).sum(), *inputs), gradients((weights * reference).sum(), *inputs))


def test_summed_normal_without_event_dims_keeps_the_batch():
    """event_dims = 0 (a per-task scalar): one log-density per entry, not their sum."""
    generator = torch.Generator().manual_seed(1)
    value, loc = leaf(4, generator=generator), leaf(4, generator=generator)
    torch.testing.assert_close(normal(loc, 0.5, 0).log_prob(value), Normal(loc, 0.5).log_prob(value))
    torch.testing.assert_close(normal(loc, torch.full((4,), 0.5, dtype=torch.float64), 0).log_prob(value),
                               Normal(loc, 0.5).log_prob(value))


@pytest.mark.parametrize("row_shape, dim, event_dims", [((2, 5), -3, 2), ((6,), -2, 1), ((), -1, 0), ((4, 3), None, 2)])
def test_drawn_rows_at_their_draw_are_the_normal_with_the_noise_held_fixed(row_shape, dim, event_dims):
    """z = loc + exp(s)·ε: log q(z) and the gradients of anything of (z, log q) are the formula's."""
    generator = torch.Generator().manual_seed(2)
    num_rows = 1 if dim is None else 3
    locs = [leaf(*row_shape, generator=generator) for _ in range(num_rows)]
    log_scales = [leaf(*row_shape, generator=generator) for _ in range(num_rows)]
    drawn = DrawnRows(locs, log_scales, dim, event_dims)
    value = drawn.rsample()
    log_q = drawn.log_prob(value)

    def stack(rows):
        return rows[0] if dim is None else torch.stack(rows, dim)

    loc, scale = stack(locs), stack(log_scales).exp()
    noise = ((value - loc) / scale).detach()
    reference_value = loc + scale * noise
    reference_log_q = Normal(loc, scale).log_prob(reference_value)
    reference_log_q = reference_log_q.sum(tuple(range(-event_dims, 0))) if event_dims else reference_log_q
    assert value.shape == reference_value.shape and log_q.shape == reference_log_q.shape == drawn.batch_shape
    torch.testing.assert_close(value, reference_value)
    torch.testing.assert_close(log_q, reference_log_q)
    value_weights = torch.randn(value.shape, generator=generator, dtype=torch.float64)
    log_q_weights = torch.randn(log_q.shape, generator=generator, dtype=torch.float64)

    def total(value, log_q):
        return (value_weights * value).sum() + (log_q_weights * log_q).sum()

    torch.testing.assert_close(gradients(total(value, log_q), *locs, *log_scales),
                               gradients(total(reference_value, reference_log_q), *locs, *log_scales))
    # at any other value the log-density is the formula's
    other = value.detach() + 0.1
    torch.testing.assert_close(drawn.log_prob(other), Normal(loc, scale).log_prob(other).sum(tuple(range(-event_dims, 0)))
                               if event_dims else Normal(loc, scale).log_prob(other))


def test_the_noise_does_not_depend_on_the_number_of_threads():
    threads = torch.get_num_threads()
    draws = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            torch.manual_seed(3)
            tensors = [torch.empty(1000), torch.empty(NOISE_CHUNK + 5), torch.empty(1000)]  # 4 chunks
            fill_standard_normal(tensors)
            draws.append(torch.cat(tensors))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(draws[0], draws[1])
    assert 0.99 < float(draws[0].std()) < 1.01 and not torch.equal(draws[0][:1000], draws[0][-1000:])


def test_a_draw_without_gradients_is_the_normal_and_is_scored_by_the_formula():
    """A posterior draw for prediction (no gradients): drawn in place, no log q kept."""
    generator = torch.Generator().manual_seed(4)
    locs = [torch.randn(20_000, generator=generator) for _ in range(2)]
    log_scales = [torch.full((20_000,), -1.0), torch.full((20_000,), 0.5)]
    drawn = DrawnRows(locs, log_scales, -2, 1)
    with torch.no_grad():
        value = drawn.rsample()
    noise = (value - torch.stack(locs)) / torch.stack(log_scales).exp()
    assert noise.mean().abs() < 0.02 and (noise.std(-1) - 1).abs().max() < 0.02
    torch.testing.assert_close(drawn.log_prob(value),
                               Normal(torch.stack(locs), torch.stack(log_scales).exp()).log_prob(value).sum(-1))
