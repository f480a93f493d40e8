"""Memory of a BoRA fit on a big base: base weights + k floats per adapter parameter × (D + 1).

    python benchmarks/memory_model.py                 # the README's table: D = 25, r = 16
    python benchmarks/memory_model.py --tasks 100 --rank 8

The bases are built from their published configs on the meta device (no weights, nothing
downloaded), wrapped in :class:`~bora_pyro.MultiTaskLM` with the default target modules (every
linear map of attention and MLP), and their parameters counted. Per process (every process of a
data-parallel fit holds all of it), excluding activations, which depend on batch, length and
gradient checkpointing:

- base: its parameters × 2 bytes (``--base-dtype bfloat16``);
- MAP (AutoDelta): Θ and every θ_d as float32 parameters, and Adam's two moments: k = 3;
- mean-field (AutoNormal): a location and a scale each, and their Adam moments: k = 6
  (``benchmarks/step_time.py`` measures 6.85 at peak on the CPU, with the step's temporaries);
- plus, per step, gradients (and for mean-field draws) of the batch's tasks only, ≤ B + 1 adapters.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from bora_pyro import MultiTaskLM

GB = 1e9
BASES = {
    "Qwen2.5-0.5B": lambda: Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                         tie_word_embeddings=True),
    "Llama-2-7B": lambda: LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
    "Llama-2-70B": lambda: LlamaConfig(vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                                       num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8),
}
FLOATS_PER_PARAMETER = {"map": 3, "mean-field": 6}


def counts(make_config, rank: int) -> tuple[int, int]:
    """(base parameters, adapter parameters of one task) of a base built on the meta device."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(make_config())
    base = sum(p.numel() for p in model.parameters())
    return base, MultiTaskLM(model, rank=rank, alpha=2 * rank).num_adapter_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=25, help="D")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank r")
    parser.add_argument("--batch-size", type=int, default=8, help="B: adapters with gradients per step ≤ B + 1")
    args = parser.parse_args()
    adapters = args.tasks + 1  # θ_1..θ_D and Θ
    print(f"D = {args.tasks}, r = {args.rank}, base in bf16, float32 adapters; GB = 1e9 bytes\n")
    print("| base | base params | base GB | adapter params per task | MAP GB (k=3) | mean-field GB (k=6) "
          "| per step: the batch's ≤ B+1 adapters' gradients GB | total MAP / mean-field (gradients and draws) GB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, make_config in BASES.items():
        base, per_task = counts(make_config, args.rank)
        base_gb = 2 * base / GB
        guide_gb = {guide: 4 * k * adapters * per_task / GB for guide, k in FLOATS_PER_PARAMETER.items()}
        step_gb = 4 * (args.batch_size + 1) * per_task / GB
        print(f"| {name} | {base / 1e9:.2f}B | {base_gb:.1f} | {per_task / 1e6:.1f}M | {guide_gb['map']:.1f} "
              f"| {guide_gb['mean-field']:.1f} | {step_gb:.1f} | {base_gb + guide_gb['map'] + step_gb:.1f} / "
              f"{base_gb + guide_gb['mean-field'] + 2 * step_gb:.1f} |")


if __name__ == "__main__":
    main()
