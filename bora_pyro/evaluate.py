"""Held-out perplexity per task under one set of adapters (the posterior mean or MAP).

Perplexity = exp(total NLL / number of predicted tokens), per task and over all tasks.

A guide whose tasks live in a task store (:mod:`bora_pyro.task_store`) is evaluated
:data:`~bora_pyro.task_store.TASKS_PER_PASS` tasks at a time: the device then holds the factors
of those tasks only, and the store is read once, not all D rows at once.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping

import torch

from . import distributed
from .allocator import reuse_large_blocks
from .data import DocumentSet
from .guides import only_tasks
from . import task_store

Factors = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def document_log_probs(
    lm, factors: Factors | None, documents: DocumentSet, pad_token_id: int, batch_size: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-likelihood [N] and predicted-token count [N] of every document of a split.

    ``factors`` are the [D, ...] factors of every task (``None``: the base model alone). In a
    data-parallel run every process must call it: each scores every ``world``-th batch, and the
    results are summed over the processes.
    """
    log_probs, tokens = torch.zeros(len(documents)), torch.zeros(len(documents), dtype=torch.long)
    by_length = sorted(range(len(documents)), key=lambda i: len(documents.documents[i]))  # little padding
    rank, num_ranks = distributed.world()
    with reuse_large_blocks(lm.device):  # the logits of a batch reuse the memory of the batch before
        for start in range(rank * batch_size, len(documents), num_ranks * batch_size):
            batch = documents.collate(by_length[start : start + batch_size], pad_token_id).to(lm.device)
            with contextlib.nullcontext() if factors is None else lm.adapters(factors, batch.task_ids):
                log_probs[batch.doc_ids.cpu()] = lm.sequence_log_prob(batch.input_ids, batch.attention_mask).float().cpu()
            tokens[batch.doc_ids.cpu()] = (batch.attention_mask.sum(-1) - 1).cpu()
    return distributed.sum_over_ranks(log_probs), distributed.sum_over_ranks(tokens)


def perplexity_report(
    log_probs: torch.Tensor, tokens: torch.Tensor, task_ids: list[int] | torch.Tensor, task_names: list[str]
) -> dict:
    """``{"perplexity", "nll", "tokens", "tasks": {name: {"perplexity", "tokens"}}}`` from per-document
    log-likelihoods [N], predicted-token counts [N] and task indices [N]. Tasks without documents
    in the split are left out."""
    task_ids = torch.as_tensor(task_ids)
    total_tokens = int(tokens.sum())
    total_nll = -float(log_probs.sum())
    report = {
        "perplexity": math.exp(total_nll / max(total_tokens, 1)),
        "nll": total_nll / max(total_tokens, 1),
        "tokens": total_tokens,
        "tasks": {},
    }
    for d, name in enumerate(task_names):
        mask = task_ids == d
        task_tokens = int(tokens[mask].sum())
        if task_tokens:
            report["tasks"][name] = {
                "perplexity": math.exp(-float(log_probs[mask].sum()) / task_tokens),
                "tokens": task_tokens,
            }
    return report


def evaluate_factors(lm, factors: Factors | None, corpus, split: str = "test", batch_size: int = 16) -> dict:
    """Per-task and overall perplexity of a split under ``factors`` ([D, ...] per module: document
    n uses row ``task_ids[n]``; None: the base model). See :func:`perplexity_report` for the keys."""
    documents = corpus.documents(split)
    log_probs, tokens = document_log_probs(lm, factors, documents, corpus.pad_token_id, batch_size)
    return perplexity_report(log_probs, tokens, documents.task_ids, corpus.task_names)


def evaluate(model, guide, corpus, split: str = "test", batch_size: int = 16) -> dict:
    """The report of :func:`evaluate_factors` under the guide's posterior median (= mean for
    AutoNormal, the MAP for AutoDelta); for a guide with a task store,
    :data:`~bora_pyro.task_store.TASKS_PER_PASS` tasks at a time."""
    store = task_store.guide_task_store(guide)
    if store is None or not store.sites:
        return evaluate_factors(model.lm, model.task_factors(guide.median()), corpus, split, batch_size)
    documents = corpus.documents(split)
    log_probs, tokens = torch.zeros(len(documents)), torch.zeros(len(documents), dtype=torch.long)
    for tasks, rows, part in document_passes(documents, model.num_tasks):
        with only_tasks(guide, tasks):
            factors = model.task_factors(guide.median(), tasks)
        log_probs[rows], tokens[rows] = document_log_probs(model.lm, factors, part, corpus.pad_token_id, batch_size)
    return perplexity_report(log_probs, tokens, documents.task_ids, corpus.task_names)


def document_passes(documents: DocumentSet, num_tasks: int) -> Iterator[tuple[range, list[int], DocumentSet]]:
    """The passes of :func:`~bora_pyro.task_store.task_passes` that have documents, in order (the
    same on every process of a data-parallel run): each pass's tasks, the indices of their
    documents in ``documents`` (in their order), and those documents with task t as t − the pass's
    first task (the row of the pass's factors)."""
    by_pass: dict[int, list[int]] = {}
    for n, task in enumerate(documents.task_ids):
        by_pass.setdefault(task // task_store.TASKS_PER_PASS, []).append(n)
    for number, tasks in enumerate(task_store.task_passes(num_tasks)):
        rows = by_pass.get(number)
        if rows:
            yield tasks, rows, DocumentSet([documents.documents[n] for n in rows],
                                           [documents.task_ids[n] - tasks.start for n in rows])


def evaluate_base(lm, corpus, split: str = "test", batch_size: int = 16) -> dict:
    """The same report for the frozen base model without adapters."""
    return evaluate_factors(lm, None, corpus, split, batch_size)
