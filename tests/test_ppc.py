"""Posterior predictive checks (bora_pyro.ppc, ``bora-pyro ppc``): cases with a known answer."""

import json

import pytest
import torch

from bora_pyro import load_run
from bora_pyro.cli import main
from bora_pyro.data import DocumentSet
from bora_pyro.ppc import STATISTICS, p_value, posterior_predictive_check
from bora_pyro.run import load_corpus
from conftest import fit_synthetic_run

PROMPT_TOKENS, DOCS_PER_TASK = 2, 10


def test_p_values_are_uniform_under_the_model_and_extreme_under_a_misfit():
    """Observed and replicated values from one distribution: p-values spread uniformly over (0, 1).
    Observed values far above the replicates: p = P(T_rep ≥ T_obs) near 0; far below: near 1."""
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(400, 41, generator=generator)  # 400 checks, each 1 observed + 40 replicated
    p_values = torch.tensor([p_value(float(row[0]), row[1:]) for row in values])
    assert abs(float(p_values.mean()) - 0.5) < 0.05
    assert 0.07 < float((p_values < 0.1).double().mean()) < 0.13 and 0.07 < float((p_values > 0.9).double().mean()) < 0.13
    assert p_value(5.0, values[0, 1:]) == 0 and p_value(-5.0, values[0, 1:]) == 1
    assert p_value(1.0, torch.tensor([0.0, 1.0, 2.0, 3.0])) == pytest.approx((0.5 + 2) / 4)  # ties count half
    assert p_value(float("nan"), values[0]) is None and p_value(0.0, torch.tensor([float("nan")])) is None


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dirs):
    """A MAP fit (every posterior draw is the plug-in) of five synthetic tasks."""
    return fit_synthetic_run(tmp_path_factory.mktemp("ppc") / "run", tiny_model_dirs["gpt2"], "--test-size", "0.3",
                             num_tasks=5, docs_per_task=40, steps=30, max_length=24)


def check(run, documents: DocumentSet, samples: int = 40) -> dict:
    corpus = load_corpus(run.config, run.tokenizer)
    train = corpus.documents("train")
    texts = [[run.tokenizer.decode(ids) for ids, t in zip(train.documents, train.task_ids) if t == d]
             for d in range(corpus.num_tasks)]
    return posterior_predictive_check(run.model, run.guide, run.tokenizer, documents, texts, corpus.task_names,
                                      run.config.max_length, samples, DOCS_PER_TASK, PROMPT_TOKENS)


@torch.no_grad()
def sampled(run, prompts: torch.Tensor, task_ids: torch.Tensor) -> list[list[int]]:
    """Documents continuing ``prompts`` token by token under the MAP adapters until EOS (written
    here, not by the code under test)."""
    torch.manual_seed(1)
    eos, tokens = run.tokenizer.eos_token_id, prompts
    with run.lm.adapters(run.model.task_factors(run.guide.median()), task_ids):
        while tokens.shape[1] < run.config.max_length:
            logits = run.lm(tokens, torch.ones_like(tokens)).logits[:, -1]
            tokens = torch.cat([tokens, torch.multinomial(logits.softmax(-1), 1)], dim=1)
    documents = []
    for row in tokens.tolist():
        new = row[prompts.shape[1]:]
        documents.append(row[:prompts.shape[1]] + (new[:new.index(eos) + 1] if eos in new else new))
    return documents


def test_documents_written_by_the_model_itself_pass_and_truncated_ones_fail(run_dir):
    """Observed documents sampled from the fitted model (the MAP: the same model as every draw):
    its p-values spread over (0, 1). The same documents cut after their prompt: the length check
    fails (p near 1: every replicated set is longer), the others need not."""
    run = load_run(run_dir)
    held_out = load_corpus(run.config, run.tokenizer).documents("test")
    firsts = {}
    for n, task in enumerate(held_out.task_ids):
        firsts.setdefault(task, []).append(n)
    chosen = [n for task in sorted(firsts) for n in firsts[task][:DOCS_PER_TASK]]
    prompts = torch.tensor([held_out.documents[n][:PROMPT_TOKENS] for n in chosen])
    task_ids = [held_out.task_ids[n] for n in chosen]
    written = sampled(run, prompts, torch.tensor(task_ids))
    same_model = check(run, DocumentSet(written, task_ids))
    p_values = torch.tensor([entry[stat]["p_value"] for entry in same_model["tasks"].values() for stat in STATISTICS
                             if entry[stat]["p_value"] is not None])
    assert len(p_values) >= 15
    assert 0.3 < float(p_values.mean()) < 0.7
    assert float(((p_values < 0.05) | (p_values > 0.95)).double().mean()) <= 0.2

    truncated = DocumentSet([ids[:PROMPT_TOKENS] + [run.tokenizer.eos_token_id] for ids in written], task_ids)
    cut = check(run, truncated)
    assert all(entry["length"]["p_value"] >= 0.95 for entry in cut["tasks"].values())
    assert all(entry["length"]["observed"] == PROMPT_TOKENS + 1 for entry in cut["tasks"].values())


def test_ppc_command_writes_the_json_and_the_figure(run_dir, tmp_path, capsys):
    out = tmp_path / "ppc"
    assert main(["ppc", str(run_dir), "--samples", "4", "--docs-per-task", "3", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads((out / "ppc.json").read_text()) == printed
    assert (out / "ppc.png").stat().st_size > 10_000
    assert set(printed["tasks"]) == {f"task{d}" for d in range(5)}
    for entry in printed["tasks"].values():
        assert set(entry) == set(STATISTICS)
        for stat in entry.values():
            assert {"observed", "replicated_mean", "p_value"} <= set(stat) and len(stat["replicated"]) == 4
            assert 0 <= stat["p_value"] <= 1


def test_ppc_refuses_a_prompt_as_long_as_the_documents(run_dir, capsys):
    assert main(["ppc", str(run_dir), "--prompt-tokens", "24"]) == 2
    assert "--prompt-tokens 24 leaves no room" in capsys.readouterr().err
