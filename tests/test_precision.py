"""bf16 autocast is chosen only where the hardware computes bf16; float32 everywhere else."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from bora_pyro import precision
from bora_pyro.pretrain import BaseModelConfig, fingerprint, resolved

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cpu_features(monkeypatch):
    """Pretend the CPU has exactly the given bf16 instruction sets."""
    monkeypatch.delenv(precision.ENV_OVERRIDE, raising=False)

    def pretend(*features: str) -> None:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: "amx" in features)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: "avx512_bf16" in features)
    return pretend


@pytest.mark.parametrize("features, fast", [((), False), (("avx512_bf16",), True), (("amx",), True),
                                            (("amx", "avx512_bf16"), True)])
def test_bf16_only_on_cpus_that_compute_it(cpu_features, features, fast):
    cpu_features(*features)
    assert precision.bf16_is_fast("cpu") is fast
    assert precision.machine_description("cpu")["cpu_bf16_features"] == list(features)


def test_the_environment_overrides_the_detection(cpu_features, monkeypatch):
    cpu_features()
    monkeypatch.setenv(precision.ENV_OVERRIDE, "1")
    assert precision.bf16_is_fast("cpu")
    cpu_features("amx")
    monkeypatch.setenv(precision.ENV_OVERRIDE, "0")
    assert not precision.bf16_is_fast("cpu")
    monkeypatch.setenv(precision.ENV_OVERRIDE, "yes")
    with pytest.raises(ValueError, match="must be 0 or 1"):
        precision.bf16_is_fast("cpu")


def test_pretraining_decides_bf16_by_the_cpu_and_keys_its_cache_by_it(cpu_features):
    cpu_features()
    without = resolved(BaseModelConfig())
    cpu_features("avx512_bf16")
    with_bf16 = resolved(BaseModelConfig())
    assert (without.bf16, with_bf16.bf16) == (False, True)
    assert resolved(BaseModelConfig(bf16=False)).bf16 is False  # an explicit choice is kept
    assert fingerprint(["a text"], without) != fingerprint(["a text"], with_bf16)


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "examples"))  # the examples import their report module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "examples"))
    return module


@pytest.mark.parametrize("name", ["shakespeare_speakers", "posterior_predictive"])
def test_examples_default_to_the_detected_precision(cpu_features, name):
    example = load_example(name)
    cpu_features()
    assert example.parse_args([]).bf16 is False
    cpu_features("amx")
    assert example.parse_args([]).bf16 is True
    assert example.parse_args(["--no-bf16"]).bf16 is False
