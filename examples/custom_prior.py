"""A prior written outside the library: tasks grouped into known clusters, each with its own centre.

    python examples/custom_prior.py            # ≈3 min on 2 CPU cores
    python examples/custom_prior.py --quick    # < 1 min (CI)

Speakers from the same region, customers of the same product, languages of the same family:
when the tasks come in known groups, a three-level hierarchy lets a small task borrow mostly from
its own group,

    Θ ~ Normal(0, 1),   C_k ~ Normal(Θ, τ_c^{-1/2}),   θ_d ~ Normal(C_{k(d)}, τ^{-1/2}),

for every factor (LoRA A and B) of every adapted module. :class:`ClusteredNormal` below is the
whole prior: a callable ``prior(modules, tasks) -> {module: (A [D, r, in], B [D, out, r])}`` that
follows the contract in ``bora_pyro.models.priors``, with no edit to the library. Its cluster
offsets are sites named ``cluster.<module>.lora_A_offset`` (and ``_B``), so the guides start them
at 0 like the task offsets: the fit starts at the base model.

The script builds a tiny GPT-2 and a word-level tokenizer (saved with ``save_pretrained``, so the
real loading path runs), simulates 6 tasks in 2 clusters (two tasks with very few documents),
fits the paper's prior and the clustered one (same τ) by MAP with early stopping, and prints
per-task test perplexity: the clustered prior helps most the two small tasks.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from bora_pyro import MultiTaskCorpus, MultiTaskLM, evaluate, evaluate_base, fit, load_tokenizer
from bora_pyro.guides import map_guide
from bora_pyro.models import BoRA, HierarchicalNormal


class ClusteredNormal:
    """Θ → cluster centres C_k (precision ``tau_cluster``) → tasks θ_d (precision ``tau``).

    Non-centred: it samples offsets ``C_k − Θ`` and ``θ_d − C_k(d)`` (sites ending in ``_offset``
    start at 0), so a step on Θ moves every cluster and task at once.

    Args:
        cluster_of_task: the cluster index k(d) of every task d, in the corpus's task order.
    """

    def __init__(self, cluster_of_task: list[int], tau_cluster: float = 10.0, tau: float = 100.0):
        self.cluster_of_task, self.tau_cluster, self.tau = cluster_of_task, tau_cluster, tau

    def __call__(self, modules, tasks: pyro.plate) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        clusters = pyro.plate("clusters", max(self.cluster_of_task) + 1, device=tasks.device)
        # the clusters of the plate's tasks: in training the plate holds only the batch's tasks
        cluster = torch.tensor(self.cluster_of_task, device=tasks.device)[tasks.indices]
        factors = {}
        for module in modules:
            pair = []
            for factor, shape in (("lora_A", module.shape_A), ("lora_B", module.shape_B)):
                zeros = torch.zeros(shape, device=tasks.device)
                glob = pyro.sample(f"global.{module.name}.{factor}", dist.Normal(zeros, 1.0).to_event(2))
                with clusters:
                    centre = glob + pyro.sample(f"cluster.{module.name}.{factor}_offset",
                                                dist.Normal(zeros, self.tau_cluster**-0.5).to_event(2))
                with tasks:
                    pair.append(centre[cluster] + pyro.sample(f"task.{module.name}.{factor}_offset",
                                                              dist.Normal(zeros, self.tau**-0.5).to_event(2)))
            factors[module.name] = tuple(pair)
        return factors

    def __repr__(self) -> str:
        return f"ClusteredNormal(tau_cluster={self.tau_cluster:g}, tau={self.tau:g})"


WORDS = [f"w{i}" for i in range(40)]
CLUSTERS = {"north": WORDS[:20], "south": WORDS[20:]}


def simulate(docs: dict[str, int], seed: int = 0) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """(task, text) pairs: a task writes from its cluster's 20 words (60 %), its own 4 of them
    (30 %) or any word (10 %); ``docs`` gives each task's number of documents."""
    rng = random.Random(seed)
    records, cluster_of = [], {}
    for index, (task, count) in enumerate(docs.items()):
        cluster = list(CLUSTERS)[index % 2]
        cluster_of[task] = cluster
        words = CLUSTERS[cluster]
        own = rng.sample(words, 4)
        for _ in range(count):
            text = [rng.choice(own) if (u := rng.random()) < 0.3 else rng.choice(words) if u < 0.9 else rng.choice(WORDS)
                    for _ in range(rng.randint(8, 16))]
            records.append((task, " ".join(text)))
    return records, cluster_of


def tiny_base_model(folder: Path) -> Path:
    """A tiny random GPT-2 with a word-level tokenizer over WORDS, saved with ``save_pretrained``."""
    vocab = {token: i for i, token in enumerate(["<eos>", "<unk>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>").save_pretrained(folder)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(vocab), n_positions=32, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=0, initializer_range=0.2)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer documents and steps (< 1 min)")
    parser.add_argument("--work-dir", default=None, help="where the tiny model and results.json go (default: temp)")
    parser.add_argument("--steps", type=int, default=None, help="max SVI steps per fit (default 600, quick 100)")
    args = parser.parse_args(argv)
    steps = args.steps or (100 if args.quick else 600)
    scale = 1 if args.quick else 3
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="custom-prior-"))
    base = tiny_base_model(work_dir / "base")

    sizes = {"north-a": 150, "south-a": 150, "north-b": 50, "south-b": 50, "north-c": 8, "south-c": 8}
    records, cluster_of = simulate({task: n * scale for task, n in sizes.items()})
    corpus = MultiTaskCorpus(records, load_tokenizer(base), max_length=32, test_size=0.3, validation_size=0.2, seed=0)
    cluster_index = {name: k for k, name in enumerate(CLUSTERS)}
    priors = {
        "hierarchical": HierarchicalNormal(tau=100.0, centered=False),  # the same τ, no clusters
        "clustered": ClusteredNormal([cluster_index[cluster_of[task]] for task in corpus.task_names], 10.0, 100.0),
    }
    lm = MultiTaskLM.from_pretrained(base, rank=2, alpha=4, target_modules=["c_attn"])
    results = {"base": evaluate_base(lm, corpus, "test")}
    for name, prior in priors.items():
        model = BoRA(lm, prior, corpus.num_tasks)
        guide = map_guide(model)
        fit(model, guide, corpus, steps=steps, batch_size=16, lr=0.01, eval_every=20, patience=2 if args.quick else 4,
            seed=0, progress=False)  # early stopping on the validation split
        results[name] = evaluate(model, guide, corpus, "test")
        print(f"{prior!r}: test perplexity {results[name]['perplexity']:.2f}", flush=True)

    print("per-task test perplexity (train documents)")
    print(f"{'task':<10}{'docs':>6}" + "".join(f"{name:>14}" for name in results))
    for task in corpus.task_names:
        row = "".join(f"{results[name]['tasks'][task]['perplexity']:>14.2f}" for name in results)
        print(f"{task:<10}{corpus.counts()[task]['train_docs']:>6}{row}")
    summary = {name: {"perplexity": report["perplexity"],
                      "tasks": {task: value["perplexity"] for task, value in report["tasks"].items()}}
               for name, report in results.items()}
    (work_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"results: {work_dir / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
