"""A fitted run as ArviZ ``InferenceData``: PSIS-LOO, WAIC and model comparison across priors.

``arviz`` is an optional extra (``pip install 'bora-pyro[analysis]'``), imported when called.
Built for ArviZ 0.x's ``InferenceData`` (the release the package registries here offer); ArviZ
1.x reads it with ``arviz.from_netcdf`` after ``to_netcdf``, or converts it with ``.to_datatree()``.

The unit of data is a document: its log-likelihood under draw s is the sum of its tokens'
log-probabilities, log p(doc_n | θ_{task(n)}^(s)). On the documents of the fit (``split="train"``)
``az.loo`` estimates the expected log predictive density of a new document of a fitted task, and
its Pareto k̂ says per document whether importance sampling from the posterior draws can stand in
for refitting without it. On held-out documents (the default, ``split="test"``) the draws never
saw them, so the plain log predictive density, lppd = ``elpd_loo + p_loo``, is already
out-of-sample, and PSIS's leave-one-out reweighting lowers it by ``p_loo``; compare runs by either,
knowing which.
"""

from __future__ import annotations

import torch

from .errors import ConfigError
from .predictive import flatten_factors, global_factors, posterior_scores, replayable_guide_draws

#: Shared sites (outside the tasks plate) with at most this many entries go into ``posterior``
#: (τ and its per-module variants; not Θ, a whole adapter).
MAX_HYPER_ENTRIES = 64


def arviz():
    try:
        import arviz
    except ImportError:
        raise ConfigError("to_arviz needs ArviZ: pip install 'bora-pyro[analysis]'") from None
    return arviz


def to_arviz(run, corpus, split: str = "test", num_samples: int = 32, batch_size: int = 16):
    """``num_samples`` posterior draws of a run as ArviZ ``InferenceData`` (one chain).

    Args:
        run: a loaded run (:func:`~bora_pyro.load_run`): its model and guide.
        corpus: the run's corpus (:func:`~bora_pyro.run.load_corpus`), whose ``split`` is scored.

    Returns:
        ``InferenceData`` with groups

        - ``posterior``: every shared site of at most 64 entries (e.g. ``tau``) [chain, draw, …],
          ``task_norm`` = ‖θ_d‖ over all factors [chain, draw, task], and, when the prior has a
          global adapter, ``task_distance`` = ‖θ_d − Θ‖ [chain, draw, task];
        - ``log_likelihood``: ``documents`` [chain, draw, document], with the document's task as
          the coordinate ``task`` of the ``document`` dimension;
        - ``observed_data``: ``documents`` [document, position], the token ids, −1 after each end.

        Seed with ``pyro.set_rng_seed``.
    """
    return posterior_analysis(run, corpus, split, num_samples, batch_size)[1]


@torch.no_grad()
def posterior_analysis(run, corpus, split: str = "test", num_samples: int = 32, batch_size: int = 16):
    """The calibration report of :func:`~bora_pyro.predictive.predictive_calibration` and the
    ``InferenceData`` of :func:`to_arviz`, from one pass over the split (each document scored by
    each draw once, the draws replayed for each batch)."""
    az = arviz()
    if num_samples < 1:
        raise ConfigError(f"num_samples must be ≥ 1, got {num_samples}")
    documents = corpus.documents(split)
    if not documents:
        raise ConfigError(f"the {split} split is empty: nothing to compute a log-likelihood of; use another split")
    model, guide, task_names = run.model, run.guide, list(corpus.task_names)
    values = replayable_guide_draws(model, guide, num_samples)
    scores = posterior_scores(model, guide, values, documents, len(task_names), corpus.pad_token_id, batch_size)
    posterior: dict[str, list[torch.Tensor]] = {}
    for draw in values():
        for name in model.shared_site_names:
            if draw[name].numel() <= MAX_HYPER_ENTRIES:
                posterior.setdefault(name, []).append(draw[name].double().cpu())
        theta_tasks = flatten_factors(model.task_factors(draw))  # [D, P]
        posterior.setdefault("task_norm", []).append(theta_tasks.norm(dim=1).cpu())
        try:
            theta = flatten_factors(global_factors(model, draw))  # [1, P]
        except ConfigError:  # no Θ: no distances
            continue
        posterior.setdefault("task_distance", []).append((theta_tasks - theta).norm(dim=1).cpu())
    longest = max(len(ids) for ids in documents.documents)
    tokens = torch.full((len(documents), longest), -1, dtype=torch.long)
    for n, ids in enumerate(documents.documents):
        tokens[n, :len(ids)] = torch.tensor(ids)
    coords = {"task": task_names, "document": list(range(len(documents)))}
    data = az.from_dict(
        posterior={name: torch.stack(draws)[None].numpy() for name, draws in posterior.items()},
        log_likelihood={"documents": scores.log_likelihood[None].numpy()},
        coords=coords, dims={"task_norm": ["task"], "task_distance": ["task"], "documents": ["document"]},
    )
    # its own call: the observed documents have dims (document, position), their log-likelihood (document,)
    import xarray  # ArviZ's own dependency

    observed = xarray.Dataset({"documents": (("document", "position"), tokens.numpy())},
                              coords={"document": coords["document"]})
    data.add_groups(observed_data=observed)
    document_tasks = [task_names[t] for t in documents.task_ids]
    data.log_likelihood = data.log_likelihood.assign_coords(task=("document", document_tasks))
    return scores.report(task_names), data
