"""Text from task adapters with Hugging Face ``generate()``: greedy, sampling, beam search.

``generate()`` expands its batch: each prompt becomes ``num_beams`` rows for beam search, and
``num_return_sequences`` rows for sampling, as consecutive copies. Each adapted layer picks a
row's factors by its task index, so those indices must expand the same way at every forward
pass: :func:`task_adapters` does it with a forward pre-hook on the model, and the KV cache keeps
working (the factors never change within a generation).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from .adapted_lm import Factors, MultiTaskLM
from .errors import ConfigError


@contextlib.contextmanager
def task_adapters(lm: MultiTaskLM, factors: Factors, prompt_tasks: torch.Tensor) -> Iterator[None]:
    """Like :meth:`MultiTaskLM.adapters`, for any forward pass on k·P rows where P =
    ``len(prompt_tasks)``: row ``i`` uses task ``prompt_tasks[i // k]`` (each prompt's k copies
    are consecutive, as ``generate()`` makes them)."""
    def expand(module, args, kwargs):
        inputs = kwargs.get("input_ids")
        if inputs is None:
            inputs = args[0] if args else kwargs["inputs_embeds"]
        copies, leftover = divmod(inputs.shape[0], len(prompt_tasks))
        if leftover:
            raise ConfigError(f"a forward pass on {inputs.shape[0]} rows cannot share out {len(prompt_tasks)} "
                              "prompts' tasks: pass one task per prompt")
        row_tasks = prompt_tasks.repeat_interleave(copies)
        for name, layer in lm.layers.items():
            layer.set_adapters(*factors[name], row_tasks)

    with lm.adapters(factors, prompt_tasks):
        handle = lm.model.register_forward_pre_hook(expand, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()


@torch.no_grad()
def generate(lm: MultiTaskLM, tokenizer, factors: Factors, prompts: Sequence[str], prompt_tasks: Sequence[int],
             **generate_kwargs) -> list[list[str]]:
    """Continue each prompt with its task's adapter.

    Args:
        factors: module name → (lora_A [T, r, in], lora_B [T, out, r]), e.g. a guide's posterior
            mean (``model.task_factors(guide.median())``) or one posterior draw.
        prompts: P texts; tokenised as the training documents were (special tokens included).
        prompt_tasks: P indices into the factors' first dim.
        generate_kwargs: ``transformers`` generation flags (``max_new_tokens``, ``do_sample``,
            ``temperature``, ``top_k``, ``top_p``, ``num_beams``, ``num_return_sequences``, …).

    Returns:
        Per prompt, its ``num_return_sequences`` texts (prompt included), decoded without
        special tokens.
    """
    if len(prompts) != len(prompt_tasks):
        raise ConfigError(f"{len(prompts)} prompts but {len(prompt_tasks)} tasks: give one task per prompt")
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # a decoder continues from the last position of every row
    try:
        encoded = tokenizer(list(prompts), return_tensors="pt", padding=True).to(lm.device)
    finally:
        tokenizer.padding_side = padding_side
    if encoded["input_ids"].shape[1] == 0:
        raise ConfigError("the prompt is empty (it has no tokens): give it some text to continue")
    tasks = torch.as_tensor(list(prompt_tasks), dtype=torch.long, device=lm.device)
    with task_adapters(lm, factors, tasks):
        output = lm.model.generate(**encoded, pad_token_id=tokenizer.pad_token_id, **generate_kwargs)
    texts = tokenizer.batch_decode(output, skip_special_tokens=True)
    per_prompt = len(texts) // len(prompts)
    return [texts[i * per_prompt:(i + 1) * per_prompt] for i in range(len(prompts))]
