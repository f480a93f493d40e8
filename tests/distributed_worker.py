"""One process of a data-parallel test run, started by ``torchrun`` from ``test_distributed.py``.

    torchrun --nproc-per-node 2 tests/distributed_worker.py api MODEL_DIR OUT
        fits every guide of GUIDES on the corpus of ``parity_corpus`` and saves the guide's
        parameters and the history as ``OUT/<guide>-rank<r>.pt``.
    torchrun --nproc-per-node 2 tests/distributed_worker.py store MODEL_DIR OUT
        the same with every guide's tasks in a host-memory task store.
    torchrun --nproc-per-node 2 tests/distributed_worker.py flat MODEL_DIR OUT
        fits MAP under each flat prior of FLAT_PRIORS on global batches of one document (process 1
        never has a row) and saves ``OUT/<prior>-rank<r>.pt`` likewise.
    torchrun --nproc-per-node 2 tests/distributed_worker.py cli OUT [--stop-rank R] -- FIT_ARGS...
        runs ``bora-pyro fit FIT_ARGS`` and logs every file this rank creates to
        ``OUT/writes-rank<r>.txt``; with ``--stop-rank R`` rank R receives a SIGTERM at its first
        validation check, as a preempted process would.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from pathlib import Path

import torch

from bora_pyro import MultiTaskCorpus, MultiTaskLM, TaskStore, fit, load_tokenizer
from bora_pyro.guides import map_guide, mean_field_guide
from bora_pyro.models import BoRA, HierarchicalNormal, Independent, Joint

GUIDES = {"map": map_guide, "mean-field": mean_field_guide}
FLAT_PRIORS = {"joint": Joint(None), "independent": Independent(None)}
STEPS, BATCH_SIZE = 7, 7  # 29 training documents: 4 batches of 7 and one of 1 + 6 drawn at random


def parity_corpus(model_dir: str) -> MultiTaskCorpus:
    """4 tasks of unequal sizes, 29 training and 20 validation documents (2 evaluation batches)."""
    records = [(f"task{d}", " ".join(f"w{(3 * d + 5 * i + j) % 40}" for j in range(4 + i % 5)))
               for d, size in enumerate((6, 10, 14, 19)) for i in range(size)]
    return MultiTaskCorpus(records, load_tokenizer(model_dir), test_size=0.0, validation_size=0.4)


def fit_guide(model_dir: str, guide_name: str, prior=None, batch_size: int = BATCH_SIZE,
              task_store: bool = False) -> tuple[dict, list]:
    """The guide's parameters and the fit's history after ``STEPS`` steps (validation every 3);
    the prior ``HierarchicalNormal(10.0)`` unless given; ``task_store``: the tasks in a TaskStore."""
    corpus = parity_corpus(model_dir)
    lm = MultiTaskLM.from_pretrained(model_dir, rank=2, alpha=4)
    model = BoRA(lm, prior or HierarchicalNormal(10.0), corpus.num_tasks)
    guide = GUIDES[guide_name](model, task_store=TaskStore() if task_store else None)
    result = fit(model, guide, corpus, steps=STEPS, batch_size=batch_size, lr=0.05, eval_every=3, progress=False)
    return {k: v.detach().clone() for k, v in guide.state_dict().items()}, result.history


def log_writes(log: Path) -> None:
    """Append every file or folder the run module writes to ``log``."""
    import bora_pyro.run as run

    log.touch()
    for name in ("atomic_write", "make_dir"):
        original = getattr(run, name)

        def logged(path, *args, _original=original, **kwargs):
            with log.open("a") as file:
                file.write(f"{path}\n")
            return _original(path, *args, **kwargs)

        setattr(run, name, logged)


def stop_at_first_check() -> None:
    """SIGTERM this process when the fit first evaluates (it keeps going until its processes agree)."""
    fit_module = importlib.import_module("bora_pyro.fit")  # the package's ``fit`` is the function
    evaluate = fit_module.evaluate

    def evaluate_then_stop(*args, **kwargs):
        fit_module.evaluate = evaluate
        os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(*args, **kwargs)

    fit_module.evaluate = evaluate_then_stop


def main(argv: list[str]) -> int:
    rank = int(os.environ["RANK"])
    mode, *rest = argv
    if mode in ("api", "store", "flat"):
        from bora_pyro import distributed

        model_dir, out = rest
        distributed.init_from_env("cpu")
        fits = {name: (name, None, BATCH_SIZE) for name in GUIDES} if mode != "flat" else \
            {name: ("map", prior, 1) for name, prior in FLAT_PRIORS.items()}
        for name, settings in fits.items():
            state, history = fit_guide(model_dir, *settings, task_store=mode == "store")
            torch.save({"state": state, "history": history}, Path(out) / f"{name}-rank{rank}.pt")
        distributed.shutdown()
        return 0
    from bora_pyro.cli import main as cli_main

    out, *rest = rest
    split = rest.index("--")
    options, fit_args = rest[:split], rest[split + 1:]
    log_writes(Path(out) / f"writes-rank{rank}.txt")
    if options[:1] == ["--stop-rank"] and int(options[1]) == rank:
        stop_at_first_check()
    return cli_main(["fit", *fit_args])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
