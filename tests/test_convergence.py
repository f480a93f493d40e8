"""When a fit has converged: the ELBO's trend within its noise, how a fit stops, and what it says."""

import json
import random

import pytest

from bora_pyro import MultiTaskCorpus, MultiTaskLM, fit, load_tokenizer
from bora_pyro.cli import main
from bora_pyro.convergence import cap_warning, elbo_trend
from bora_pyro.errors import ConvergenceWarning
from bora_pyro.guides import map_guide
from bora_pyro.models import BoRA, HierarchicalNormal
from conftest import synthetic_records


def noisy_line(slope: float, steps: int = 200, noise: float = 1.0, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [-100 + slope * t + rng.gauss(0, noise) for t in range(steps)]


def test_a_flat_noisy_elbo_is_converged_and_a_rising_one_is_not():
    flat = elbo_trend(noisy_line(0.0), window=200)
    assert flat.converged and not flat.rising
    assert flat.noise_sd == pytest.approx(1.0, rel=0.15)
    assert abs(flat.slope_per_100_steps) < 0.5
    # a rise of 0.05 per step is 10 noise sds over the window: not converged
    rising = elbo_trend(noisy_line(0.05), window=200)
    assert rising.rising and not rising.converged
    assert rising.slope_per_100_steps == pytest.approx(5.0, rel=0.1)
    assert rising.final == pytest.approx(-100 + 0.05 * 199, abs=0.5)


def test_a_window_not_yet_full_is_never_converged():
    assert not elbo_trend(noisy_line(0.0, steps=150), window=200).converged
    assert elbo_trend(noisy_line(0.0, steps=5), window=200) is None


def test_the_cap_warning_names_what_still_improves():
    rising = elbo_trend(noisy_line(0.05), window=200)
    assert "validation" in cap_warning(250, None, validation_best_at_end=True)
    assert "ELBO still rose" in cap_warning(250, rising, validation_best_at_end=False)
    assert cap_warning(250, elbo_trend(noisy_line(0.0), window=200), validation_best_at_end=False) is None


@pytest.fixture(scope="module")
def corpus(gpt2_dir):
    records = synthetic_records(num_tasks=3, docs_per_task=40)
    return MultiTaskCorpus([(r["speaker"], r["line"]) for r in records], load_tokenizer(gpt2_dir),
                           test_size=0.25, validation_size=0.1)


def map_fit(gpt2_dir, corpus, **settings):
    lm = MultiTaskLM.from_pretrained(gpt2_dir, rank=4, alpha=8)
    model = BoRA(lm, HierarchicalNormal(10.0), corpus.num_tasks)
    return fit(model, map_guide(model), corpus, batch_size=8, progress=False, **settings)


def test_without_validation_a_fit_stops_when_its_elbo_is_flat(gpt2_dir):
    """At lr 0.05 the tiny model's ELBO flattens within a few hundred steps: without a validation
    split the fit stops there, far from its cap of 3000, by the ELBO."""
    records = synthetic_records(num_tasks=3, docs_per_task=40)
    no_validation = MultiTaskCorpus([(r["speaker"], r["line"]) for r in records], load_tokenizer(gpt2_dir),
                                    test_size=0.25, validation_size=0.0)
    result = map_fit(gpt2_dir, no_validation, steps=3000, lr=5e-2, eval_every=20, elbo_window=100)
    assert result.stopped_by == "elbo"
    assert result.steps < 1000
    assert result.elbo_trend.converged and not result.still_improving
    assert len(result.elbos) == result.steps


def test_with_validation_the_noisy_elbo_does_not_stop_the_fit(gpt2_dir, corpus):
    """Validation decides when there is one: the same fit runs until patience runs out."""
    result = map_fit(gpt2_dir, corpus, steps=3000, lr=5e-2, eval_every=20, patience=2, elbo_window=100)
    assert result.stopped_by == "patience"
    assert [entry["step"] for entry in result.history][-1] - result.best_step == 2 * 20


def test_a_fit_stopped_by_its_cap_while_improving_warns_once(gpt2_dir, corpus):
    with pytest.warns(ConvergenceWarning, match="step cap \\(30 steps\\) while still improving") as caught:
        result = map_fit(gpt2_dir, corpus, steps=30, lr=1e-2, eval_every=10)
    assert len(caught) == 1
    assert result.stopped_by == "cap" and result.still_improving
    assert result.elbo_trend.rising


def test_the_cli_records_how_the_fit_stopped(gpt2_dir, synthetic_jsonl, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["fit", "--model", gpt2_dir, "--data", synthetic_jsonl, "--task-field", "speaker",
                 "--text-field", "line", "--steps", "20", "--lr", "1e-2", "--eval-every", "10", "--max-length", "32", "--out", str(out),
                 "--quiet"]) == 0
    assert "warning: the fit reached its step cap (20 steps) while still improving" in capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stopped_by"] == "cap" and metrics["still_improving"] is True
    assert len(metrics["elbos"]) == 20
    assert metrics["diagnostics"]["elbo"]["rising"] is True
