"""Run configuration, building every piece from it, and the run directory on disk.

A run directory holds ``config.json`` (a :class:`RunConfig`, enough to rebuild model, prior, guide
and data split), ``guide.safetensors`` (the fitted guide parameters; nothing is ever unpickled)
and ``metrics.json``. Every file is written atomically: a temp file, then a rename.

``config.json`` names the directory's format (:data:`FORMAT_VERSION`; none: format 1). A format
this bora-pyro cannot read is refused; an older one is read by converting what changed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pyro
import safetensors.torch
import torch
import transformers

from . import __version__, distributed
from .adapted_lm import MultiTaskLM, check_vocabulary, load_tokenizer, weights_fingerprint
from .data import Batch, MultiTaskCorpus
from .errors import BoRAError, CheckpointError, ConfigError, WriteError, first_line
from .diagnostics import site_log_scales
from .fit import TrainState, check_fit_settings
from .guides import hybrid_guide, map_guide, mean_field_guide
from .guides.laplace_tau import GridLogTau, tau_posterior_from_json, tau_posterior_to_json
from .models import BoRA, HierarchicalNormal, Independent, Joint, parse_hyperprior
from .guide_file import load_guide, save_guide
from .task_store import TaskStore, guide_task_store

CONFIG_FILE, GUIDE_FILE, METRICS_FILE = "config.json", "guide.safetensors", "metrics.json"
CHECKPOINT_FILE = "checkpoint.safetensors"
#: A fit with a task store checkpoints its tasks here, one shard per task (:mod:`bora_pyro.task_store`).
TASKS_FOLDER = "checkpoint-tasks"
#: ``--task-store disk`` keeps the fit's task rows in files here (per process: ``rank<r>``),
#: removed once the run is saved.
TASK_STORE_FOLDER = "task-store"
TASK_STORES = ("host", "disk")
PRIORS = ("hierarchical", "independent", "joint")
#: ``--base-dtype`` → the dtype the frozen base is loaded in (auto: as saved, transformers' default)
BASE_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GUIDES = ("map", "mean-field", "hybrid")
#: How a learned τ's posterior is reported: ``laplace``, the Laplace step after the fit
#: (:mod:`bora_pyro.guides.laplace_tau`, calibrated by ``benchmarks/sbc.py``), or ``guide``, the
#: fitted guide's own q(τ) (not calibrated: too narrow, too high).
TAU_POSTERIORS = ("laplace", "guide")
#: The Laplace step's posterior of each latent τ site (:func:`~bora_pyro.guides.laplace_tau.tau_posterior_to_json`).
TAU_POSTERIOR_FILE = "tau_posterior.json"
#: The guide of a fit with a learned τ (``--tau-prior``) and no ``--guide``: see
#: :func:`~bora_pyro.guides.learned_tau_guide`, which it builds.
LEARNED_TAU_GUIDE = "mean-field"
#: The run directory's format. 2: the mean-field scales are ``log_scales``/``task_log_scales`` = log σ;
#: 1 (a config.json without ``format_version``) kept them as ``scales``/``task_scales`` = softplus⁻¹ σ.
FORMAT_VERSION = 2
#: A format-1 guide parameter of the mean-field scales (of the whole guide, or of a part ``N.`` of a hybrid one).
FORMAT_1_SCALES = re.compile(r"^(\d+\.)?(task_)?scales\.")


@dataclass
class RunConfig:
    """Everything needed to rebuild a fit. Field names match the CLI flags of ``bora-pyro fit``."""

    model: str
    data: str | None = None
    task_field: str = "task"
    text_field: str = "text"
    prior: str = "hierarchical"
    tau: float = 100.0
    tau_prior: str | None = None  # learn τ under this hyperprior ("gamma:2,0.02"); None: τ = tau
    tau_per: str = "all"
    tau_posterior: str = "laplace"  # a learned τ's posterior: the Laplace step after the fit, or the guide's q(τ)
    global_scale: float | None = 1.0
    centered: bool | float | None = None  # False: offsets θ_d − Θ; True: θ_d; c: LocScaleReparam(centered=c);
    # None: offsets for a fixed τ, LEARNED_TAU_CENTERED for a learned one
    guide: str | None = None  # None: map for a fixed τ, LEARNED_TAU_GUIDE for a learned one
    init_scale: float | None = None  # start sd of the mean-field scales; None: a tenth of each site's prior sd
    rank: int = 8
    alpha: float = 16.0
    target_modules: list[str] | None = None
    max_length: int = 256
    test_size: float = 0.33
    validation_size: float = 0.1
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 8
    lr: float = 1e-3
    log_scale_lr: float | None = 0.05  # lr of variational scales and of a latent τ; None: lr
    optimizer: str = "adam"
    weight_decay: float = 0.0
    eval_every: int | None = None
    patience: int | None = 3
    elbo_window: int | None = None  # steps whose ELBO trend stops the fit when flat; None: 2 × eval_every, ≥ 100
    seed: int = 0
    device: str = "cpu"
    bf16: bool = False
    base_dtype: str = "auto"  # the frozen base's weights; adapters and guide stay float32
    gradient_checkpointing: bool = False
    task_store: str | None = None  # where the fit keeps per-task rows: None on the device, "host" or "disk"
    task_names: list[str] = field(default_factory=list)
    base_fingerprint: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION  # of the run directory that holds this config

    @property
    def chosen_guide(self) -> str:
        """``guide``, or the default: ``map``, or :data:`LEARNED_TAU_GUIDE` for a learned τ."""
        if self.guide is not None:
            return self.guide
        return LEARNED_TAU_GUIDE if self.tau_prior is not None else "map"

    @property
    def laplace_tau(self) -> bool:
        """Whether the fit ends with the Laplace step on a learned τ (:data:`TAU_POSTERIORS`)."""
        return self.tau_prior is not None and self.tau_posterior == "laplace"

    def validate(self) -> None:
        """Refuse settings that cannot work, before anything loads: the model's and the fit's."""
        self.validate_model()
        if self.guide is not None and self.guide not in GUIDES:
            raise ConfigError(f"unknown guide {self.guide!r}: choose one of {GUIDES}")
        if self.tau_prior is not None and self.chosen_guide == "map":
            raise ConfigError("--guide map cannot learn τ (MAP over τ and the task factors is degenerate: "
                              "τ → ∞, every task collapses onto Θ); use --guide hybrid or --guide mean-field")
        if self.tau_posterior not in TAU_POSTERIORS:
            raise ConfigError(f"unknown τ posterior {self.tau_posterior!r}: choose one of {TAU_POSTERIORS}")
        if self.laplace_tau and self.task_store is not None:
            raise ConfigError("the Laplace step on τ (--tau-posterior laplace, the default for --tau-prior) holds every "
                              "task's factors in memory, which --task-store is there to avoid: add --tau-posterior guide")
        if self.task_store is not None and self.task_store not in TASK_STORES:
            raise ConfigError(f"unknown task store {self.task_store!r}: choose one of {TASK_STORES}")
        if self.data is not None and not Path(self.data).exists():
            raise ConfigError(f"data file {self.data!r} does not exist; check the --data path")
        check_fit_settings(self.steps, self.epochs, self.batch_size, self.lr, self.log_scale_lr)

    def validate_model(self) -> None:
        """Refuse a prior, base dtype or device that cannot work (what ``generate --prior-sample`` needs)."""
        if self.prior not in PRIORS:
            raise ConfigError(f"unknown prior {self.prior!r}: choose one of {PRIORS}")
        if self.prior == "hierarchical" and not (math.isfinite(self.tau) and self.tau > 0):
            raise ConfigError(
                f"tau must be a positive finite number for the hierarchical prior, got {self.tau}; "
                "use --prior independent for τ = 0 and --prior joint for τ = ∞"
            )
        if self.tau_prior is not None and self.prior != "hierarchical":
            raise ConfigError("--tau-prior learns the τ of the hierarchical prior; drop it or use --prior hierarchical")
        if self.prior == "hierarchical":
            make_prior(self)  # refuses a bad --tau-prior, --tau-per or centring before anything loads
        if self.base_dtype not in BASE_DTYPES:
            raise ConfigError(f"unknown base dtype {self.base_dtype!r}: choose one of {tuple(BASE_DTYPES)}")
        check_device(self.device)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, values: dict) -> RunConfig:
        """The config of a ``config.json``; one without ``format_version`` is of format 1."""
        known = {f.name for f in dataclasses.fields(cls)}
        # before tau_posterior existed a learned τ kept the guide's q(τ): resuming such a run keeps it too
        return cls(**{"format_version": 1, "tau_posterior": "guide", **{k: v for k, v in values.items() if k in known}})


def check_device(device: str) -> None:
    """Refuse a device torch does not know or this machine does not have, before loading anything."""
    try:
        kind = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if kind.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} was asked for but CUDA is not available; use --device cpu")
    if kind.type == "cuda" and kind.index is not None and kind.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA devices; "
                          f"use cuda:0 … cuda:{torch.cuda.device_count() - 1}")


def make_prior(config: RunConfig):
    if config.prior == "hierarchical":
        tau = config.tau if config.tau_prior is None else parse_hyperprior(config.tau_prior)
        return HierarchicalNormal(tau, config.global_scale, config.centered, tau_per=config.tau_per)
    if config.prior == "independent":
        return Independent(config.global_scale)
    return Joint(config.global_scale)


def make_guide(config: RunConfig, model: BoRA, task_store: TaskStore | None = None):
    if config.chosen_guide == "map":
        return map_guide(model, seed=config.seed, task_store=task_store)
    if config.chosen_guide == "hybrid":
        return hybrid_guide(model, init_scale=config.init_scale, seed=config.seed, task_store=task_store)
    return mean_field_guide(model, init_scale=config.init_scale, seed=config.seed, task_store=task_store)


def fit_task_store(config: RunConfig, run_dir: str | Path) -> TaskStore | None:
    """The task store of a fit of ``config`` into ``run_dir`` (``--task-store``), or None. A fitted
    run keeps no store: its ``guide.safetensors`` holds every task, as without one."""
    if config.task_store is None:
        return None
    if config.task_store == "host":
        return TaskStore()
    return TaskStore(Path(run_dir) / TASK_STORE_FOLDER / f"rank{distributed.world()[0]}")


def build_lm(config: RunConfig, device: str | None = None, check_length: bool = True) -> tuple[MultiTaskLM, object]:
    """The wrapped LM on ``device`` (default ``config.device``; base weights in ``config.base_dtype``)
    and its tokenizer; ``check_length``: refuse a ``config.max_length`` beyond the model's context."""
    lm = MultiTaskLM.from_pretrained(
        config.model, dtype=BASE_DTYPES[config.base_dtype], rank=config.rank, alpha=config.alpha,
        target_modules=config.target_modules,
    )
    if config.gradient_checkpointing:
        lm.enable_gradient_checkpointing()
    if check_length:
        lm.check_max_length(config.max_length)
    tokenizer = load_tokenizer(config.model)
    check_vocabulary(lm.model, tokenizer)
    return lm.to(device or config.device), tokenizer


def load_corpus(config: RunConfig, tokenizer, data: str | None = None) -> MultiTaskCorpus:
    """The run's data split (or another file's documents, mapped onto the run's tasks)."""
    path = data or config.data
    if path is None:
        raise ConfigError("no data file: pass --data FILE")
    return MultiTaskCorpus.from_file(
        path,
        tokenizer,
        task_field=config.task_field,
        text_field=config.text_field,
        max_length=config.max_length,
        test_size=config.test_size,
        validation_size=config.validation_size,
        seed=config.seed,
        task_names=config.task_names or None,
    )


def versions() -> dict[str, str]:
    return {"bora_pyro": __version__, "torch": torch.__version__, "pyro": pyro.__version__,
            "transformers": transformers.__version__}


def atomic_write(path: Path, write) -> None:
    """Call ``write(temp_path)``, flush it to disk, then rename the temp file onto ``path`` and
    flush the folder: after a crash of the machine too, ``path`` is the old file or the new one.

    Raises:
        WriteError: the folder is not writable or the disk is full; ``path`` is left as it was.
    """
    temp = None
    try:
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        write(temp)
        fsync(temp)
        os.replace(temp, path)
        fsync(path.parent)
    except OSError as error:
        raise WriteError(f"cannot write {path} ({error.strerror or first_line(error)}); its previous version "
                         "is intact: free disk space or make the folder writable, then try again") from None
    finally:
        if temp is not None and os.path.exists(temp):
            os.remove(temp)


def fsync(path: Path | str) -> None:
    """Flush a file's or a folder's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dir(path: Path) -> Path:
    """Create a folder (and its parents), with a one-line :class:`WriteError` if it cannot be."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise WriteError(f"cannot create the folder {path} ({error.strerror or first_line(error)}); "
                         "choose a writable --out") from None
    return path


def write_json(path: Path, values: dict) -> None:
    atomic_write(path, lambda temp: Path(temp).write_text(json.dumps(values, indent=2) + "\n"))


def save_config(run_dir: str | Path, config: RunConfig) -> Path:
    """Write ``config.json`` (with the library versions) into ``run_dir``, created if needed."""
    run_dir = make_dir(Path(run_dir))
    config.versions, config.format_version = versions(), FORMAT_VERSION
    write_json(run_dir / CONFIG_FILE, config.to_json())
    return run_dir


def read_config(run_dir: str | Path) -> RunConfig:
    """The :class:`RunConfig` of a run directory, refused if it is in a format this bora-pyro
    cannot read or a newer major version wrote it."""
    config_path = Path(run_dir) / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{str(run_dir)!r} is not a run directory: it has no {CONFIG_FILE}; "
                              "pass the --out folder of a fit")
    try:
        values = json.loads(config_path.read_text())
        check_format(config_path, values.get("format_version", 1))
        config = RunConfig.from_json(values)
    except (json.JSONDecodeError, TypeError, AttributeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{config_path} is not a valid run config ({first_line(error)}); "
                              "the file is corrupt: fit the run again") from None
    saved = config.versions.get("bora_pyro", __version__)
    if saved.split(".")[0] != __version__.split(".")[0]:
        raise CheckpointError(
            f"{run_dir} was written by bora-pyro {saved}; this is {__version__}: load it with that major version"
        )
    return config


def check_format(config_path: Path, format_version) -> None:
    """Refuse a run directory of a format this bora-pyro cannot read (one a newer bora-pyro wrote)."""
    if format_version not in range(1, FORMAT_VERSION + 1):
        raise CheckpointError(
            f"{config_path} is of run-directory format {format_version!r}, and this bora-pyro ({__version__}) reads "
            f"formats 1 to {FORMAT_VERSION}: load the run with the bora-pyro that wrote it, or fit it again"
        )


def check_base_model(config: RunConfig, lm: MultiTaskLM) -> None:
    """Refuse a run whose base model's weights differ from the ones it was fitted on."""
    found = weights_fingerprint(lm.model)
    if config.base_fingerprint is not None and config.base_fingerprint != found:
        raise CheckpointError(
            f"the run was fitted on a different base model (weights fingerprint {config.base_fingerprint}, "
            f"{config.model!r} now has {found}); load it with the base model it was fitted on"
        )
    config.base_fingerprint = found


def save_run(run_dir: str | Path, config: RunConfig, guide, metrics: dict | None = None) -> Path:
    """Write config, guide parameters and metrics into ``run_dir`` (created if needed); a guide
    with a task store a task's row at a time (:func:`~bora_pyro.guide_file.save_guide`)."""
    run_dir = save_config(run_dir, config)
    store = guide_task_store(guide)
    if store is not None and store.sites:
        atomic_write(run_dir / GUIDE_FILE, lambda temp: save_guide(guide, temp))
    else:
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in guide.state_dict().items()}
        atomic_write(run_dir / GUIDE_FILE, lambda temp: safetensors.torch.save_file(state, temp))
    if metrics is not None:
        write_json(run_dir / METRICS_FILE, metrics)
    return run_dir


def save_tau_posterior(run_dir: str | Path, tau_posterior: Mapping[str, GridLogTau] | None, metrics: dict) -> None:
    """Add a Laplace step's posterior of τ (``tau_posterior.json``; None: the step failed) to a
    saved run, then its ``metrics`` (which say whether the step ran)."""
    if tau_posterior:
        write_json(Path(run_dir) / TAU_POSTERIOR_FILE, tau_posterior_to_json(tau_posterior))
    write_json(Path(run_dir) / METRICS_FILE, metrics)


@dataclass
class Run:
    """A loaded run: its config, wrapped LM, tokenizer, model and fitted guide (and, when asked
    for, the guide's log σ per site at its start: :func:`~bora_pyro.diagnostics.site_log_scales`),
    and the Laplace step's posterior of each latent τ site when the fit took it."""

    config: RunConfig
    lm: MultiTaskLM
    tokenizer: object
    model: BoRA
    guide: object
    start_log_scales: dict[str, torch.Tensor] | None = None
    tau_posterior: dict[str, GridLogTau] | None = None


def build_model(config: RunConfig, lm: MultiTaskLM, task_store: TaskStore | None = None) -> tuple[BoRA, object]:
    model = BoRA(lm, make_prior(config), len(config.task_names))
    return model, make_guide(config, model, task_store)


def init_guide(guide, lm: MultiTaskLM, eos_token_id: int) -> None:
    """Create the guide's parameters by running it once on a two-token document of task 0 (for a
    guide with a task store, in a tasks plate of that task alone: the guide's prototype then holds
    one task's values, not D tasks')."""
    with torch.no_grad():
        guide(Batch.probe(eos_token_id, lm.device, tasks=None if guide_task_store(guide) is None else [0]))


def load_run(run_dir: str | Path, device: str | None = None, keep_start: bool = False,
             task_store: TaskStore | None = None) -> Run:
    """Rebuild a fitted run from its directory (on ``device``, default the run's); with
    ``keep_start``, also the guide's start scales (the guide starts the same way in every build);
    with ``task_store``, the guide's task rows go into it a task at a time (for runs of more tasks
    than memory holds: ``evaluate``, ``diagnose``, ``export_peft_all`` and
    ``posterior_perplexities`` read it a pass of tasks at a time).

    Raises:
        CheckpointError: the run is incomplete or corrupt, or of format 1 with a ``task_store``.
    """
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    if device is not None:
        config.device = device
    check_device(config.device)
    if task_store is not None and config.format_version == 1:
        raise CheckpointError(f"{run_dir} is of run-directory format 1, which a task store cannot load a task at "
                              "a time: load it without a task store, or fit it again")
    lm, tokenizer = build_lm(config)
    check_base_model(config, lm)
    model, guide = build_model(config, lm, task_store)
    init_guide(guide, lm, tokenizer.eos_token_id)
    start_log_scales = site_log_scales(guide) if keep_start else None
    if task_store is not None and task_store.sites:
        read_safetensors(run_dir / GUIDE_FILE, lambda path: load_guide(
            guide, path, lambda state: load_guide_state(guide, state, path)))
    else:
        state = read_tensors(run_dir / GUIDE_FILE, lm.device)[0]
        if config.format_version == 1:
            state = format_2_guide_state(state)
        load_guide_state(guide, state, run_dir / GUIDE_FILE)
    tau_posterior = None
    if (run_dir / TAU_POSTERIOR_FILE).is_file():
        try:
            tau_posterior = tau_posterior_from_json(json.loads((run_dir / TAU_POSTERIOR_FILE).read_text()))
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{run_dir / TAU_POSTERIOR_FILE} is corrupt ({first_line(error)}); delete it to "
                                  "report the guide's own q(τ), or fit the run again") from None
    return Run(config, lm, tokenizer, model, guide, start_log_scales, tau_posterior)


def format_2_guide_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A format-1 guide state in format 2: the mean-field scales ``scales.*``/``task_scales.*``,
    stored as Pyro's softplus⁻¹ σ, become ``log_scales.*``/``task_log_scales.*`` = log σ =
    log softplus(s). Every other parameter is the same in both formats."""
    converted = {}
    for name, value in state.items():
        new_name = FORMAT_1_SCALES.sub(r"\1\2log_scales.", name)
        converted[new_name] = value if new_name == name else \
            torch.nn.functional.softplus(value.double()).log().to(value.dtype)
    return converted


def load_guide_state(guide, state: dict[str, torch.Tensor], path: Path) -> None:
    """``guide.load_state_dict(state)``, with a one-line error if ``path``'s tensors do not fit the guide."""
    try:
        guide.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(f"{path} does not match the run's config.json ({first_line(error).rstrip(':')}); "
                              "the run directory mixes files of different runs, or an older bora-pyro wrote it: restore this "
                              "run's own file, or fit the run again") from None


def read_tensors(path: Path, device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, with a one-line error for a missing or corrupt one."""
    def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        with safetensors.safe_open(str(path), framework="pt", device=str(device)) as file:
            return {key: file.get_tensor(key) for key in file.keys()}, file.metadata() or {}

    return read_safetensors(path, read)


def read_safetensors(path: Path, read):
    """``read(path)`` of a safetensors file, with a one-line error for a missing or corrupt one."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the run directory is incomplete")
    try:
        return read(path)
    except BoRAError:  # already one line: a mismatch, a full disk under a task store
        raise
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"cannot read {path}: {first_line(error)}; the file is truncated or corrupt: "
                              "restore it, or fit the run again") from None


def save_checkpoint(run_dir: str | Path, state: TrainState) -> None:
    """Write a :class:`~bora_pyro.fit.TrainState` as one safetensors file, atomically: tensors
    under prefixes, everything else as JSON metadata. A crash mid-save leaves the previous one."""
    tensors = {f"guide.{k}": v for k, v in state.guide.items()}
    tensors |= {f"best.{k}": v for k, v in (state.best_guide or {}).items()}
    optimizer_state = {}
    for index, values in state.optimizer["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{name}"] = value
            else:
                optimizer_state.setdefault(str(index), {})[name] = value
    numpy_state = state.rng["numpy"]
    tensors["rng.torch"] = state.rng["torch"]
    tensors["rng.numpy"] = torch.from_numpy(numpy_state[1].astype("int64"))
    tensors["batches.epoch_start"] = state.batches["epoch_start"]
    metadata = {
        "step": state.step, "best_nll": state.best_nll, "best_step": state.best_step,
        "checks_without_gain": state.checks_without_gain, "history": state.history,
        "has_best": state.best_guide is not None,
        "optimizer": {"param_groups": state.optimizer["param_groups"], "scalars": optimizer_state},
        "rng": {"python": state.rng["python"], "numpy": [numpy_state[0], *numpy_state[2:]]},
        "batches": {"epoch": state.batches["epoch"], "position": state.batches["position"]},
        "window": state.window,
        "elbos": state.elbos,
    }
    make_dir(Path(run_dir))
    if state.task_store is not None:  # the changed tasks' shards first: the checkpoint file names them
        tensors |= state.task_store.write_shards(Path(run_dir) / TASKS_FOLDER, state.step)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(Path(run_dir) / CHECKPOINT_FILE,
                 lambda temp: safetensors.torch.save_file(tensors, temp, metadata={"train_state": json.dumps(metadata)}))
    if state.task_store is not None:
        state.task_store.commit(Path(run_dir) / TASKS_FOLDER, tensors["tasks.shard_steps"])


def load_checkpoint(run_dir: str | Path, device: torch.device | str = "cpu") -> TrainState:
    """The :class:`~bora_pyro.fit.TrainState` saved by :func:`save_checkpoint`."""
    path = Path(run_dir) / CHECKPOINT_FILE
    tensors, metadata = read_tensors(path)
    if any(FORMAT_1_SCALES.match(key.removeprefix("guide.")) for key in tensors):
        raise CheckpointError(
            f"{path} is of run-directory format 1, which kept the variational scales as softplus⁻¹ σ (format "
            f"{FORMAT_VERSION}: log σ); its guide converts, but the optimizer state of those scales cannot be "
            f"converted, so --resume cannot continue it: evaluate, predict and export still read the run's "
            f"{GUIDE_FILE}, or fit the run again with --out"
        )
    try:
        meta = json.loads(metadata["train_state"])
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError(f"{path} has no train state in it; the file is truncated or corrupt: "
                              "restore it, or fit the run again") from None

    def prefixed(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    optimizer_state: dict[int, dict] = {}
    for key, value in prefixed("optimizer.").items():
        index, name = key.split(".", 1)
        optimizer_state.setdefault(int(index), {})[name] = value
    for index, scalars in meta["optimizer"]["scalars"].items():
        optimizer_state.setdefault(int(index), {}).update(scalars)
    numpy_name, *numpy_rest = meta["rng"]["numpy"]
    version, internal, gauss = meta["rng"]["python"]
    return TrainState(
        step=meta["step"],
        guide={k: v.to(device) for k, v in prefixed("guide.").items()},
        optimizer={"state": optimizer_state, "param_groups": meta["optimizer"]["param_groups"]},
        rng={"torch": tensors["rng.torch"], "python": (version, tuple(internal), gauss),
             "numpy": (numpy_name, tensors["rng.numpy"].numpy().astype("uint32"), *numpy_rest)},
        batches={**meta["batches"], "epoch_start": tensors["batches.epoch_start"]},
        best_guide={k: v.to(device) for k, v in prefixed("best.").items()} if meta["has_best"] else None,
        best_nll=meta["best_nll"], best_step=meta["best_step"],
        checks_without_gain=meta["checks_without_gain"], history=meta["history"],
        **({"window": meta["window"]} if "window" in meta else {}),
        elbos=meta.get("elbos", []),
        task_shards=((Path(run_dir) / TASKS_FOLDER, tensors["tasks.shard_steps"], tensors["tasks.changed"],
                      meta["has_best"]) if "tasks.shard_steps" in tensors else None),
    )
