"""Posterior predictive checks: does each task's fitted adapter write documents like its held-out ones?

For every task take its first n held-out documents. A replicate of a document continues the
document's first ``prompt_tokens`` tokens (documents carry no BOS token a model could start
from, so the replicates are prompted with the data's own openings; the observed document keeps
the same opening), sampled token by token from the LM with the task's adapter of one posterior
draw, at temperature 1 without top-k or top-p (the model's own predictive), until EOS or
``max_length``. S draws give S replicated sets of the task's n documents.

Test statistics T of a set of documents (the mean over its documents of):

- ``length``: tokens, EOS included;
- ``type_token_ratio``: distinct words / words, words being the lower-cased runs of letters and
  digits (apostrophes within: "i'll") of the decoded text (documents without words are left out of the mean);
- ``top_words_share``: the share of its words among the task's own 50 most frequent training words;
- ``mean_log_prob``: mean log-probability per predicted token under the fitted model, i.e. the
  task's adapter at the guide's median (the plug-in).

Per task and statistic the posterior predictive p-value P(T(y_rep) ≥ T(y_obs) | data), estimated
from the S replicates with ties counted half (mid-p). A p-value near 0 or 1 says the model misses
that feature of the task's documents; under a model that fits, p-values spread over (0, 1).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence

import torch

from .data import Batch, DocumentSet, padding_token
from .errors import ConfigError, DataError
from .evaluate import Factors, document_log_probs
from .generation import task_adapters
from .predictive import posterior_factors

STATISTICS = ("length", "type_token_ratio", "top_words_share", "mean_log_prob")
TOP_WORDS = 50
WORD = re.compile(r"\w+(?:'\w+)*")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def top_words(texts: Sequence[str], k: int = TOP_WORDS) -> set[str]:
    """The ``k`` most frequent words of ``texts``."""
    return {word for word, _ in Counter(word for text in texts for word in words(text)).most_common(k)}


def p_value(observed: float, replicated: torch.Tensor) -> float | None:
    """Mid-p estimate of P(T_rep ≥ T_obs) from S replicated values [S], NaNs (sets without words)
    left out; None if there is no value to compare."""
    replicated = replicated[~replicated.isnan()]
    if math.isnan(observed) or len(replicated) == 0:
        return None
    return float(((replicated > observed).double() + 0.5 * (replicated == observed).double()).mean())


def document_statistics(documents: DocumentSet, decode: Callable[[list[int]], str], task_top_words: Sequence[set[str]],
                        log_probs: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every statistic of every document, [N] float64 each (NaN where a document has no words).

    Args:
        decode: token ids → text (special tokens skipped).
        task_top_words: per task id, its most frequent training words.
        log_probs, tokens: [N] each document's log-likelihood under the plug-in and its predicted tokens.
    """
    ratio, share = [], []
    for ids, task in zip(documents.documents, documents.task_ids):
        found = words(decode(ids))
        ratio.append(len(set(found)) / len(found) if found else float("nan"))
        share.append(sum(word in task_top_words[task] for word in found) / len(found) if found else float("nan"))
    return {"length": torch.tensor([len(ids) for ids in documents.documents], dtype=torch.float64),
            "type_token_ratio": torch.tensor(ratio, dtype=torch.float64),
            "top_words_share": torch.tensor(share, dtype=torch.float64),
            "mean_log_prob": log_probs.double() / tokens.clamp(min=1).double()}


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN: a statistic without words is null."""
    return None if math.isnan(value) else value


def task_means(values: torch.Tensor, task_ids: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """Mean of ``values`` [N] per task, NaNs left out: [num_tasks]."""
    present = ~values.isnan()
    sums = torch.zeros(num_tasks, dtype=torch.float64).index_add_(0, task_ids[present], values[present])
    counts = torch.zeros(num_tasks, dtype=torch.float64).index_add_(0, task_ids[present], torch.ones_like(values[present]))
    return sums / counts


@torch.no_grad()
def replicate(lm, factors: Factors, prompts: torch.Tensor, prompt_tasks: torch.Tensor, eos_token_id: int,
              pad_token_id: int, max_length: int, batch_size: int) -> list[list[int]]:
    """One sampled continuation of each prompt [M, k] with its task's adapter, up to and including
    its first EOS (or ``max_length`` tokens in all): M token lists, prompt included."""
    replicated = []
    for start in range(0, len(prompts), batch_size):
        rows = prompts[start:start + batch_size].to(lm.device)
        with task_adapters(lm, factors, prompt_tasks[start:start + batch_size].to(lm.device)):
            output = lm.model.generate(rows, attention_mask=torch.ones_like(rows), do_sample=True, temperature=1.0,
                                       top_k=0, top_p=1.0, max_new_tokens=max_length - rows.shape[1],
                                       eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        for row in output.tolist():
            new = row[prompts.shape[1]:]
            replicated.append(row[:prompts.shape[1]] + (new[:new.index(eos_token_id) + 1] if eos_token_id in new else new))
    return replicated


def task_texts(corpus, tokenizer, split: str = "train") -> list[list[str]]:
    """Per task of ``corpus``, the decoded texts of its documents in ``split``."""
    documents = corpus.documents(split)
    texts: list[list[str]] = [[] for _ in corpus.task_names]
    for ids, task in zip(documents.documents, documents.task_ids):
        texts[task].append(tokenizer.decode(ids, skip_special_tokens=True))
    return texts


def observed_documents(documents: DocumentSet, docs_per_task: int, prompt_tokens: int) -> DocumentSet:
    """The first ``docs_per_task`` documents of each task longer than the prompt."""
    taken: Counter = Counter()
    kept = []
    for n, (ids, task) in enumerate(zip(documents.documents, documents.task_ids)):
        if len(ids) > prompt_tokens and taken[task] < docs_per_task:
            taken[task] += 1
            kept.append(n)
    if not kept:
        raise DataError(f"no held-out document has more than --prompt-tokens {prompt_tokens} tokens: "
                        "lower --prompt-tokens or check the run's test split")
    return DocumentSet([documents.documents[n] for n in kept], [documents.task_ids[n] for n in kept])


def posterior_predictive_check(model, guide, tokenizer, documents: DocumentSet, train_texts: Sequence[Sequence[str]],
                               task_names: Sequence[str], max_length: int, num_samples: int = 20,
                               docs_per_task: int = 8, prompt_tokens: int = 2, batch_size: int = 16) -> dict:
    """Posterior predictive p-values of every statistic for every task (see the module's docstring).

    Args:
        documents: held-out documents; task ids index ``task_names``, the model's tasks.
        train_texts: per task, its training texts (for its most frequent words).
        max_length: tokens of a replicate at most, prompt and EOS included (the run's ``max_length``).

    Returns:
        ``{"tasks": {name: {stat: {"observed", "replicated_mean", "p_value", "replicated"}}},
        "samples", "docs_per_task", "prompt_tokens", "replicates"}``; ``replicated`` holds T of each
        of the S replicated sets. Seed with ``pyro.set_rng_seed``.
    """
    if num_samples < 1 or docs_per_task < 1 or prompt_tokens < 1:
        raise ConfigError(f"--samples, --docs-per-task and --prompt-tokens must be ≥ 1, got {num_samples}, "
                          f"{docs_per_task} and {prompt_tokens}")
    if prompt_tokens >= max_length:
        raise ConfigError(f"--prompt-tokens {prompt_tokens} leaves no room to write under the run's max_length "
                          f"{max_length}: use fewer")
    lm, num_tasks = model.lm, len(task_names)
    observed = observed_documents(documents, docs_per_task, prompt_tokens)
    task_ids = torch.as_tensor(observed.task_ids)
    prompts = torch.tensor([ids[:prompt_tokens] for ids in observed.documents])
    task_top_words = [top_words(texts) for texts in train_texts]
    plugin = model.task_factors(guide.median())
    pad = padding_token(tokenizer)

    def statistics(documents: DocumentSet) -> dict[str, torch.Tensor]:
        log_probs, tokens = document_log_probs(lm, plugin, documents, pad, batch_size)
        per_document = document_statistics(documents, lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                                           task_top_words, log_probs, tokens)
        return {name: task_means(values, task_ids, num_tasks) for name, values in per_document.items()}

    observed_values = statistics(observed)
    replicated_values: dict[str, list[torch.Tensor]] = {name: [] for name in STATISTICS}
    for factors in posterior_factors(model, guide, Batch.probe(device=lm.device), num_samples):
        copies = replicate(lm, factors, prompts, task_ids, tokenizer.eos_token_id, pad, max_length, batch_size)
        for name, values in statistics(DocumentSet(copies, observed.task_ids)).items():
            replicated_values[name].append(values)
    report = {}
    for d in sorted(set(observed.task_ids)):
        report[task_names[d]] = {}
        for name in STATISTICS:
            replicated = torch.stack(replicated_values[name])[:, d]  # [S]
            value = float(observed_values[name][d])
            report[task_names[d]][name] = {"observed": finite_or_none(value),
                                           "replicated_mean": finite_or_none(float(replicated.nanmean())),
                                           "p_value": p_value(value, replicated),
                                           "replicated": [finite_or_none(v) for v in replicated.tolist()]}
    return {"tasks": report, "samples": num_samples, "docs_per_task": docs_per_task, "prompt_tokens": prompt_tokens,
            "replicates": f"each continues the first {prompt_tokens} tokens of one of the task's held-out documents, "
                          "sampled at temperature 1 (no top-k/top-p) until EOS, one posterior draw per replicated set"}
