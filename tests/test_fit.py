"""SVI on synthetic multi-task text where tasks really differ, and the CLI end to end."""

import json

import pytest
import torch

from bora_pyro import MultiTaskCorpus, MultiTaskLM, evaluate, evaluate_base, fit, load_tokenizer
from bora_pyro.cli import main
from bora_pyro.guides import map_guide, mean_field_guide
from bora_pyro.models import BoRA, HierarchicalNormal, Independent, Joint
from conftest import synthetic_records


@pytest.fixture(scope="module")
def corpus(gpt2_dir):
    records = synthetic_records(num_tasks=3, docs_per_task=40)
    return MultiTaskCorpus([(r["speaker"], r["line"]) for r in records], load_tokenizer(gpt2_dir),
                           test_size=0.25, validation_size=0.1)


def fitted(gpt2_dir, corpus, prior, make_guide=map_guide, steps=120, lr=5e-2, eval_every=40):
    lm = MultiTaskLM.from_pretrained(gpt2_dir, rank=4, alpha=8)
    model = BoRA(lm, prior, corpus.num_tasks)
    guide = make_guide(model)
    result = fit(model, guide, corpus, steps=steps, batch_size=8, lr=lr, eval_every=eval_every, progress=False)
    return model, guide, result


def flat_factors(model, guide) -> torch.Tensor:
    """Every task's factors, all modules and A, B concatenated: [D, P]."""
    factors = model.task_factors(guide.median())
    return torch.cat([t.flatten(1) for pair in factors.values() for t in pair], dim=1)


def distance_from_center(model, guide) -> float:
    """max_d ‖θ_d − mean_d θ_d‖ / ‖mean_d θ_d‖."""
    theta = flat_factors(model, guide)
    center = theta.mean(0)
    return float((theta - center).norm(dim=1).max() / center.norm())


@pytest.mark.parametrize("make_guide", [map_guide, mean_field_guide])
def test_fit_lowers_every_tasks_perplexity_below_the_base(gpt2_dir, corpus, make_guide):
    model, guide, result = fitted(gpt2_dir, corpus, HierarchicalNormal(10.0), make_guide)
    base = evaluate_base(model.lm, corpus)
    fitted_report = evaluate(model, guide, corpus)
    assert set(fitted_report["tasks"]) == set(corpus.task_names)
    for task, report in fitted_report["tasks"].items():
        assert report["perplexity"] < 0.8 * base["tasks"][task]["perplexity"], (task, report, base["tasks"][task])
    assert [entry["step"] for entry in result.history] == [40, 80, 120]
    assert all("validation_perplexity" in entry for entry in result.history)


def test_tau_pulls_tasks_together_and_independent_lets_them_diverge(gpt2_dir, corpus):
    """At τ = 1e6 every θ_d ends within 1 % of Θ (relative to ‖Θ‖); independent tasks end apart
    (the farthest > 20 % from their mean).

    The offsets θ_d − Θ are stiff at τ = 1e6: Adam at lr 0.05 first rattles them by about its step,
    and the rattle dies down as its second moments fill. It dies down more slowly under the batch's
    task weights w_d = (N/B)·c_d/N_d (here 0.375·c_d: 0 in a step without the task, which then does
    not move, up to 3) than with every task weighted 1 in every step: max_d ‖θ_d − Θ‖/‖Θ‖ measured
    after 40/80/120/240 steps, 0.028/0.004/0.003/0.0006 against 0.016/0.001/0.0004/0.0001 (the
    whole plate every step; the same with the whole training set as the batch). So the fit runs
    200 steps (0.0005) and keeps its last parameters (one validation check, at the end): the best
    of early checks, which ``fit`` would restore, can fall inside the rattle."""
    # offsets: Θ moves every task at once (a centred θ_d would move only in the steps that see its task)
    model, guide, _ = fitted(gpt2_dir, corpus, HierarchicalNormal(1e6, centered=False), steps=200, eval_every=200)
    theta, values = flat_factors(model, guide), guide.median()
    global_theta = values["global.lora"]  # packed in the same order as flat_factors: module by module, A then B
    tight = float((theta - global_theta).norm(dim=1).max() / global_theta.norm())
    free = distance_from_center(*fitted(gpt2_dir, corpus, Independent())[:2])
    assert tight < 0.01 and free > 0.2, (tight, free)


def test_joint_has_one_adapter(gpt2_dir, corpus):
    model, guide, _ = fitted(gpt2_dir, corpus, Joint(), steps=40)
    assert all(name.startswith("global.") for name in guide.median())
    theta = flat_factors(model, guide)
    assert theta.abs().sum() > 0 and all(torch.equal(theta[0], row) for row in theta)


def test_early_stopping_keeps_the_best_validation_parameters(gpt2_dir, corpus):
    model, guide, result = fitted(gpt2_dir, corpus, Independent(), steps=400, lr=0.2)
    best = min(result.history, key=lambda entry: entry["validation_perplexity"])
    assert result.best_step == best["step"]
    torch.testing.assert_close(
        torch.tensor(evaluate(model, guide, corpus, "validation")["perplexity"]),
        torch.tensor(best["validation_perplexity"]),
    )


def test_cli_fit_then_evaluate(gpt2_dir, synthetic_jsonl, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["fit", "--model", gpt2_dir, "--data", synthetic_jsonl, "--task-field", "speaker", "--text-field",
            "line", "--prior", "hierarchical", "--tau", "10", "--guide", "mean-field", "--rank", "2", "--alpha", "4",
            "--max-length", "32", "--test-size", "0.33", "--steps", "20", "--batch-size", "8", "--lr", "0.02",
            "--seed", "1", "--device", "cpu", "--out", str(run_dir), "--quiet"]
    assert main(args) == 0
    fit_output = json.loads(capsys.readouterr().out)
    assert {path.name for path in run_dir.iterdir()} == {"config.json", "guide.safetensors", "metrics.json",
                                                        "checkpoint.safetensors"}
    assert main(["evaluate", str(run_dir)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"perplexity", "tokens", "tasks"}
    assert set(report["tasks"]) == {"task0", "task1", "task2"}
    assert report["tokens"] == sum(task["tokens"] for task in report["tasks"].values())
    assert report["perplexity"] == pytest.approx(fit_output["test_perplexity"], rel=1e-6)
    assert main(["evaluate", str(run_dir), "--data", synthetic_jsonl]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] > report["tokens"]


def test_cli_error_is_one_line(tmp_path, capsys, gpt2_dir):
    code = main(["fit", "--model", gpt2_dir, "--data", str(tmp_path / "missing.jsonl"), "--steps", "1",
                 "--out", str(tmp_path / "run")])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and "does not exist" in error, error
