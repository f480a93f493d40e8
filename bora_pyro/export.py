"""Export a fitted run's adapters: as peft LoRA adapters, or merged into the base model's weights.

A task's adapter is its factors at the guide's median (the MAP value, or the posterior mean of a
mean-field guide); the global adapter is the factors Θ of the site ``global.lora`` (or ``global.<module>.lora_*``).
Both forms compute exactly what bora-pyro computes for that task: ``base(x) + (alpha/r)·B A x``.

- :func:`export_peft` writes ``adapter_config.json`` and ``adapter_model.safetensors`` in peft's
  LoRA format (``PeftModel.from_pretrained(base, folder)`` loads it). peft itself is not needed.
- :func:`export_peft_all` writes one such folder per task, plus the global adapter (reading a
  guide's task store :data:`~bora_pyro.task_store.TASKS_PER_PASS` tasks at a time).
- :func:`merge` returns a fresh copy of the base model with ``W += (alpha/r)·B A`` in its weights.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import uuid
from pathlib import Path

import safetensors.torch
import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from .adapted_lm import load_causal_lm
from .gguf import resolve_base
from .errors import ConfigError, WriteError, first_line
from .guides import only_tasks
from .predictive import global_factors
from .run import Run, RunConfig, atomic_write, make_dir, write_json
from .task_store import task_passes

ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
INDEX_FILE = "index.json"

#: module name → (lora_A [r, in], lora_B [out, r]) of one adapter.
Adapter = dict[str, tuple[torch.Tensor, torch.Tensor]]


def task_index(config: RunConfig, task: str) -> int:
    """The index of ``task`` among the run's tasks; an unknown name is a one-line ConfigError."""
    names = config.task_names
    if task in names:
        return names.index(task)
    close = difflib.get_close_matches(task, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    shown = ", ".join(map(repr, names[:5])) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")
    raise ConfigError(f"unknown task {task!r}: the run's tasks are {shown}{hint}")


def check_request(config: RunConfig, task: str | None) -> None:
    """Fail early, before any model is loaded, on an unknown task or on ``task=None`` (the global
    adapter) for the ``independent`` prior, which has no global factors."""
    if task is not None:
        task_index(config, task)
    elif config.prior == "independent":
        raise no_global_adapter(config)


def no_global_adapter(config: RunConfig) -> ConfigError:
    return ConfigError(f"the {config.prior!r} prior of this run has no global adapter; "
                       "export a task's adapter with --task NAME instead")


def adapter_factors(run: Run, task: str | None = None) -> Adapter:
    """One adapter's factors, on the CPU in float32: task ``task``'s, or the global ones (None).

    Raises:
        ConfigError: unknown task, or ``task=None`` for a prior without global factors
            (``independent``).
    """
    check_request(run.config, task)
    if task is None:
        with only_tasks(run.guide, [0]):  # the task sites' rows of one task, not D (a task store's)
            return row_adapter(global_factors(run.model, run.guide.median()), 0)
    index = task_index(run.config, task)
    with torch.no_grad(), only_tasks(run.guide, [index]):
        return row_adapter(run.model.task_factors(run.guide.median(), [index]), 0)


def row_adapter(factors, index: int) -> Adapter:
    """Row ``index`` of factors [T, ...] per module as one adapter, on the CPU in float32."""
    return {name: (lora_A[index].detach().float().cpu().contiguous(), lora_B[index].detach().float().cpu().contiguous())
            for name, (lora_A, lora_B) in factors.items()}


def peft_target_modules(run: Run) -> list[str]:
    """peft's ``target_modules``: the adapted modules' last names when those pick out exactly the
    adapted modules (the usual case), else their full names (e.g. after a glob ``--target-modules``)."""
    adapted = set(run.lm.layers)
    last_names = sorted({name.rsplit(".", 1)[-1] for name in adapted})
    matched = {name for name, _ in run.lm.model.named_modules() if name.rsplit(".", 1)[-1] in last_names}
    return last_names if matched == adapted else sorted(adapted)


def peft_config(run: Run) -> dict:
    """The ``adapter_config.json`` of a peft LoRA adapter for this run's model."""
    conv1d = all(isinstance(layer.base_layer, Conv1D) for layer in run.lm.layers.values())
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": resolve_base(run.config.model),  # a GGUF file's dequantised folder
        "revision": None,
        "inference_mode": True,
        "r": run.lm.rank,
        "lora_alpha": run.lm.alpha,
        "lora_dropout": 0.0,
        "target_modules": peft_target_modules(run),
        "fan_in_fan_out": conv1d,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def write_peft_adapter(run: Run, adapter: Adapter, out_dir: str | Path) -> Path:
    """Write ``adapter`` as a peft LoRA adapter folder (created if needed); returns the folder."""
    out_dir = make_dir(Path(out_dir))
    # peft's saved keys: the module name under ``base_model.model.``, without the adapter name
    tensors = {}
    for name, (lora_A, lora_B) in adapter.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = lora_A
        tensors[f"base_model.model.{name}.lora_B.weight"] = lora_B
    atomic_write(out_dir / ADAPTER_WEIGHTS_FILE,
                 lambda temp: safetensors.torch.save_file(tensors, temp, metadata={"format": "pt"}))
    write_json(out_dir / ADAPTER_CONFIG_FILE, peft_config(run))
    return out_dir


def export_peft(run: Run, out_dir: str | Path, task: str | None = None) -> Path:
    """Write task ``task``'s adapter (None: the global adapter) as a peft LoRA adapter in ``out_dir``.

    ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run.config.model), out_dir)``
    then computes what bora-pyro computes for that task. Returns ``out_dir``.
    """
    return write_peft_adapter(run, adapter_factors(run, task), out_dir)


def folder_name(task: str, taken: set[str]) -> str:
    """A safe, unique folder name for a task name."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", task).strip("._") or "task"
    name, suffix = base, 1
    while name.lower() in taken:
        suffix += 1
        name = f"{base}_{suffix}"
    taken.add(name.lower())
    return name


def export_peft_all(run: Run, out_dir: str | Path) -> Path:
    """Write every task's adapter as a peft folder ``out_dir/tasks/<task>/``, the global adapter
    (if the prior has one) in ``out_dir/global/``, and ``out_dir/index.json`` mapping each task name
    to its folder. Returns ``out_dir``."""
    out_dir = Path(out_dir)
    taken: set[str] = set()
    index: dict = {"tasks": {}, "global": None}
    for tasks in task_passes(run.model.num_tasks):  # a task store's rows a pass at a time
        with torch.no_grad(), only_tasks(run.guide, tasks):
            values = run.guide.median()
            factors = run.model.task_factors(values, tasks)
        for row, i in enumerate(tasks):
            task = run.config.task_names[i]
            folder = Path("tasks") / folder_name(task, taken)
            write_peft_adapter(run, row_adapter(factors, row), out_dir / folder)
            index["tasks"][task] = folder.as_posix()
    try:
        global_adapter = row_adapter(global_factors(run.model, values), 0)
    except ConfigError:  # a prior without global factors
        pass
    else:
        write_peft_adapter(run, global_adapter, out_dir / "global")
        index["global"] = "global"
    write_json(out_dir / INDEX_FILE, index)
    return out_dir


def merge(run: Run, task: str | None = None) -> PreTrainedModel:
    """A fresh copy of the base model (on the CPU) with task ``task``'s adapter (None: the global
    adapter) merged into its weights: ``W += (alpha/r)·B A`` (transposed for ``Conv1D``)."""
    adapter = adapter_factors(run, task)
    model = load_causal_lm(run.config.model)
    scaling = run.lm.alpha / run.lm.rank
    with torch.no_grad():
        for name, (lora_A, lora_B) in adapter.items():
            layer = model.get_submodule(name)
            delta = scaling * (lora_B @ lora_A)  # [out, in]
            if isinstance(layer, Conv1D):
                delta = delta.T  # Conv1D weight is [in, out]
            elif not isinstance(layer, nn.Linear):
                raise ConfigError(f"cannot merge into {name}: it is a {type(layer).__name__}, not a linear layer")
            layer.weight += delta.to(layer.weight.device, layer.weight.dtype)
    return model.eval()


def save_merged(run: Run, out_dir: str | Path, task: str | None = None) -> Path:
    """:func:`merge` saved with ``save_pretrained`` in ``out_dir``, with the run's tokenizer.

    Both are written into a temp folder beside ``out_dir`` and then moved there, so a failed save
    leaves no half-written model.

    Raises:
        WriteError: the folder is not writable or the disk is full; ``out_dir`` is left as it was.
    """
    out_dir = Path(out_dir)
    model = merge(run, task)
    make_dir(out_dir.parent)
    temp = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        temp.mkdir()
        model.save_pretrained(temp)
        run.tokenizer.save_pretrained(temp)
        move_into(temp, out_dir)
    except OSError as error:
        raise WriteError(f"cannot write the merged model to {out_dir} ({error.strerror or first_line(error)}); "
                         "nothing of it was left there: free disk space or make the folder writable, "
                         "then try again") from None
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return out_dir


def move_into(folder: Path, out_dir: Path) -> None:
    """Move ``folder`` to ``out_dir`` in one rename; into an ``out_dir`` that already holds files,
    move its files one rename each (``out_dir``'s other files stay)."""
    if out_dir.is_dir() and any(out_dir.iterdir()):
        for path in folder.iterdir():
            os.replace(path, out_dir / path.name)
    else:
        os.replace(folder, out_dir)


def peft_index(out_dir: str | Path) -> dict:
    """The ``index.json`` written by :func:`export_peft_all`."""
    return json.loads((Path(out_dir) / INDEX_FILE).read_text())
