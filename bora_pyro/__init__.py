"""bora-pyro: Bayesian hierarchical LoRA (BoRA) for multi-task fine-tuning, in Pyro.

The public API::

    from bora_pyro import MultiTaskLM, MultiTaskCorpus, fit, evaluate
    from bora_pyro.models import BoRA, HierarchicalNormal, Independent, Joint
    from bora_pyro.guides import map_guide, mean_field_guide
    from bora_pyro import TaskStore  # map_guide(model, task_store=TaskStore(folder)): tasks off the device
    from bora_pyro import distributed  # under torchrun: distributed.init_from_env(device), then fit as usual
    from bora_pyro import to_arviz  # a run's draws for ArviZ: az.loo, az.waic, az.compare
"""

__version__ = "0.1.0"

from .adapted_lm import MultiTaskLM, load_tokenizer  # noqa: E402
from .data import Batch, MultiTaskCorpus  # noqa: E402
from .errors import (  # noqa: E402
    BoRAError, CheckpointError, ConfigError, DataError, DataWarning, FitError, FitInterrupted, ModelError, WriteError,
)
from .evaluate import evaluate, evaluate_base  # noqa: E402
from .export import export_peft, merge  # noqa: E402
from .fit import FitResult, fit, paper_lr  # noqa: E402
from .inference_data import to_arviz  # noqa: E402
from .run import RunConfig, load_run, save_run  # noqa: E402
from .task_store import TaskStore  # noqa: E402

__all__ = [
    "Batch", "BoRAError", "CheckpointError", "ConfigError", "DataError", "DataWarning", "FitError", "FitInterrupted",
    "FitResult", "ModelError", "WriteError",
    "MultiTaskCorpus", "MultiTaskLM", "RunConfig", "evaluate", "evaluate_base", "export_peft", "fit",
    "TaskStore", "load_run", "load_tokenizer", "merge", "paper_lr", "save_run", "to_arviz",
]
