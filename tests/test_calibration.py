"""Calibration of next-token predictions (bora_pyro.calibration): cases with a known answer."""

import json

import pytest
import torch

from bora_pyro import MultiTaskLM
from bora_pyro.calibration import BINS, CalibrationSums, calibration, replayable
from bora_pyro.cli import main
from bora_pyro.data import DocumentSet
from bora_pyro.errors import ConfigError
from conftest import fit_synthetic_run

DOC_LENGTH = 20


def summary_of(probs: torch.Tensor, targets: torch.Tensor) -> dict:
    sums = CalibrationSums(1)
    sums.add(probs, probs.gather(-1, targets[:, None]).squeeze(-1).log(), targets, torch.zeros(1, len(targets), dtype=torch.long))
    return sums.summary(0)


def test_targets_drawn_from_the_prediction_are_calibrated_and_sharpening_it_is_not():
    """Tokens drawn from p itself: ECE ~ 0 (sampling noise). The same tokens scored by p sharpened
    (temperature 0.5, over-confident) or flattened (temperature 2): ECE, Brier and NLL all rise."""
    generator = torch.Generator().manual_seed(0)
    logits = 2.5 * torch.randn(40_000, 12, generator=generator)
    targets = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
    calibrated = summary_of(logits.softmax(-1), targets)
    sharp = summary_of((logits / 0.5).softmax(-1), targets)
    flat = summary_of((logits / 2).softmax(-1), targets)
    assert calibrated["ece"] < 0.01
    for miscalibrated in (sharp, flat):
        assert miscalibrated["ece"] > 0.05
        assert miscalibrated["brier"] > calibrated["brier"] + 0.01
        assert miscalibrated["nll"] > calibrated["nll"] + 0.02
    assert calibrated["tokens"] == 40_000 and 0 <= calibrated["brier"] <= 2


def test_brier_and_ece_reach_their_bounds():
    """A certain right answer: Brier 0, ECE 0. A certain wrong one: Brier 2, ECE 1."""
    probs = torch.eye(5)
    assert summary_of(probs, torch.arange(5)) | {"nll": None} == {"nll": None, "brier": 0, "ece": 0, "tokens": 5}
    wrong = summary_of(probs.clamp(min=1e-30), (torch.arange(5) + 1) % 5)
    assert wrong["brier"] == pytest.approx(2) and wrong["ece"] == pytest.approx(1)


@pytest.fixture(scope="module")
def lm(tiny_model_dirs):
    torch.manual_seed(0)
    return MultiTaskLM.from_pretrained(tiny_model_dirs["gpt2"], rank=2, alpha=4)


def random_factors(lm, num_tasks: int, scale: float, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {spec.name: (scale * torch.randn(num_tasks, spec.rank, spec.in_features, generator=generator),
                        scale * torch.randn(num_tasks, spec.out_features, spec.rank, generator=generator))
            for spec in lm.modules_spec}


@torch.no_grad()
def sampled_documents(lm, factors, docs_per_task: int, seed: int) -> DocumentSet:
    """Documents of 2 tasks written token by token by the LM with each task's adapter."""
    torch.manual_seed(seed)
    task_ids = torch.arange(2).repeat_interleave(docs_per_task)
    tokens = torch.randint(1, lm.model.config.vocab_size, (len(task_ids), 1))
    with lm.adapters(factors, task_ids):
        for _ in range(DOC_LENGTH - 1):
            logits = lm(tokens, torch.ones_like(tokens), use_cache=False).logits[:, -1]
            tokens = torch.cat([tokens, torch.multinomial(logits.softmax(-1), 1)], dim=1)
    return DocumentSet(tokens.tolist(), task_ids.tolist())


def fixed_draws(*draws):
    return lambda: iter(draws)


def test_a_model_is_calibrated_on_its_own_text_and_not_on_noise(lm):
    """Scored through the whole path (batches sorted by length, adapters per row, shifted
    targets): the plug-in that wrote the documents is calibrated on them; on uniform noise it is
    over-confident. A target off by one position would break the first."""
    factors = random_factors(lm, 2, 0.5, seed=1)
    own = sampled_documents(lm, factors, docs_per_task=150, seed=2)
    vocab = lm.model.config.vocab_size
    noise = DocumentSet(torch.randint(0, vocab, (300, DOC_LENGTH)).tolist(), own.task_ids)
    on_own = calibration(lm, factors, fixed_draws(factors), own, ["a", "b"], pad_token_id=0)
    on_noise = calibration(lm, factors, fixed_draws(factors), noise, ["a", "b"], pad_token_id=0)
    assert on_own["overall"]["plugin"]["tokens"] == 300 * (DOC_LENGTH - 1)
    assert on_own["overall"]["plugin"]["ece"] < 0.03
    for task in ("a", "b"):
        assert on_own["tasks"][task]["plugin"]["ece"] < 0.05
    assert on_noise["overall"]["plugin"]["ece"] > 0.1
    assert on_noise["overall"]["plugin"]["brier"] > on_own["overall"]["plugin"]["brier"] + 0.05
    diagram = on_own["reliability"]["plugin"]
    assert sum(diagram["count"]) == 300 * (DOC_LENGTH - 1) and len(diagram["count"]) <= BINS


def test_the_model_average_averages_probabilities_per_token(lm):
    """BMA of two draws = −mean log((p₁ + p₂)/2) of the true tokens, computed here on one padded
    batch; ``draw`` is the first draw; with the plug-in equal to it, the two agree exactly."""
    first, second = random_factors(lm, 2, 0.5, seed=3), random_factors(lm, 2, 0.5, seed=4)
    documents = sampled_documents(lm, first, docs_per_task=6, seed=5)
    documents = DocumentSet([doc[: 8 + n % 9] for n, doc in enumerate(documents.documents)], documents.task_ids)
    report = calibration(lm, first, fixed_draws(first, second), documents, ["a", "b"], pad_token_id=0, batch_size=5)
    batch = documents.collate(range(len(documents)), pad_token_id=0)
    mask = batch.attention_mask[:, 1:].bool()
    targets = batch.input_ids[:, 1:][mask]
    average = 0
    for factors in (first, second):
        with lm.adapters(factors, batch.task_ids), torch.no_grad():
            logits = lm(batch.input_ids, batch.attention_mask).logits[:, :-1][mask]
        average = average + logits.double().softmax(-1) / 2
    expected_nll = -average.gather(-1, targets[:, None]).log().mean()
    expected_brier = (average.square().sum(-1) - 2 * average.gather(-1, targets[:, None]).squeeze(-1) + 1).mean()
    assert report["overall"]["bma"]["nll"] == pytest.approx(float(expected_nll), rel=1e-5)
    assert report["overall"]["bma"]["brier"] == pytest.approx(float(expected_brier), rel=1e-5)
    assert report["overall"]["draw"] == report["overall"]["plugin"]
    assert report["overall"]["bma"]["nll"] != pytest.approx(report["overall"]["draw"]["nll"], rel=1e-3)


def test_replayable_draws_repeat_and_leave_the_global_rng_alone():
    draws = replayable(lambda: iter([torch.randn(3), torch.randn(3)]), torch.device("cpu"))
    torch.manual_seed(7)
    expected_next = torch.randn(1)
    torch.manual_seed(7)
    first, again = list(draws()), list(draws())
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert torch.equal(torch.randn(1), expected_next)


def test_no_draws_is_a_clear_error(lm):
    documents = DocumentSet([[1, 2, 3]], [0])
    with pytest.raises(ConfigError, match="at least one sample"):
        calibration(lm, None, fixed_draws(), documents, ["a"], pad_token_id=0)


def test_predict_prints_the_calibration_block(tmp_path, tiny_model_dirs, capsys):
    run = fit_synthetic_run(tmp_path / "run", tiny_model_dirs["gpt2"], "--guide", "mean-field", steps=8)
    capsys.readouterr()
    assert main(["predict", str(run), "--samples", "3"]) == 0
    block = json.loads(capsys.readouterr().out)["calibration"]
    assert set(block["tasks"]) == {"task0", "task1", "task2"}
    for entry in [block["overall"], *block["tasks"].values()]:
        assert set(entry) == {"plugin", "draw", "bma"}
        for estimate in entry.values():
            assert set(estimate) == {"nll", "brier", "ece", "tokens"}
            assert 0 <= estimate["ece"] <= 1 and 0 <= estimate["brier"] <= 2 and estimate["nll"] > 0
    assert block["overall"]["bma"]["tokens"] == sum(entry["bma"]["tokens"] for entry in block["tasks"].values())


def test_a_process_without_a_batch_contributes_zeros(lm, monkeypatch):
    """In a data-parallel run, rank 1 of 2 gets no batch of a 3-document split: it still returns
    the [S, N] log-likelihood (zeros) and empty sums for the collective sum, without an error."""
    from bora_pyro import calibration as module

    monkeypatch.setattr(module.distributed, "world", lambda: (1, 2))
    monkeypatch.setattr(module.distributed, "sum_over_ranks", lambda tensor: tensor)  # no process group here
    factors = random_factors(lm, 1, 0.5, seed=6)
    documents = DocumentSet([[1, 2, 3], [4, 5], [6, 7, 8, 9]], [0, 0, 0])
    scores = module.score(lm, factors, fixed_draws(factors, factors), documents, 1, pad_token_id=0, batch_size=16)
    assert scores.log_likelihood.shape == (2, 3) and not scores.log_likelihood.any()
    assert scores.report(["a"])["overall"]["bma"] == {"nll": None, "brier": None, "ece": None, "tokens": 0}
