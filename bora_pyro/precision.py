"""Whether bf16 autocast is fast on a device, and what the machine is (for results and timings).

bf16 autocast halves the cost of a matmul only where the hardware computes in bf16: CUDA GPUs
with bf16 support, and CPUs with AMX tiles or the AVX512_BF16 instructions. Elsewhere torch
emulates bf16 on the CPU, and a training step runs ~20× slower than in float32 (measured on an
AVX2-only AMD EPYC: 35.8 s against 1.78 s for a 6×384 GPT-2 step of 16×128 tokens). So the
examples and the base model's pretraining use :func:`bf16_is_fast` as their default, never a
fixed ``True``.

The environment variable ``BORA_PYRO_BF16`` (``1``/``0``) overrides the detection, e.g. to time
the float32 path on a CPU that has bf16.
"""

from __future__ import annotations

import os
import platform

import torch

ENV_OVERRIDE = "BORA_PYRO_BF16"


def cpu_bf16_features() -> list[str]:
    """The bf16 instruction sets torch finds on this CPU (``"amx"``, ``"avx512_bf16"``), or []."""
    checks = {"amx": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
    return [name for name, check in checks.items() if getattr(torch.cpu, check, lambda: False)()]


def bf16_is_fast(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 autocast speeds up a forward/backward pass on ``device``: a CUDA device that
    supports bf16, or a CPU with AMX or AVX512_BF16; ``BORA_PYRO_BF16=1|0`` overrides."""
    override = os.environ.get(ENV_OVERRIDE)
    if override is not None:
        if override not in ("0", "1"):
            raise ValueError(f"{ENV_OVERRIDE} must be 0 or 1, got {override!r}")
        return override == "1"
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(cpu_bf16_features())


def machine_description(device: torch.device | str = "cpu") -> dict:
    """What a timing ran on: processor, cores torch uses, bf16 features, and the device's name."""
    device = torch.device(device)
    return {
        "processor": cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16_features": cpu_bf16_features(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what ``platform`` says)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
