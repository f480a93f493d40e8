"""Priors: each shipped prior's share of the model's log-joint equals its closed form; learned and
grouped τ, the three parametrisations, the guides' rules for latent τ, the CLI and the example."""

import json
import math
import textwrap
import os
import subprocess
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from bora_pyro import MultiTaskCorpus, MultiTaskLM, evaluate_base, fit, load_tokenizer
from bora_pyro.cli import main
from bora_pyro.data import Batch
from bora_pyro.errors import ConfigError
from bora_pyro.guides import hybrid_guide, map_guide, mean_field_guide, param_groups, quantiles
import bora_pyro.models.priors as priors_module
from bora_pyro.models import (
    BoRA, HierarchicalNormal, HierarchicalStudentT, Independent, Joint, hyperparameter_sites, parse_hyperprior,
)
from bora_pyro.run import load_checkpoint, load_run
from conftest import per_module_values, synthetic_records

ROOT = Path(__file__).resolve().parents[1]
LOG_2PI = math.log(2 * math.pi)


def normal_lp(x, loc, scale):
    """Σ log Normal(x; loc, scale), written out."""
    scale = torch.as_tensor(scale)
    return (-0.5 * ((x - loc) / scale) ** 2 - torch.log(scale) - 0.5 * LOG_2PI).sum()


def gamma_lp(x, shape, rate):
    return shape * math.log(rate) + (shape - 1) * torch.log(x) - rate * x - math.lgamma(shape)


def lognormal_lp(x, loc, scale):
    return normal_lp(torch.log(x), loc, scale) - torch.log(x)


def student_t_lp(x, df, loc, scale):
    z = (x - loc) / scale
    return (math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi) - torch.log(torch.as_tensor(scale))
            - (df + 1) / 2 * torch.log1p(z**2 / df)).sum()


@pytest.fixture
def setup(gpt2_dir):
    """A tiny GPT-2 with two adapted modules (c_attn of layers 0 and 1), 3 tasks and a batch."""
    lm = MultiTaskLM.from_pretrained(gpt2_dir, rank=2, alpha=4, target_modules=["c_attn"])
    records = synthetic_records(num_tasks=3, docs_per_task=6)
    corpus = MultiTaskCorpus([(r["speaker"], r["line"]) for r in records], load_tokenizer(gpt2_dir), test_size=0.5)
    return lm, corpus, corpus.train.collate([0, 4, 7], corpus.pad_token_id)


def site_values(lm, prior, taus):
    """Random values of every latent site of ``prior``, with the τ sites set to ``taus``."""
    model = BoRA(lm, prior, 3)
    trace = poutine.trace(poutine.condition(prior, taus)).get_trace(lm.modules_spec, model.tasks_plate())
    values = {name: site["value"] + 0.3 * torch.randn_like(site["value"])
              for name, site in trace.iter_stochastic_nodes() if name != "tasks"}
    return values | taus


def g(values, module, factor):
    return values[f"global.{module}.lora_{factor}"]


def t(values, module, factor, suffix=""):
    return values[f"task.{module}.lora_{factor}{suffix}"]


def hierarchical_gamma(values, modules):
    """τ ~ Gamma(2, 0.5), Θ ~ Normal(0, 0.5), θ_d ~ Normal(Θ, τ^{-1/2})."""
    tau = values["tau"]
    return gamma_lp(tau, 2.0, 0.5) + sum(
        normal_lp(g(values, m, f), 0.0, 0.5) + normal_lp(t(values, m, f), g(values, m, f), tau**-0.5)
        for m in modules for f in "AB")


def per_module_offsets(values, modules):
    """τ_m ~ LogNormal(1, 0.5) per module, Θ ~ Normal(0, 1), δ_d ~ Normal(0, τ_m^{-1/2})."""
    return sum(lognormal_lp(values[f"tau.{m}"], 1.0, 0.5) for m in modules) + sum(
        normal_lp(g(values, m, f), 0.0, 1.0) + normal_lp(t(values, m, f, "_offset"), 0.0, values[f"tau.{m}"] ** -0.5)
        for m in modules for f in "AB")


def per_factor_decentered(values, modules):
    """τ_A = 4 fixed, τ_B ~ Gamma(3, 1); flat Θ (0); z ~ Normal(0, 1)."""
    return gamma_lp(values["tau.B"], 3.0, 1.0) + sum(
        normal_lp(t(values, m, f, "_decentered"), 0.0, 1.0) for m in modules for f in "AB")


def student_t(values, modules):
    """Θ ~ Normal(0, 1), θ_d ~ StudentT(4, Θ, 3^{-1/2})."""
    return sum(normal_lp(g(values, m, f), 0.0, 1.0) + student_t_lp(t(values, m, f), 4.0, g(values, m, f), 3.0**-0.5)
               for m in modules for f in "AB")


def shared_A(values, modules):
    """A shared (τ_A = ∞), B with a learned τ_B ~ LogNormal(0, 1) and centred tasks."""
    tau = values["tau.B"]
    return lognormal_lp(tau, 0.0, 1.0) + sum(
        normal_lp(g(values, m, "A"), 0.0, 1.0) + normal_lp(g(values, m, "B"), 0.0, 1.0)
        + normal_lp(t(values, m, "B"), g(values, m, "B"), tau**-0.5) for m in modules)


def independent(values, modules):
    return sum(normal_lp(t(values, m, f), 0.0, 0.7) for m in modules for f in "AB")


def joint(values, modules):
    return sum(normal_lp(g(values, m, f), 0.0, 0.3) for m in modules for f in "AB")


CASES = {
    "learned tau": (lambda: HierarchicalNormal(dist.Gamma(2.0, 0.5), global_scale=0.5, centered=True), {"tau": 3.0},
                    hierarchical_gamma),
    "per-module tau, offsets": (
        lambda: HierarchicalNormal(dist.LogNormal(1.0, 0.5), tau_per="module", centered=False),
        {"tau.transformer.h.0.attn.c_attn": 2.0, "tau.transformer.h.1.attn.c_attn": 5.0}, per_module_offsets),
    "per-factor tau, LocScaleReparam": (
        lambda: HierarchicalNormal({"A": 4.0, "B": dist.Gamma(3.0, 1.0)}, global_scale=None, centered=0.0,
                                   tau_per="factor"), {"tau.B": 2.5}, per_factor_decentered),
    "student-t": (lambda: HierarchicalStudentT(3.0, df=4.0, centered=True), {}, student_t),
    "shared A": (lambda: HierarchicalNormal({"A": math.inf, "B": dist.LogNormal(0.0, 1.0)}, tau_per="factor",
                                         centered=True),
                 {"tau.B": 0.5}, shared_A),
    "independent": (lambda: Independent(0.7), {}, independent),
    "joint": (lambda: Joint(0.3), {}, joint),
}


@pytest.mark.parametrize("case", CASES)
def test_prior_share_of_log_joint_equals_closed_form(setup, case):
    lm, corpus, batch = setup
    make_prior, taus, closed_form = CASES[case]
    model = BoRA(lm, make_prior(), corpus.num_tasks)
    values = site_values(lm, make_prior(), {name: torch.tensor(tau) for name, tau in taus.items()})
    trace = poutine.trace(poutine.condition(model, values)).get_trace(batch)
    prior_share = trace.log_prob_sum(lambda name, site: name != "log_likelihood")
    expected = closed_form(per_module_values(values, lm.modules_spec), [spec.name for spec in lm.modules_spec])
    torch.testing.assert_close(prior_share.detach(), expected.detach(), rtol=1e-5, atol=1e-3)


def test_task_factors_of_each_parametrisation(setup):
    """θ_d = Θ + δ_d for offsets, Θ + τ^{-1/2}·z for LocScaleReparam(0), Θ for a shared factor."""
    lm, corpus, _ = setup
    spec = lm.modules_spec[0].name
    for prior, taus, theta in [
        (HierarchicalNormal(4.0, centered=False), {}, lambda v: g(v, spec, "A") + t(v, spec, "A", "_offset")),
        (HierarchicalNormal(dist.Gamma(2.0, 1.0), centered=0.0), {"tau": torch.tensor(0.25)},
         lambda v: g(v, spec, "A") + v["tau"] ** -0.5 * t(v, spec, "A", "_decentered")),
        (HierarchicalNormal({"A": math.inf, "B": 2.0}, tau_per="factor"), {},
         lambda v: g(v, spec, "A").expand(3, -1, -1)),
    ]:
        values = site_values(lm, prior, taus)
        torch.testing.assert_close(BoRA(lm, prior, 3).task_factors(values)[spec][0],
                                   theta(per_module_values(values, lm.modules_spec)))


def test_tau_groups_name_their_sites(setup):
    lm, _, _ = setup
    tasks = pyro.plate("tasks", 3)
    layers = ["tau.transformer.h.0", "tau.transformer.h.1"]
    modules = [f"tau.{spec.name}" for spec in lm.modules_spec]
    for per, expected in [("all", ["tau"]), ("layer", layers), ("module", modules), ("factor", ["tau.A", "tau.B"]),
                          ("module-factor", [f"{m}.{f}" for m in modules for f in "AB"])]:
        prior = HierarchicalNormal(dist.Gamma(2.0, 0.02), tau_per=per)
        assert hyperparameter_sites(prior, lm.modules_spec, tasks) == expected, per
    by_function = HierarchicalNormal(dist.Gamma(2.0, 0.02), tau_per=lambda module, factor: "qkv")
    assert hyperparameter_sites(by_function, lm.modules_spec, tasks) == ["tau.qkv"]
    assert hyperparameter_sites(HierarchicalNormal(10.0, centered=0.0), lm.modules_spec, tasks) == []


@pytest.mark.parametrize("bad, match", [
    (lambda: HierarchicalNormal(-1.0), "tau must be a positive"),
    (lambda: HierarchicalNormal(dist.Normal(0.0, 1.0)), "distribution on \\(0, ∞\\)"),
    (lambda: HierarchicalNormal(dist.Gamma(torch.ones(2), 1.0)), "scalar distribution"),
    (lambda: HierarchicalNormal(1.0, tau_per="head"), "unknown tau grouping"),
    (lambda: HierarchicalNormal({"A": 1.0}), "needs a grouping"),
    (lambda: HierarchicalNormal(1.0, centered=2.0), "centered must be"),
    (lambda: HierarchicalStudentT(1.0, df=0.0), "df must be"),
    (lambda: parse_hyperprior("gamma:2"), "gamma:SHAPE,RATE"),
    (lambda: parse_hyperprior("beta:1,1"), "gamma:SHAPE,RATE"),
])
def test_bad_priors_are_refused(bad, match):
    with pytest.raises(ConfigError, match=match):
        bad()


def test_missing_group_and_hyperprior_spec(setup):
    lm, _, _ = setup
    with pytest.raises(ConfigError, match="no value for the group 'B'"):
        HierarchicalNormal({"A": 1.0}, tau_per="factor")(lm.modules_spec, pyro.plate("tasks", 3))
    gamma, lognormal = parse_hyperprior("gamma:2,0.02"), parse_hyperprior("LogNormal: 4.6, 1.5")
    assert isinstance(gamma, dist.Gamma) and float(gamma.mean) == pytest.approx(100.0)
    assert isinstance(lognormal, dist.LogNormal) and float(lognormal.loc) == pytest.approx(4.6)
    assert repr(HierarchicalNormal(gamma, tau_per="module")) == (
        "HierarchicalNormal(tau=Gamma(concentration=2, rate=0.02), global_scale=1.0, centered=0.0, tau_per='module')")  # a learned τ: decentred


def test_map_guide_refuses_a_latent_tau(setup):
    lm, _, _ = setup
    with pytest.raises(ConfigError, match="map_guide cannot fit the latent tau .*use hybrid_guide"):
        map_guide(BoRA(lm, HierarchicalNormal(dist.Gamma(2.0, 0.02)), 3))
    map_guide(BoRA(lm, HierarchicalNormal(100.0, centered=0.0), 3))  # a fixed τ is fine


@pytest.mark.parametrize("centered", [True, False, 0.0])
@pytest.mark.parametrize("make_guide", [hybrid_guide, mean_field_guide])
def test_guides_with_a_learned_tau_start_like_lora_and_train(setup, make_guide, centered):
    lm, corpus, batch = setup
    model = BoRA(lm, HierarchicalNormal(dist.LogNormal(math.log(50.0), 0.1), centered=centered), 3)
    guide = make_guide(model)
    guide(batch)
    values = guide.median()
    factors = model.task_factors(values)
    spec = lm.modules_spec[0]
    glob_A = per_module_values(values, lm.modules_spec)[f"global.{spec.name}.lora_A"]
    assert glob_A.std() > 0 and torch.equal(factors[spec.name][0], glob_A.expand(3, *spec.shape_A))
    assert not factors[spec.name][1].any()
    assert 40 < float(values["tau"]) < 60  # starts at the hyperprior's median
    if make_guide is hybrid_guide:  # Θ a point, tasks and τ mean-field
        assert set(guide[0].median()) == {"global.lora"}
        assert "tau" in guide[1].median()
    names = {id(parameter): name for name, parameter in guide.named_parameters()}
    locations, log_scales = (group["params"] for group in param_groups(guide, 0.05, 0.1))
    assert all("lora" in names[id(p)] and "scales" not in names[id(p)] for p in locations)  # Θ's and the tasks' locs
    assert all("scales" in names[id(p)] or "tau" in names[id(p)] for p in log_scales)
    assert {"tau_unconstrained", "task_log_scales"} <= {part for p in log_scales for part in names[id(p)].split(".")}
    assert len(locations) + len(log_scales) == len(names)
    optimizer = torch.optim.Adam(param_groups(guide, 0.05, 0.1))
    for _ in range(3):
        loss = pyro.infer.Trace_ELBO().differentiable_loss(model, guide, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss)
    bounds = quantiles(guide, [0.05, 0.5, 0.95])  # Θ a point under the hybrid guide: all three equal
    assert bounds["tau"][0] < bounds["tau"][1] < bounds["tau"][2] and set(bounds) == set(guide.median())
    glob = bounds["global.lora"]
    assert torch.equal(glob[0], glob[2]) == (make_guide is hybrid_guide)


@pytest.mark.parametrize("make_guide, centered", [(hybrid_guide, True), (mean_field_guide, False)])
def test_learned_tau_finds_the_precision_of_simulated_task_factors(setup, make_guide, centered):
    """Task factors simulated around Θ at a known τ = 400 and held fixed (the guide's locations,
    with tiny scales): SVI on τ's own parameters under the prior's terms alone moves τ from the
    hyperprior's median 50 to within 15 % of 400 (the 1536 simulated entries pin it to ~4 %).
    Under ``LocScaleReparam(0)`` the sampled z do not depend on τ: there only the likelihood informs it."""
    lm, corpus, _ = setup
    true_tau = 400.0
    model = BoRA(lm, HierarchicalNormal(dist.LogNormal(math.log(50.0), 2.0), centered=centered), corpus.num_tasks)
    guide = make_guide(model)
    batch = Batch.probe()  # no task sizes: the whole tasks plate, every step
    guide(batch)
    task_part = guide[1] if make_guide is hybrid_guide else guide
    key, start = ("task/lora", guide.median()["global.lora"]) if centered else ("task/lora_offset", 0.0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for loc, log_scale in zip(task_part.task_locs[key].rows, task_part.task_log_scales[key].rows, strict=True):
            loc.copy_(start + true_tau**-0.5 * torch.randn(loc.shape, generator=generator))
            log_scale.fill_(math.log(1e-4))
    optimizer = torch.optim.Adam([p for name, p in guide.named_parameters() if "tau" in name], lr=0.1)
    prior_terms = poutine.block(model, hide=["log_likelihood"])
    for _ in range(100):
        loss = pyro.infer.Trace_ELBO().differentiable_loss(prior_terms, guide, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(guide.median()["tau"]) == pytest.approx(true_tau, rel=0.15)


def contract_example() -> dict:
    """The example prior of the contract in ``bora_pyro.models.priors``' docstring, run as written."""
    doc = priors_module.__doc__
    block = doc[doc.index("with a learned τ::") + len("with a learned τ::"):doc.index("Shipped priors:")]
    namespace = {"pyro": pyro, "dist": dist, "torch": torch}
    exec(textwrap.dedent(block).split("model = BoRA(")[0], namespace)  # the definition, not its use
    return namespace


def test_the_contracts_example_prior_fits(gpt2_dir, synthetic_jsonl):
    corpus = MultiTaskCorpus.from_file(synthetic_jsonl, load_tokenizer(gpt2_dir), task_field="speaker",
                                       text_field="line", max_length=32, validation_size=0.2)
    shared_b_prior = contract_example()["shared_b_prior"]
    model = BoRA(MultiTaskLM.from_pretrained(gpt2_dir, rank=2, alpha=4), shared_b_prior, corpus.num_tasks)
    with pytest.raises(ConfigError, match="latent tau"):
        map_guide(model)
    guide = hybrid_guide(model)
    result = fit(model, guide, corpus, steps=6, batch_size=8, lr=0.05, eval_every=3, progress=False)
    assert result.history[-1]["validation_perplexity"] < evaluate_base(model.lm, corpus, "validation")["perplexity"]
    assert "tau" in guide.median() and "global.transformer.h.0.attn.c_attn.lora_B" in guide[0].median()


@pytest.mark.parametrize("log_scale_lr", [None, 0.05])
def test_fit_gives_tau_its_own_learning_rate(gpt2_dir, synthetic_jsonl, log_scale_lr):
    """Adam moves a parameter by about its lr per step: log τ moves ≤ 6 × 1e-3 in 6 steps at the
    factors' lr, and by more than 6 × 0.05 / 2 at its own."""
    corpus = MultiTaskCorpus.from_file(synthetic_jsonl, load_tokenizer(gpt2_dir), task_field="speaker",
                                       text_field="line", max_length=32, validation_size=0.0)
    model = BoRA(MultiTaskLM.from_pretrained(gpt2_dir, rank=2, alpha=4),
                 HierarchicalNormal(dist.LogNormal(math.log(50.0), 2.0), centered=0.0), corpus.num_tasks)
    guide = hybrid_guide(model)
    guide(corpus.train.collate([0], corpus.pad_token_id))
    start = float(guide.median()["tau"])
    fit(model, guide, corpus, steps=6, batch_size=8, lr=1e-3, log_scale_lr=log_scale_lr, progress=False)
    moved = abs(math.log(float(guide.median()["tau"]) / start))
    assert moved < 6e-3 + 1e-6 if log_scale_lr is None else moved > 0.06


def fit_args(model_dir, data, out, *extra) -> list[str]:
    return ["fit", "--model", str(model_dir), "--data", str(data), "--task-field", "speaker", "--text-field", "line",
            "--rank", "2", "--steps", "4", "--batch-size", "8", "--lr", "0.05", "--max-length", "32",
            "--out", str(out), "--quiet", *extra]


def test_cli_learns_tau_and_load_run_rebuilds_it(gpt2_dir, synthetic_jsonl, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(fit_args(gpt2_dir, synthetic_jsonl, run_dir, "--tau-prior", "lognormal:4.6,1.5", "--tau-per", "factor",
                         "--decentered", "--guide", "hybrid", "--log-scale-lr", "0.2")) == 0
    test_perplexity = json.loads(capsys.readouterr().out)["test_perplexity"]
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["tau_prior"], config["tau_per"], config["centered"], config["guide"], config["log_scale_lr"]) == (
        "lognormal:4.6,1.5", "factor", 0.0, "hybrid", 0.2)
    assert [group["lr"] for group in load_checkpoint(run_dir).optimizer["param_groups"]] == [0.05, 0.2]
    run = load_run(run_dir)
    assert isinstance(run.model.prior.tau, dist.LogNormal) and type(run.model.prior.centered) is float
    assert {"tau.A", "tau.B"} <= set(run.guide.median())
    assert main(["evaluate", str(run_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] == pytest.approx(test_perplexity, rel=1e-6)


@pytest.mark.parametrize("extra, message", [
    (["--tau-prior", "gamma:2,0.02", "--guide", "map"], "--guide map cannot learn τ"),
    (["--tau-prior", "gamma:2", "--guide", "hybrid"], "gamma:SHAPE,RATE"),
    (["--tau-prior", "gamma:2,0.02", "--prior", "joint", "--guide", "hybrid"], "--prior hierarchical"),
    (["--tau-prior", "gamma:2,0.02", "--lr-per-tau", "1e-5", "--guide", "hybrid"], "but the run learns τ (--tau-prior); give --lr"),
    (["--tau-prior", "gamma:2,0.02", "--guide", "hybrid", "--log-scale-lr", "0"], "--log-scale-lr 0.05"),
])
def test_cli_refuses_bad_learned_tau_settings(gpt2_dir, synthetic_jsonl, tmp_path, capsys, extra, message):
    args = fit_args(gpt2_dir, synthetic_jsonl, tmp_path / "run", *extra)
    if "--lr-per-tau" in extra:
        args.remove("--lr"), args.remove("0.05")
    assert main(args) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1, error
    assert not (tmp_path / "run").exists()


def test_custom_prior_example_quick(tmp_path):
    # one thread: fastest for a tiny model, and not slowed tenfold by a busy CI machine (≈10 s)
    completed = subprocess.run([sys.executable, str(ROOT / "examples" / "custom_prior.py"), "--quick",
                                "--work-dir", str(tmp_path)], check=True, timeout=120, cwd=ROOT,
                               capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    lines = completed.stdout.splitlines()
    assert any(line.startswith("per-task test perplexity") for line in lines), completed.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"base", "hierarchical", "clustered"}
    base = results["base"]["tasks"]
    for fitted in ("hierarchical", "clustered"):  # both fits beat the base model on every task
        assert results[fitted]["tasks"].keys() == base.keys() and len(base) == 6
        assert all(ppl < base[task] for task, ppl in results[fitted]["tasks"].items()), results[fitted]
    assert results["clustered"]["perplexity"] < results["hierarchical"]["perplexity"] < results["base"]["perplexity"]
    # the clusters help the two small tasks (5 training documents) most (measured: 14 % and 29 %, the others ≤ 7 %)
    gain = {task: 1 - results["clustered"]["tasks"][task] / ppl for task, ppl in results["hierarchical"]["tasks"].items()}
    assert min(gain["north-c"], gain["south-c"]) > max(g for task, g in gain.items() if not task.endswith("-c")), gain
