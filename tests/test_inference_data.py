"""A fitted run as ArviZ InferenceData (bora_pyro.to_arviz): PSIS-LOO, WAIC and comparison work on it."""

import math
import warnings

import pyro
import pytest

import bora_pyro
from bora_pyro import evaluate, load_run
from bora_pyro.errors import ConfigError
from bora_pyro.run import load_corpus
from conftest import fit_synthetic_run

az = pytest.importorskip("arviz")  # in the test extra: skipped only outside it
SAMPLES = 12


def fitted(root, tiny_model_dirs, name: str, *flags: str):
    run = load_run(fit_synthetic_run(root / name, tiny_model_dirs["gpt2"], *flags, steps=16))
    return run, load_corpus(run.config, run.tokenizer)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dirs):
    root = tmp_path_factory.mktemp("arviz")
    return {"map": fitted(root, tiny_model_dirs, "map", "--tau", "10"),
            "learned": fitted(root, tiny_model_dirs, "learned", "--tau-prior", "lognormal:2,1", "--guide", "hybrid")}


def test_a_map_run_gives_its_per_document_log_likelihood_in_every_draw(runs):
    """AutoDelta's draws are all the MAP: every draw's log-likelihoods add up to evaluate's NLL."""
    run, corpus = runs["map"]
    data = bora_pyro.to_arviz(run, corpus, num_samples=3)
    log_likelihood = data.log_likelihood["documents"]
    assert log_likelihood.dims == ("chain", "draw", "document") and log_likelihood.shape[:2] == (1, 3)
    report = evaluate(run.model, run.guide, corpus, "test")
    for draw in range(3):
        total = float(log_likelihood.isel(chain=0, draw=draw).sum())
        assert math.exp(-total / report["tokens"]) == pytest.approx(report["perplexity"], rel=1e-5)
    test = corpus.documents("test")
    assert list(log_likelihood["task"].values) == [corpus.task_names[t] for t in test.task_ids]
    tokens = data.observed_data["documents"]
    assert tokens.shape == (len(test), max(map(len, test.documents)))
    assert tokens.values[0, :len(test.documents[0])].tolist() == test.documents[0]


def test_learned_tau_is_in_the_posterior_and_loo_waic_compare_run(runs):
    pyro.set_rng_seed(0)
    learned = bora_pyro.to_arviz(*runs["learned"], num_samples=SAMPLES)
    tau = learned.posterior["tau"]
    assert tau.shape == (1, SAMPLES) and float(tau.min()) > 0 and float(tau.std()) > 0
    distance = learned.posterior["task_distance"]
    assert distance.dims == ("chain", "draw", "task") and list(distance["task"].values) == ["task0", "task1", "task2"]
    map_data = bora_pyro.to_arviz(*runs["map"], num_samples=SAMPLES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few draws: ArviZ warns about k̂ and the WAIC variance
        loo = az.loo(learned, pointwise=True)
        assert math.isfinite(loo.elpd_loo) and loo.pareto_k.shape == (len(runs["learned"][1].documents("test")),)
        assert math.isfinite(az.waic(learned).elpd_waic)
        table = az.compare({"learned": learned, "map": map_data})
    assert set(table.index) == {"learned", "map"} and table["rank"].min() == 0
    assert table.loc["map", "elpd_loo"] == pytest.approx(float(map_data.log_likelihood["documents"][0, 0].sum()), rel=1e-6)


def test_no_draws_is_a_clear_error(runs):
    with pytest.raises(ConfigError, match="num_samples must be ≥ 1, got 0"):
        bora_pyro.to_arviz(*runs["map"], num_samples=0)


def test_one_pass_gives_the_calibration_of_predict_and_the_draws_log_likelihood(runs):
    """posterior_analysis scores each document once per draw: its calibration is predict's for the
    same seed, and the draws' total log-likelihood is minus the first draw's NLL × tokens."""
    from bora_pyro.inference_data import posterior_analysis
    from bora_pyro.predictive import predictive_calibration

    run, corpus = runs["learned"]
    test = corpus.documents("test")
    pyro.set_rng_seed(3)
    report, data = posterior_analysis(run, corpus, num_samples=4)
    pyro.set_rng_seed(3)
    assert predictive_calibration(run.model, run.guide, test, corpus.task_names, corpus.pad_token_id, 4) == report
    first = report["overall"]["draw"]
    total = float(data.log_likelihood["documents"].isel(chain=0, draw=0).sum())
    assert -total / first["tokens"] == pytest.approx(first["nll"], rel=1e-6)
    assert float(data.log_likelihood["documents"].std("draw").mean()) > 0
