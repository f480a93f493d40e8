"""``bora-pyro predict`` and ``bora-pyro generate`` end to end on a tiny fitted run."""

import json

import pyro
import pytest
import torch

from bora_pyro import cli_predict, load_run
from bora_pyro.cli import main
from bora_pyro.cli_predict import SEPARATOR
from bora_pyro.data import Batch
from bora_pyro.generation import generate
from bora_pyro.predictive import global_factors, guide_draws, new_task_factors, predictive_perplexity
from bora_pyro.run import load_corpus
from conftest import fit_synthetic_run, synthetic_records

ENTRY_KEYS = {"mean", "median", "ci", "bma", "plugin", "tokens"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dirs):
    return fit_synthetic_run(tmp_path_factory.mktemp("predict") / "run", tiny_model_dirs["gpt2"],
                             "--guide", "mean-field", "--init-scale", "0.05")


def cli_json(args, capsys):
    assert main(args) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def recorded_factors(monkeypatch):
    """The ``factors`` each ``bora-pyro generate`` call hands to the real ``generate``."""
    calls = []

    def recording(lm, tokenizer, factors, *args, **kwargs):
        calls.append(factors)
        return generate(lm, tokenizer, factors, *args, **kwargs)

    monkeypatch.setattr(cli_predict, "generate", recording)
    return calls


def same_factors(left, right):
    return set(left) == set(right) and all(
        torch.equal(left[name][0], right[name][0]) and torch.equal(left[name][1], right[name][1]) for name in left)


def test_predict_prints_intervals_bma_and_plugin_per_task(run_dir, capsys):
    report = cli_json(["predict", str(run_dir), "--samples", "5", "--seed", "1", "--shrinkage"], capsys)
    assert set(report["perplexity"]) == ENTRY_KEYS and set(report["tasks"]) == {"task0", "task1", "task2"}
    evaluated = cli_json(["evaluate", str(run_dir)], capsys)
    assert report["perplexity"]["plugin"] == pytest.approx(evaluated["perplexity"], rel=1e-6)
    for name, entry in report["tasks"].items():
        assert set(entry) == ENTRY_KEYS and entry["tokens"] == evaluated["tasks"][name]["tokens"]
    run = load_run(run_dir)  # the library on the same run, split and seed
    corpus = load_corpus(run.config, run.tokenizer)
    pyro.set_rng_seed(1)
    expected = predictive_perplexity(run.model, run.guide, corpus, "test", num_samples=5)
    assert set(expected["tasks"]) == set(report["tasks"])
    for got, want in [(report["perplexity"], expected["perplexity"]),
                      *((report["tasks"][name], expected["tasks"][name]) for name in expected["tasks"])]:
        assert got["tokens"] == want["tokens"] and got["ci"] == pytest.approx(want["ci"], rel=1e-6)
        assert {k: got[k] for k in ("mean", "median", "bma", "plugin")} == pytest.approx(
            {k: want[k] for k in ("mean", "median", "bma", "plugin")}, rel=1e-6)
    assert set(report["shrinkage"]["task0"]) == {"distance", "relative_distance", "spread", "size"}
    again = cli_json(["predict", str(run_dir), "--samples", "5", "--seed", "1", "--shrinkage"], capsys)
    assert again == report  # seeded


def test_predict_scores_unseen_tasks_under_the_prior_predictive(run_dir, tmp_path, capsys):
    records = synthetic_records(num_tasks=4, docs_per_task=4, seed=2)
    for record in records:  # the file's own task order differs from the run's
        record["speaker"] = {"task3": "newcomer", "task0": "task2", "task2": "task0"}.get(record["speaker"],
                                                                                        record["speaker"])
    data = tmp_path / "more.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    report = cli_json(["predict", str(run_dir), "--samples", "3", "--data", str(data)], capsys)
    assert set(report["tasks"]) == {"task0", "task1", "task2"} and set(report["unseen"]["tasks"]) == {"newcomer"}
    assert report["unseen"]["perplexity"]["plugin"] is None and report["unseen"]["perplexity"]["tokens"] > 0
    seen_only = tmp_path / "seen.jsonl"
    seen_only.write_text("".join(json.dumps(r) + "\n" for r in records if r["speaker"] != "newcomer"))
    evaluated = cli_json(["evaluate", str(run_dir), "--data", str(seen_only)], capsys)
    for name, entry in evaluated["tasks"].items():  # each task's documents scored with its own adapter
        assert report["tasks"][name]["tokens"] == entry["tokens"]
        assert report["tasks"][name]["plugin"] == pytest.approx(entry["perplexity"], rel=1e-6)


def test_generate_defaults_to_the_posterior_mean(run_dir, capsys):
    from bora_pyro import load_run
    from bora_pyro.generation import generate

    args = ["generate", str(run_dir), "--task", "task1", "--prompt", "w8 w9", "--max-new-tokens", "6", "--json"]
    default, mean = cli_json(args, capsys), cli_json([*args, "--mean"], capsys)
    run = load_run(run_dir)
    factors = run.model.task_factors(run.guide.median())
    assert default == mean == generate(run.lm, run.tokenizer, factors, ["w8 w9"], [1], max_new_tokens=6)[0]


@pytest.mark.parametrize("flags, count", [
    ([], 1),
    (["--sample", "--do-sample", "--top-k", "5", "--num-return-sequences", "2"], 2),
    (["--num-beams", "3", "--num-return-sequences", "2"], 2),
])
def test_generate_prints_text(run_dir, capsys, flags, count):
    assert main(["generate", str(run_dir), "--task", "task1", "--prompt", "w8 w9", "--max-new-tokens", "5",
                 *flags]) == 0
    texts = capsys.readouterr().out.rstrip("\n").split(SEPARATOR)
    assert len(texts) == count and all(text.startswith("w8 w9") and len(text.split()) > 2 for text in texts)
    if "--do-sample" not in flags:  # greedy and beam search: exactly the library's texts
        run = load_run(run_dir)
        factors = run.model.task_factors(run.guide.median())
        kwargs = {"num_beams": 3, "num_return_sequences": 2} if "--num-beams" in flags else {}
        assert texts == generate(run.lm, run.tokenizer, factors, ["w8 w9"], [1], max_new_tokens=5, **kwargs)[0]


@pytest.mark.parametrize("which", [["--global"], ["--new-task", "--sample"]])
def test_generate_from_the_global_or_a_new_task(run_dir, capsys, which):
    texts = cli_json(["generate", str(run_dir), *which, "--prompt", "w1", "--max-new-tokens", "4", "--json"], capsys)
    assert len(texts) == 1 and texts[0].startswith("w1")


def test_generate_global_writes_with_theta_at_the_median(run_dir, capsys, recorded_factors):
    args = ["generate", str(run_dir), "--prompt", "w1", "--max-new-tokens", "4", "--json"]
    texts = cli_json([*args, "--global"], capsys)
    run = load_run(run_dir)
    theta = global_factors(run.model, run.guide.median())
    assert len(recorded_factors) == 1 and same_factors(recorded_factors[0], theta)
    assert texts == generate(run.lm, run.tokenizer, theta, ["w1"], [0], max_new_tokens=4)[0]
    cli_json([*args, "--task", "task1"], capsys)
    assert len(recorded_factors) == 2 and not same_factors(recorded_factors[1], theta)


def test_generate_new_task_sample_draws_a_new_adapter_per_seed(run_dir, capsys, recorded_factors):
    draws = []
    for seed in (0, 1, 2):
        cli_json(["generate", str(run_dir), "--new-task", "--sample", "--seed", str(seed), "--prompt", "w1",
                  "--max-new-tokens", "4", "--json"], capsys)
        run = load_run(run_dir)  # fresh, as the CLI's: same random numbers consumed from the seed on
        pyro.set_rng_seed(seed)
        values = next(guide_draws(run.guide, Batch.probe(device=run.lm.device), 1))
        draws.append(new_task_factors(run.model, values, 1))
        assert len(recorded_factors) == seed + 1 and same_factors(recorded_factors[seed], draws[seed])
    theta = global_factors(run.model, run.guide.median())
    for i, left in enumerate([*draws, theta]):
        for right in [*draws, theta][i + 1:]:
            assert not same_factors(left, right)


def test_prior_factors_follow_the_prior(gpt2_dir):
    """Draws of HierarchicalNormal(τ = 100, global scale 0.5) for 64 tasks: the tasks spread
    around their mean with sd τ^-1/2 = 0.1, the mean (≈ Θ) with sd 0.5."""
    from bora_pyro import MultiTaskLM
    from bora_pyro.models import BoRA, HierarchicalNormal
    from bora_pyro.predictive import flatten_factors, prior_factors

    lm = MultiTaskLM.from_pretrained(gpt2_dir, rank=2, alpha=4)
    model = BoRA(lm, HierarchicalNormal(tau=100.0, global_scale=0.5), num_tasks=64)
    draws = [flatten_factors(factors) for factors in prior_factors(model, 2)]  # [64, P] each
    for theta in draws:
        assert float((theta - theta.mean(0)).std()) == pytest.approx(0.1, rel=0.05)
        assert float(theta.mean(0).std()) == pytest.approx(0.5, rel=0.05)
    assert not torch.equal(draws[0], draws[1])


def test_generate_prior_sample_shows_what_a_prior_implies(gpt2_dir, capsys):
    """A prior pinned at 0 (Θ and θ_d within 1e-6 of it) writes the base model's text; a broad one
    does not; K draws give K texts."""
    base = ["generate", "--prior-sample", "3", "--model", gpt2_dir, "--prompt", "w1 w2", "--max-new-tokens", "6",
            "--json"]
    pinned = cli_json(base + ["--global-scale", "1e-6", "--tau", "1e12"], capsys)
    broad = cli_json(base + ["--global-scale", "1", "--tau", "1"], capsys)
    from bora_pyro import MultiTaskLM, load_tokenizer
    lm, tokenizer = MultiTaskLM.from_pretrained(gpt2_dir, rank=8), load_tokenizer(gpt2_dir)
    zero = {spec.name: (torch.zeros(1, spec.rank, spec.in_features), torch.zeros(1, spec.out_features, spec.rank))
            for spec in lm.modules_spec}
    base_text = generate(lm, tokenizer, zero, ["w1 w2"], [0], max_new_tokens=6)[0][0]
    assert pinned == [base_text] * 3
    assert len(broad) == 3 and base_text not in broad


def test_generate_prior_sample_refuses_mixed_or_missing_models(run_dir, gpt2_dir, capsys):
    for args, message in [
        (["--prior-sample", "--prompt", "w1"], "needs a RUN_DIR or --model BASE"),
        ([str(run_dir), "--task", "task0", "--prompt", "w1", "--tau", "3"], "--tau: these flags describe"),
        ([str(run_dir), "--prior-sample", "--model", gpt2_dir, "--prompt", "w1"], "--model: these flags describe"),
        (["--prior-sample", "--model", gpt2_dir, "--global-scale", "flat", "--prompt", "w1"], "flat prior"),
        (["--prior-sample", "0", "--model", gpt2_dir, "--prompt", "w1"], "number of draws ≥ 1"),
        (["--task", "task0", "--prompt", "w1"], "needs a RUN_DIR"),
        (["--prior-sample", "--model", gpt2_dir, "--prior", "independent", "--tau-prior", "gamma:2,1", "--prompt", "w1"],
         "--tau-prior learns the τ of the hierarchical prior"),
        (["--prior-sample", "--model", gpt2_dir, "--device", "gpu9", "--prompt", "w1"], "unknown device"),
    ]:
        assert main(["generate", *args]) == 2
        assert message in capsys.readouterr().err
