"""Stochastic variational inference for a BoRA model: the training loop.

``fit`` minimises ``Trace_ELBO`` over the guide's parameters with a torch optimizer, on mixed-task
batches of the training split. With ``AutoDelta`` this is MAP (the paper); with ``AutoNormal`` it
is mean-field VI. Held-out log-likelihood on the validation split (posterior-median adapters) is
checked every ``eval_every`` steps and the best parameters are kept. A fit stops by its own
criterion (:mod:`bora_pyro.convergence`): validation has not improved for ``patience`` checks
(without a validation split: the ELBO is flat within its noise); the step count is a cap, and a fit the cap stops while it is
still improving says so (:class:`~bora_pyro.errors.ConvergenceWarning`).
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from tqdm.auto import tqdm

from . import distributed
from .allocator import reuse_large_blocks
from .data import Batch, MultiTaskCorpus
from .convergence import ElboTrend, cap_warning, default_window, elbo_trend
from .errors import CheckpointError, ConfigError, ConvergenceWarning, FitError, FitInterrupted
from .evaluate import evaluate
from .diagnostics import site_log_scales
from .guides import param_groups
from .task_store import TaskStore, guide_task_store, load_shared_state_dict, shared_state_dict


@dataclass
class FitResult:
    """What a fit did: ``history`` holds one dict per evaluation (step, ELBO, train and validation
    perplexity); ``best_step`` is the step whose parameters the guide holds at the end;
    ``stopped_by`` one of :data:`~bora_pyro.convergence.STOPPED_BY`; ``elbos`` every step's ELBO
    estimate and ``elbo_trend`` their trend at the end over the last ``elbo_window`` steps; ``still_improving``: the cap stopped a fit
    that was improving (see :func:`~bora_pyro.convergence.cap_warning`); ``start_log_scales``:
    the guide's log σ per site at the start (:func:`~bora_pyro.diagnostics.site_log_scales`; None
    for a site in a task store, which keeps its rows' start itself)."""

    steps: int
    best_step: int
    stopped_by: str = "cap"
    history: list[dict] = field(default_factory=list)
    elbos: list[float] = field(default_factory=list)
    elbo_trend: ElboTrend | None = None
    still_improving: bool = False
    elbo_window: int = 0
    start_log_scales: dict[str, torch.Tensor | None] = field(default_factory=dict)

    @property
    def stopped_early(self) -> bool:
        return self.stopped_by != "cap"


def paper_lr(tau: float, lr_at_tau_1: float = 1e-5) -> float:
    """The paper's learning rate for MAP at precision τ: ``lr ∝ τ`` (1e-5 at τ=1 … 1e-1 at τ=1e4)."""
    return lr_at_tau_1 * tau


class BatchStream:
    """Reshuffled passes over the training split, forever, that can be saved and resumed exactly.

    Its state is the epoch, the position within it and the shuffling generator's state at the
    epoch's start: restoring it replays the same epoch order and skips the batches already seen.
    """

    def __init__(self, corpus: MultiTaskCorpus, batch_size: int, seed: int):
        self.corpus, self.batch_size = corpus, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch, self.position = 0, 0
        self.epoch_start = self.generator.get_state()
        self.epoch_batches: list[Batch] | None = None

    def __next__(self) -> Batch:
        batch = self.peek()
        self.position += 1
        return batch

    def peek(self) -> Batch:
        """The batch that ``next`` returns, without taking it (a task store reads its tasks ahead).
        At an epoch's end it moves the stream to the next epoch's start, a state that replays
        the same batches."""
        if self.epoch_batches is None:
            self.generator.set_state(self.epoch_start)
            self.epoch_batches = list(self.corpus.train.batches(
                self.batch_size, self.corpus.pad_token_id, shuffle=True, generator=self.generator))
        if self.position == len(self.epoch_batches):  # the next epoch's first
            self.epoch, self.position = self.epoch + 1, 0
            self.epoch_start, self.epoch_batches = self.generator.get_state(), None
            return self.peek()
        return self.epoch_batches[self.position]

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "epoch_start": self.epoch_start.clone()}

    def restore(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self.epoch_start, self.epoch_batches = state["epoch_start"].clone(), None


#: Running sums of the steps since the last check: log-likelihood, predicted tokens, loss.
EMPTY_WINDOW = {"log_likelihood": 0.0, "tokens": 0, "loss": 0.0}


@dataclass
class TrainState:
    """Everything a fit needs to continue exactly where it stopped (written at every check).

    ``guide``/``best_guide``/``optimizer`` are state dicts; ``rng`` holds torch's, Python's and
    NumPy's generator states; ``batches`` the :class:`BatchStream` state; ``window`` the running
    sums since the last check (a checkpoint written on SIGINT/SIGTERM falls between checks);
    ``elbos`` every step's ELBO so far. With a task store, ``task_store`` is the fit's store when
    saving (its changed tasks are written as shards beside the checkpoint), and ``task_shards``
    (folder, [D] shard steps, [D] changed since the snapshot, whether a best snapshot exists) what
    a loaded checkpoint names.
    """

    step: int
    guide: dict
    optimizer: dict
    rng: dict
    batches: dict
    best_guide: dict | None
    best_nll: float
    best_step: int
    checks_without_gain: int
    history: list[dict]
    window: dict = field(default_factory=lambda: dict(EMPTY_WINDOW))
    elbos: list[float] = field(default_factory=list)
    task_store: TaskStore | None = None
    task_shards: tuple[Path, torch.Tensor, torch.Tensor, bool] | None = None


def window_steps(step: int, eval_every: int) -> int:
    """Steps since the last evaluation (the running averages' window)."""
    return (step - 1) % eval_every + 1


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every entry of every tensor is finite, read off their sums (nan and inf carry into a
    sum; one pass per tensor, where ``isfinite().all()`` takes three; one device sync). A sum can
    also overflow, which only gradients beyond ~1e31 per entry would do: they are reported too."""
    sums = [t.detach().sum() for t in tensors]
    return bool(torch.stack(sums).isfinite().all()) if sums else True


def not_finite(what: str, step: int, lr: float, checkpoint_step: int | None) -> FitError:
    saved = f"the last checkpoint is of step {checkpoint_step}" if checkpoint_step else "no checkpoint was written yet"
    return FitError(f"the {what} became nan or inf at step {step} (the guide keeps the parameters of step {step - 1}; "
                    f"{saved}): lower the learning rate (e.g. lr={lr / 10:g})", step, checkpoint_step, what)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def deferred_stop() -> Iterator[Callable[[], bool]]:
    """Within the block, a first SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption, ``torchrun``
    passing on a Ctrl-C) only sets the flag the yielded function reads, so the fit can finish its
    step and checkpoint it; the same signal a second time interrupts at once. Outside the main
    thread signals cannot be caught, and they keep their usual effect."""
    received: list[int] = []

    def handler(signum, frame):
        if signum in received:
            raise KeyboardInterrupt
        received.append(signum)

    try:
        previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    except ValueError:  # not the main thread
        yield lambda: False
        return
    try:
        yield lambda: bool(received)
    finally:
        for signum, handler_before in previous.items():
            signal.signal(signum, handler_before if handler_before is not None else signal.SIG_DFL)


def check_fit_settings(steps: int | None, epochs: float | None, batch_size: int, lr: float,
                       log_scale_lr: float | None = None) -> None:
    """Refuse a training length, batch size or learning rate that cannot work (before any loading)."""
    if (steps is None) == (epochs is None):
        raise ConfigError("give exactly one of --steps and --epochs")
    if steps is not None and steps < 1:
        raise ConfigError(f"--steps must be ≥ 1, got {steps}")
    if epochs is not None and not (math.isfinite(epochs) and epochs > 0):
        raise ConfigError(f"--epochs must be a positive number, got {epochs}")
    if batch_size < 1:
        raise ConfigError(f"the batch size must be ≥ 1, got {batch_size}; e.g. --batch-size 8")
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"the learning rate must be a positive number, got {lr}; e.g. --lr 1e-3")
    if log_scale_lr is not None and not (math.isfinite(log_scale_lr) and log_scale_lr > 0):
        raise ConfigError(f"the log-scale learning rate must be a positive number, got {log_scale_lr}; "
                          "e.g. --log-scale-lr 0.05")


class NotFinite(Exception):
    """The loss or its gradient of a step stopped being finite (``what``: ``"loss"``/``"gradient"``)."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


@dataclass
class StepReport:
    """What one step saw, over the global batch (summed over the processes of a data-parallel fit):
    the loss, the batch's log-likelihood and predicted tokens; ``interrupted``: whether any
    process was asked to stop."""

    loss: float
    log_likelihood: float
    tokens: int
    interrupted: bool = False


class SVIStep:
    """One SVI step on a batch: ``Trace_ELBO`` loss, backward, optimizer step.

    Only the guide parameters the batch reaches get a gradient (the batch's tasks, see
    :mod:`bora_pyro.guides.taskwise`); the optimizer skips the rest. In a data-parallel fit
    (:mod:`bora_pyro.distributed`) the batch is this process's shard: the gradients are averaged
    over the processes before the update, and every process takes the same decisions (a
    non-finite loss anywhere stops them all).

    Raises:
        NotFinite: the loss or a gradient is nan or inf (on any process); the parameters are left unchanged.
    """

    def __init__(self, model, guide, optimizer: torch.optim.Optimizer, autocast=contextlib.nullcontext(),
                 task_store: TaskStore | None = None):
        self.model, self.guide, self.optimizer, self.autocast = model, guide, optimizer, autocast
        self.task_store = task_store
        self.elbo = Trace_ELBO()
        self.parameters = [p for group in optimizer.param_groups for p in group["params"]]
        self.validated = False

    def __call__(self, batch: Batch, interrupted: bool = False) -> StepReport:
        """Take the step; ``interrupted``: this process was asked to stop (reported to all)."""
        try:
            return self.step(batch, interrupted)
        finally:
            if self.task_store is not None:
                self.task_store.discard()  # a failed step leaves the stored rows as they were

    def step(self, batch: Batch, interrupted: bool) -> StepReport:
        # Pyro validates the first step's distributions and values (a prior's shape or support
        # error shows there); every later step skips it: it walks each [K, P] site once more
        validation = contextlib.nullcontext() if not self.validated else pyro.validation_enabled(False)
        model = poutine.trace(self.model)
        loss = None
        try:
            with self.autocast, validation:
                loss = self.elbo.differentiable_loss(model, self.guide, batch)
        except ValueError as error:  # Pyro's validation of a distribution fed nan
            if "invalid values" not in str(error):
                raise
        log_likelihood = model.trace.nodes["_RETURN"]["value"].detach() if loss is not None else None
        num_ranks = distributed.world()[1]
        # one collective: whether every process's loss is finite, the global batch's figures, the stop flag
        report = distributed.sum_over_ranks(torch.tensor([
            1.0 if loss is None else float(~torch.isfinite(loss.detach())),
            0.0 if loss is None else float(loss.detach()) / num_ranks,
            0.0 if log_likelihood is None else float(log_likelihood.sum()),
            float(batch.num_predicted_tokens),
            float(interrupted),
        ], dtype=torch.float64)).tolist()
        if report[0] > 0:
            raise NotFinite("loss")
        self.optimizer.zero_grad(set_to_none=True)
        if loss.requires_grad:  # not when a process's share is empty and the prior flat: no term at all
            loss.backward()
        parameters = self.parameters + (self.task_store.leaves() if self.task_store is not None else [])
        distributed.average_gradients(parameters)
        if not all_finite(p.grad for p in parameters if p.grad is not None):
            raise NotFinite("gradient")
        if self.task_store is None:
            self.optimizer.step()
        else:
            self.task_store.attach(self.optimizer)
            try:
                self.optimizer.step()
            finally:
                self.task_store.detach(self.optimizer)
        self.validated = True
        return StepReport(report[1], report[2], int(report[3]), report[4] > 0)


def optimizer_groups(guide, lr: float, log_scale_lr: float | None, weight_decay: float) -> list[dict]:
    """The guide's trainable parameters as torch optimizer groups: one group at ``lr`` when every
    parameter is treated alike; else the factors' locations at ``lr`` with ``weight_decay`` and
    the rest (variational log σ, a latent τ's parameters; :func:`~bora_pyro.guides.param_groups`)
    at ``log_scale_lr`` (default ``lr``) without it: decay would pull log σ and log τ toward 0,
    i.e. σ and τ toward 1, whatever the data say."""
    if log_scale_lr is None and not weight_decay:
        return [{"params": [p for p in guide.parameters() if p.requires_grad], "lr": lr}]
    locations, rest = param_groups(guide, lr, lr if log_scale_lr is None else log_scale_lr)
    return [locations | {"weight_decay": weight_decay}, rest | {"weight_decay": 0.0}]


def make_optimizer(name: str, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """Adam or AdamW over ``groups`` (each with its own ``lr`` and ``weight_decay``); torch's fused
    kernel where every parameter is a float tensor on the CPU or a GPU (one pass over a parameter
    instead of several: 4× faster on the CPU)."""
    if name not in ("adam", "adamw"):
        raise ConfigError(f"unknown optimizer {name!r}: use 'adam' or 'adamw'")
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for group in groups for p in group["params"])
    optimizer = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return optimizer(groups, lr=lr, weight_decay=0.0, fused=fused or None)


def fit(
    model,
    guide,
    corpus: MultiTaskCorpus,
    *,
    steps: int | None = None,
    epochs: float | None = None,
    batch_size: int = 8,
    lr: float = 1e-3,
    log_scale_lr: float | None = 0.05,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    eval_every: int | None = None,
    patience: int | None = 3,
    elbo_window: int | None = None,
    seed: int = 0,
    bf16: bool = False,
    progress: bool = True,
    on_checkpoint: Callable[[TrainState], None] | None = None,
    resume: TrainState | None = None,
) -> FitResult:
    """Fit ``guide`` to ``model`` by SVI on ``corpus.train``.

    Args:
        steps / epochs: training length; give exactly one (epochs may be fractional).
        batch_size: documents per step, from mixed tasks.
        lr, optimizer: torch optimizer (``"adam"`` or ``"adamw"``) settings. (The paper scales lr
            with τ for MAP, :func:`paper_lr`; Adam's step size does not depend on the gradient's
            scale, so that only reproduces the paper's recipe.)
        weight_decay: decay of the factors' locations toward 0 (AdamW's decoupled decay; Adam's L2
            penalty), never of the variational scales or of hyperparameters. A task's
            factors get a gradient, and so an update and a decay, only in the steps whose batch
            holds the task (lazy updates), so a task decays in proportion to its share of the
            data: large tasks shrink toward 0 more than small ones, unlike the prior's shrinkage
            toward Θ. The prior (τ, ``global_scale``) is the regulariser meant for this model.
        log_scale_lr: the learning rate of the variational scales (log σ) and of every
            hyperparameter site (a latent τ), ``lr`` staying that of the factors' locations (see
            :func:`bora_pyro.guides.param_groups`). Adam moves a parameter by about its lr per
            step: at the factors' 1e-3, log σ moves by 0.25 in 250 steps and the scales never
            leave their start; 0.05 (the default) lets them and a learned τ move within a few
            hundred steps. None: ``lr`` for every parameter.
        eval_every: steps between validation checks (default: once per epoch); needs a
            non-empty validation split, otherwise the last parameters are kept.
        patience: stop after this many checks without improvement (None: never on validation).
        elbo_window: without a validation split, stop at a check when the ELBO of the last
            ``elbo_window`` steps is flat within its noise (:mod:`bora_pyro.convergence`; default:
            two validation intervals, at least 100 steps). With one, validation decides: a step's
            ELBO is a one-batch estimate whose noise hides a slow late gain (measured on the main
            job: flat within its noise over 100 steps at step 160, while validation perplexity
            still fell for hundreds of steps). ``steps``/``epochs`` is a cap; when it stops a fit
            that is still improving (validation best at the last check, or the ELBO still rising),
            a :class:`~bora_pyro.errors.ConvergenceWarning` says so and ``still_improving`` is set.
        seed: seeds Pyro, torch and the batch order.
        bf16: bf16 autocast of the forward pass (CUDA, or CPUs with bf16 support such as AMX);
            factors, guide parameters and the likelihood's log-softmax stay float32.
        on_checkpoint: called with the :class:`TrainState` after every check (e.g. to save it),
            and after the step at which a SIGINT (Ctrl-C) or SIGTERM arrived. In a data-parallel
            fit only the first process (rank 0) calls it.
        resume: a saved :class:`TrainState` to continue from; with the same arguments the fit then
            ends with the same parameters, bit for bit on CPU, as one that was never stopped. A
            different ``lr`` replaces the saved one (e.g. to continue after a :class:`FitError`).

    Raises:
        FitError: the loss or its gradient stopped being finite; the guide keeps the parameters of
            the step before, and nothing is passed to ``on_checkpoint`` for the failed step.
        FitInterrupted: a SIGINT or SIGTERM arrived (at any process); the step it arrived in was
            finished and checkpointed (``on_checkpoint``), so ``resume`` continues exactly after it.
            The guide keeps that step's parameters. The same signal a second time interrupts at
            once, with a plain KeyboardInterrupt.

    Data-parallel (``torchrun``, after :func:`bora_pyro.distributed.init_from_env`): every process
    calls ``fit`` with the same arguments; each scores its share of every global batch of
    ``batch_size`` documents and of the validation split, the gradients are averaged, and the
    processes end with the same parameters as one process would (up to rounding).
    """
    check_fit_settings(steps, epochs, batch_size, lr, log_scale_lr)
    steps_per_epoch = math.ceil(len(corpus.train) / batch_size)
    total_steps = steps if steps is not None else math.ceil(epochs * steps_per_epoch)
    if total_steps < 1:
        raise ConfigError(f"the fit must run at least one step, got steps={steps}, epochs={epochs}")
    device = model.lm.device
    eval_every = eval_every or steps_per_epoch
    elbo_window = elbo_window or default_window(eval_every)
    validate = len(corpus.validation) > 0

    rank, num_ranks = distributed.world()
    main = rank == 0
    pyro.set_rng_seed(seed)  # the same on every process: they draw the same noise for the same tasks
    batches = BatchStream(corpus, batch_size, seed)  # every process draws the same global batches
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        guide(corpus.train.collate([0], corpus.pad_token_id).to(device))  # creates the guide's parameters
    task_store = guide_task_store(guide)
    optim = make_optimizer(optimizer, optimizer_groups(guide, lr, log_scale_lr, weight_decay), lr)
    svi_step = SVIStep(model, guide, optim, autocast, task_store)

    result = FitResult(steps=0, best_step=0, elbo_window=elbo_window, start_log_scales=site_log_scales(guide))
    best_nll, best_state, checks_without_gain = math.inf, None, 0
    window, checkpoint_step = dict(EMPTY_WINDOW), None
    if resume is not None:
        if (task_store is None) != (resume.task_shards is None):
            raise CheckpointError("the checkpoint was written by a fit " + ("without" if task_store else "with")
                                  + " a task store: resume it with a guide like the one that wrote it")
        load_shared_state_dict(guide, resume.guide)
        chosen_lrs = [group["lr"] for group in optim.param_groups]
        try:
            optim.load_state_dict(resume.optimizer)
        except ValueError as error:  # another grouping of the parameters: an older bora-pyro wrote it
            raise CheckpointError(f"the checkpoint's optimizer state does not fit this fit's parameters ({error}); "
                                  "an older bora-pyro wrote it: fit the run again") from None
        for group, chosen_lr in zip(optim.param_groups, chosen_lrs, strict=True):
            group["lr"] = chosen_lr
        if task_store is not None:
            task_store.read_shards(*resume.task_shards)
        set_rng_state(resume.rng)
        batches.restore(resume.batches)
        result.steps, result.best_step, result.history = resume.step, resume.best_step, list(resume.history)
        result.elbos = list(resume.elbos)
        best_nll, best_state, checks_without_gain = resume.best_nll, resume.best_guide, resume.checks_without_gain
        window, checkpoint_step = dict(resume.window), resume.step
    elif task_store is not None:
        task_store.start()  # a fresh optimizer, as an in-memory guide gets from a second fit

    def checkpoint(step: int) -> None:
        nonlocal checkpoint_step
        if on_checkpoint is None or checkpoint_step == step:
            return
        if main:  # one process writes; the others know the step that is saved
            on_checkpoint(TrainState(
                step=step, guide=shared_state_dict(guide), optimizer=optim.state_dict(), rng=get_rng_state(),
                batches=batches.state(), best_guide=best_state, best_nll=best_nll, best_step=result.best_step,
                checks_without_gain=checks_without_gain, history=result.history, window=dict(window),
                elbos=result.elbos, task_store=task_store,
            ))
        checkpoint_step = step

    def check(step: int) -> str | None:
        """Record a history entry, validate, checkpoint; what stops the fit now, if anything."""
        nonlocal best_nll, best_state, checks_without_gain
        entry = {
            "step": step,
            "epoch": step / steps_per_epoch,
            "elbo": -window["loss"] / window_steps(step, eval_every),
            "train_perplexity": window_perplexity(window),
        }
        window.update(EMPTY_WINDOW)
        if validate:
            with autocast:
                report = evaluate(model, guide, corpus, "validation")
            entry["validation_perplexity"] = report["perplexity"]
            if report["nll"] < best_nll:
                best_nll, checks_without_gain, result.best_step = report["nll"], 0, step
                best_state = {k: v.detach().clone() for k, v in shared_state_dict(guide).items()}
                if task_store is not None:
                    task_store.snapshot()
            else:
                checks_without_gain += 1
        result.history.append(entry)
        bar.set_postfix({k: f"{v:.4g}" for k, v in entry.items() if k not in ("step", "epoch")})
        checkpoint(step)
        if patience is not None and checks_without_gain >= patience:
            return "patience"
        trend = elbo_trend(result.elbos, elbo_window) if not validate else None
        return "elbo" if trend is not None and trend.converged else None

    bar = tqdm(range(result.steps + 1, total_steps + 1), desc="fit", disable=not (progress and main), dynamic_ncols=True,
               initial=result.steps, total=total_steps)
    with deferred_stop() as interrupted, contextlib.closing(bar), reuse_large_blocks(device), \
            contextlib.ExitStack() as cleanup:
        if task_store is not None:  # however the fit ends, no rows stay held on the device for a next step
            cleanup.callback(task_store.settle)
        for step in bar:
            batch = next(batches)
            if task_store is not None:
                task_store.fetch(batch.task_ids.unique().tolist())  # the global batch's: the same on every process
                if step < total_steps:
                    task_store.prefetch(batches.peek().task_ids.unique().tolist())
            batch = batch.shard(rank, num_ranks).to(device)
            try:
                report = svi_step(batch, interrupted())
            except NotFinite as error:
                raise not_finite(error.what, step, lr, checkpoint_step) from None
            window["log_likelihood"] += report.log_likelihood
            window["tokens"] += report.tokens
            window["loss"] += report.loss
            result.elbos.append(-report.loss)
            result.steps = step
            if progress and step % 10 == 0:
                bar.set_postfix(elbo=f"{-window['loss'] / window_steps(step, eval_every):.4g}",
                                train_ppl=f"{window_perplexity(window):.4g}", refresh=False)

            if step % eval_every == 0 or step == total_steps:
                stop = check(step)
                if stop is not None:
                    result.stopped_by = stop
                    break
            if report.interrupted:
                checkpoint(step)
                raise FitInterrupted(step)
    result.elbo_trend = elbo_trend(result.elbos, elbo_window)
    if result.stopped_by == "cap":
        message = cap_warning(result.steps, result.elbo_trend, validate and result.best_step == result.steps)
        result.still_improving = message is not None
        if message is not None and main:
            warnings.warn(message, ConvergenceWarning, stacklevel=2)
    if best_state is not None:
        load_shared_state_dict(guide, best_state)
        if task_store is not None:
            task_store.restore_snapshot()
    else:
        result.best_step = result.steps
    return result


def window_perplexity(window: dict) -> float:
    """Training perplexity of the steps since the last check."""
    return math.exp(-window["log_likelihood"] / max(window["tokens"], 1))


def get_rng_state() -> dict:
    """torch's, Python's and NumPy's global generator states (what ``pyro.set_rng_seed`` seeds)."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
