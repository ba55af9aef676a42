"""The rule that every rank computing on one batch (the tensor- and pipeline-parallel ranks, among which expert
parallelism's all-reduce dispatch runs) receives the same inputs, checked at every prompt.

Ranks given different prompts would otherwise exchange partial results of different sequences (tokens that belong to
neither prompt) or, with different lengths, abort in a collective of mismatched sizes. The check gathers a summary of
fixed size from each rank (the shape and two integer checksums of each input), so that it cannot itself mismatch,
and raises the same `ValueError` on every rank. It runs at prompts (more than one new token, or the first forward
into an empty cache), not at one-token decode steps nor speculative verification steps, whose inputs the model
produced itself: decoding gets no extra collective.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from transformers.cache_utils import Cache

# the inputs of `DeepseekV3Model.forward` that decide what the ranks compute
FIELDS = ("input_ids", "inputs_embeds", "attention_mask", "position_ids")
MAX_DIMS = 4  # a prepared attention mask has 4
NOT_A_TENSOR = -1  # in a field's number of dimensions; 0: not given
# per field: number of dimensions, the shape padded to MAX_DIMS, the sum and the position-weighted sum of its values
FIELD_SIZE = 1 + MAX_DIMS + 2
WEIGHT_PERIOD = 65521  # position weights 1 .. WEIGHT_PERIOD: a swap of two values changes the weighted sum
_INTEGER_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def check_inputs_at_prompts(forward: Callable, group: dist.ProcessGroup | None, cache_layer: int,
                            device: Callable[[], torch.device]) -> Callable:
    """`forward` (a decoder's, with `DeepseekV3Model.forward`'s arguments) preceded, at prompts, by
    `check_same_inputs` over `group`. `cache_layer`: the first decoder layer this rank runs, whose cache slot tells an
    empty cache; `device()`: where the summaries are gathered (the model's device)."""

    def run(input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None, **kwargs):
        given = cache if cache is not None else kwargs.get("past_key_values")
        tokens = input_ids if inputs_embeds is None else inputs_embeds
        if kwargs.get("check_values", True) and is_prompt(tokens, given, cache_layer):
            check_same_inputs(dict(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   position_ids=position_ids), group, device())
        if cache is not None:
            kwargs["cache"] = cache
        return forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       inputs_embeds=inputs_embeds, **kwargs)

    return run


def is_prompt(tokens: Any, cache: Any, cache_layer: int) -> bool:
    """Whether a forward reads a prompt: more than one new token, or the first forward (no cache, or an empty one).
    Malformed tokens count as a prompt (the gathered check runs, then the model names what is wrong); a static cache,
    which counts its tokens on the device, is not read back for a one-token step."""
    if torch.compiler.is_compiling():
        return False
    if not isinstance(tokens, torch.Tensor) or tokens.dim() < 2:
        return True
    if tokens.shape[1] > 1 or cache is None:
        return True
    if not isinstance(cache, Cache):  # the paged cache of continuous batching: a one-token step is a decode step
        return False
    cached = cache.get_seq_length(cache_layer)
    return isinstance(cached, int) and cached == 0


def check_same_inputs(inputs: dict[str, Any], group: dist.ProcessGroup | None, device: torch.device) -> None:
    """Raise the same `ValueError` on every rank of `group` unless all got the same `inputs` (the `FIELDS`): equal
    shapes and checksums. One all-gather of a small int64 tensor; every rank of `group` must call it."""
    local = summarize(inputs).to(device)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    summaries = [row.tolist() for row in torch.stack(gathered).cpu()]
    if any(summary != summaries[0] for summary in summaries[1:]):
        raise ValueError(mismatch_message(summaries, dist.get_process_group_ranks(group or dist.group.WORLD)))


def summarize(inputs: dict[str, Any]) -> torch.Tensor:
    """`[len(FIELDS) * FIELD_SIZE]` int64, on the host: per field its number of dimensions (0 when not given,
    `NOT_A_TENSOR`), its shape and two checksums of its values (of their bits for floating-point tensors)."""
    parts = []
    for name in FIELDS:
        value = inputs.get(name)
        if not isinstance(value, torch.Tensor) or value.dim() > MAX_DIMS or value.is_complex():
            head = [0 if value is None else NOT_A_TENSOR]
            parts.append(torch.tensor(head + [0] * (FIELD_SIZE - 1)))
            continue
        values = value.detach().reshape(-1)
        if values.is_floating_point():  # exact: the same values have the same bits
            values = values.view(_INTEGER_OF_SIZE[values.element_size()])
        values = values.long()
        weights = torch.arange(values.numel(), device=values.device) % WEIGHT_PERIOD + 1
        checksums = torch.stack([values.sum(), (values * weights).sum()]).cpu()
        shape = [value.dim(), *value.shape, *[0] * (MAX_DIMS - value.dim())]
        parts.append(torch.cat([torch.tensor(shape), checksums]))
    return torch.cat(parts)


def mismatch_message(summaries: list[list[int]], ranks: list[int]) -> str:
    """The error for gathered `summaries` that differ, naming each rank's input shapes and what differs."""

    def field(summary: list[int], i: int) -> list[int]:
        return summary[i * FIELD_SIZE : (i + 1) * FIELD_SIZE]

    def described(summary: list[int]) -> str:
        shown = []
        for i, name in enumerate(FIELDS):
            dims, *rest = field(summary, i)
            if dims == NOT_A_TENSOR:
                shown.append(f"{name} (not a tensor of at most {MAX_DIMS} dimensions)")
            elif dims > 0:
                shown.append(f"{name} of shape {tuple(rest[:dims])}")
        return ", ".join(shown) or "no inputs"

    differing = []
    for i, name in enumerate(FIELDS):
        fields = [field(summary, i) for summary in summaries]
        if any(f[: 1 + MAX_DIMS] != fields[0][: 1 + MAX_DIMS] for f in fields):
            differing.append(f"{name} differ in shape")
        elif any(f != fields[0] for f in fields):
            differing.append(f"{name} differ in value (their checksums differ)")
    per_rank = "; ".join(f"rank {rank}: {described(summary)}" for rank, summary in zip(ranks, summaries))
    return (
        "under tensor, expert and pipeline parallelism every rank computing on one batch must receive the same "
        f"inputs (under FSDP each rank may have its own), but across ranks {ranks} {' and '.join(differing)}: "
        f"{per_rank}"
    )
