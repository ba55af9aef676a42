"""Checks of the models' call arguments: each bad input is a `ValueError` / `TypeError` naming the argument, its value,
shape or dtype, and the rule, before any computation (so no state, such as the routers' token counts, is touched).

Shapes and dtypes are always checked (they are known on the host). Values (token ids in the vocabulary, 0/1 padding
masks, non-negative positions, label ids) are checked on the device and read back to the host in one transfer, which
stalls an accelerator's queue: on an accelerator that is done for prompts (more than one new token) but not for
one-token decode steps, whose inputs the model itself produced; on CPU always; never while `torch.compile` traces.
Dimension letters: b batch, s new tokens, t keys (cached + new).
References: transformers `masking_utils.py` (2-D padding masks are cast to bool, 4-D masks used as given).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers.cache_utils import Cache

IGNORE_INDEX = -100  # the label of a position without a target (transformers' loss convention)


def count_targets(labels: torch.Tensor) -> torch.Tensor:
    """The next-token targets in unshifted `labels` `[b, s]`: positions 1.. that are not `IGNORE_INDEX`."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def check_model_inputs(
    config,
    input_ids: Any,
    inputs_embeds: Any,
    attention_mask: Any,
    position_ids: Any,
    cache: Any,
    compute_dtype: torch.dtype,
    check_values: bool = True,
    cache_layer: int = 0,
) -> None:
    """The rules of `DeepseekV3Model.forward`'s arguments.

    Args:
        config: the model's `DeepseekV3Config` (vocabulary, hidden size, layers).
        input_ids: `[b, s]` integer ids in `[0, vocab_size)`; or `inputs_embeds` `[b, s, hidden_size]` in
            `compute_dtype` (another dtype only under autocast).
        attention_mask: `[b, t]` padding mask of 1 (token) and 0 (padding), or a prepared 4-D mask
            `[b or 1, 1 or heads, s, t]`, boolean (True = attend) or additive float (0 / -inf).
        position_ids: `[b or 1, s]` non-negative integers.
        cache: a transformers `Cache` holding the same batch, or None.
        compute_dtype: the dtype of the embedding (the model's compute dtype).
        check_values: False: shapes and dtypes only, for inputs the model produced itself (speculative verification
            steps), whose read-back would stall an accelerator every step as a prompt's does once.
        cache_layer: the decoder layer whose cache slot counts the cached tokens (the first one this rank runs: a
            later pipeline stage holds no slot of the first layers).

    Raises:
        TypeError: an argument of the wrong type or dtype.
        ValueError: a wrong shape, a value outside its range, more tokens than a static cache holds.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("give exactly one of input_ids and inputs_embeds")
    if input_ids is not None:
        _require_integer_tensor("input_ids", input_ids)
        if input_ids.dim() != 2 or 0 in input_ids.shape:
            raise ValueError(f"input_ids must be [batch, seq] with batch, seq >= 1, got shape {tuple(input_ids.shape)}")
        (b, s), device = input_ids.shape, input_ids.device
    else:
        _check_inputs_embeds(inputs_embeds, config.hidden_size, compute_dtype)
        (b, s, _), device = inputs_embeds.shape, inputs_embeds.device
    values = DeviceChecks() if check_values and reads_back(s, device) else None
    if input_ids is not None and values is not None:
        outside = (input_ids < 0) | (input_ids >= config.vocab_size)
        values.add(outside.any(), lambda: f"input_ids contains token id {int(input_ids[outside][0])}, outside the "
                                          f"vocabulary [0, {config.vocab_size})")
    past, capacity = _check_cache(cache, b, s, config.num_hidden_layers, compute_dtype, values is not None,
                                  cache_layer)
    if attention_mask is not None:
        _check_attention_mask(attention_mask, b, s, past, capacity, config.num_attention_heads, values)
    if position_ids is not None:
        _check_position_ids(position_ids, b, s, values)
    if values is not None:
        values.run()


def check_causal_lm_inputs(
    input_ids: Any, inputs_embeds: Any, labels: Any, logits_to_keep: Any, vocab_size: int
) -> None:
    """The rules of `DeepseekV3ForCausalLM.forward`'s own arguments (the base model checks the others).

    Args:
        labels: `[b, s]` integer targets in `[0, vocab_size)` or -100 (ignored), unshifted.
        logits_to_keep: an int `n >= 0` (0: all positions, else the last n, at most s), or a 1-D integer tensor of
            positions in `[-s, s)`. With labels every position is needed.

    Raises:
        TypeError: labels or logits_to_keep of the wrong type or dtype.
        ValueError: a wrong shape, a value out of range, labels with logits_to_keep leaving positions out.
    """
    shape = _input_shape(input_ids, inputs_embeds)
    if shape is None:  # malformed inputs: the base model names them
        return
    (b, s), device = shape
    values = DeviceChecks() if reads_back(s, device) else None
    kept = _check_logits_to_keep(logits_to_keep, s, values)
    if labels is not None:
        _check_labels(labels, b, s, kept, logits_to_keep, vocab_size, values)
    if values is not None:
        values.run()


def loss_terms_of_the_model(config: Any, mtp_active: bool) -> list[str]:
    """The terms of the training objective that only the causal LM's forward computes, described for an error."""
    terms = []
    if mtp_active:
        terms.append(f"the MTP loss (use_mtp_modules, num_nextn_predict_layers={config.num_nextn_predict_layers})")
    if config.seq_balance_loss_alpha > 0:
        terms.append(f"the sequence-wise balance loss (seq_balance_loss_alpha={config.seq_balance_loss_alpha})")
    stage = getattr(config, "indexer_training_stage", None)
    if stage is not None:
        terms.append(f"DeepSeek-V3.2's indexer loss (indexer_training_stage={stage!r})")
    return terms


def refuse_a_loss_computed_elsewhere(config: Any, mtp_active: bool) -> None:
    """A training forward given `num_items_in_batch` without labels: Trainer calls the model that way when it computes
    the loss from the logits itself (`label_smoothing_factor > 0`, a `compute_loss_func`). The terms only the model can
    compute would silently leave the objective.

    Raises:
        ValueError: when the objective has an MTP term (`mtp_active`), a balance term (`seq_balance_loss_alpha`) or
            DeepSeek-V3.2's indexer term (`indexer_training_stage`).
    """
    dropped = loss_terms_of_the_model(config, mtp_active)
    if dropped:
        raise ValueError(
            "this training forward got num_items_in_batch but no labels: the loss is computed outside the model "
            "(Trainer does so with label_smoothing_factor > 0 or a compute_loss_func), which would leave out "
            + " and ".join(dropped) + ". Train with label_smoothing_factor=0 and without compute_loss_func, or "
            "switch those terms off (use_mtp_modules=False, seq_balance_loss_alpha=0)"
        )


def refuse_a_bypassed_causal_lm(config: Any, router_logits_asked: bool) -> None:
    """A training forward of the decoder of a `DeepseekV3ForCausalLM` that does not come through the causal LM's
    forward: TRL's trainers (SFT, DPO, GRPO, ...) patch in a "fused LM head" that runs the decoder and scores its
    hidden states with the head's weight themselves. The recipe lives in the causal LM's forward, so the MTP loss, the
    balance loss and the routing counts that drive the bias update would all be lost without a word.

    Raises:
        ValueError: when the config has any of those (naming them and how to keep them), or when router logits are
            asked for (TRL's `output_router_logits` / `router_aux_loss_coef` switch: Mixtral's auxiliary loss over
            softmax routing, which is not DeepSeek-V3's).
    """
    mtp_active = config.num_nextn_predict_layers > 0 and config.use_mtp_modules
    lost = loss_terms_of_the_model(config, mtp_active)
    speed = config.routing_bias_update_speed if config.use_routing_bias else 0.0
    if config.routing_bias_auto_update and speed:
        lost.append(f"the routing-bias update (routing_bias_update_speed={config.routing_bias_update_speed})")
    if router_logits_asked:
        raise ValueError(
            "output_router_logits=True in a training forward that bypasses DeepseekV3ForCausalLM.forward (TRL's "
            "output_router_logits / router_aux_loss_coef switch): it adds Mixtral's auxiliary load-balancing loss over "
            "softmax routing, which is not DeepSeek-V3's. DeepSeek-V3 balances its experts with the routing-bias "
            "update and the sequence-wise balance loss (seq_balance_loss_alpha); leave router_aux_loss_coef unset and "
            "output_router_logits=False"
        )
    if lost:
        raise ValueError(
            "a training forward of the decoder bypassed DeepseekV3ForCausalLM.forward, where the training recipe "
            "lives (TRL's trainers do so: they score the decoder's hidden states with their own fused LM head). It "
            "would lose " + ", ".join(lost) + ". Fine-tune with modeling_deepseek_v3.DeepseekV3SFTTrainer (TRL's "
            "SFTTrainer keeping the recipe), DeepseekV3Trainer or Trainer; or, to train knowingly without them, "
            "switch them off (use_mtp_modules=False, seq_balance_loss_alpha=0, routing_bias_update_speed=0)"
        )


def reads_back(s: int, device: torch.device) -> bool:
    """Whether value checks may read the inputs back to the host (see the module docstring)."""
    return not torch.compiler.is_compiling() and (s > 1 or device.type == "cpu")


class DeviceChecks:
    """Value checks computed on the device and read back to the host together, in one transfer."""

    def __init__(self) -> None:
        self.checks: list[tuple[torch.Tensor, Callable[[], str]]] = []

    def add(self, failed: torch.Tensor, message: Callable[[], str]) -> None:
        """`failed`: a 0-d bool tensor; `message()` is only called (and may read more values) when it is True."""
        self.checks.append((failed, message))

    def run(self) -> None:
        """Raise a `ValueError` with the message of the first failed check."""
        if not self.checks:
            return
        device = self.checks[0][0].device
        failed = torch.stack([flag.to(device) for flag, _ in self.checks]).tolist()
        for flag, (_, message) in zip(failed, self.checks):
            if flag:
                raise ValueError(message())


def _check_labels(labels: Any, b: int, s: int, kept: int, logits_to_keep: Any, vocab_size: int,
                  values: DeviceChecks | None) -> None:
    _require_integer_tensor("labels", labels)
    if tuple(labels.shape) != (b, s):
        raise ValueError(f"labels has shape {tuple(labels.shape)}, expected [batch, seq] = {(b, s)} like the inputs")
    if kept != s:
        raise ValueError(f"labels cover {s} positions but logits_to_keep={logits_to_keep!r} keeps logits for {kept}; "
                         "pass logits_to_keep=0 to train")
    if values is not None:
        bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size))
        values.add(bad.any(), lambda: f"labels contains {int(labels[bad][0])}, neither a token id in "
                                      f"[0, {vocab_size}) nor {IGNORE_INDEX} (ignored)")


def _require_tensor(name: str, value: Any) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _require_integer_tensor(name: str, value: Any) -> None:
    _require_tensor(name, value)
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got dtype {value.dtype}")


def _input_shape(input_ids: Any, inputs_embeds: Any) -> tuple[tuple[int, int], torch.device] | None:
    x = input_ids if input_ids is not None else inputs_embeds
    if not isinstance(x, torch.Tensor) or x.dim() != (2 if x is input_ids else 3):
        return None
    return (x.shape[0], x.shape[1]), x.device


def _check_inputs_embeds(inputs_embeds: Any, hidden_size: int, compute_dtype: torch.dtype) -> None:
    _require_tensor("inputs_embeds", inputs_embeds)
    shape = tuple(inputs_embeds.shape)
    if len(shape) != 3 or shape[-1] != hidden_size or 0 in shape:
        raise ValueError(f"inputs_embeds must be [batch, seq, hidden_size={hidden_size}] with batch, seq >= 1, got "
                         f"shape {shape}")
    if not inputs_embeds.is_floating_point():
        raise TypeError(f"inputs_embeds must be floating point, got dtype {inputs_embeds.dtype}")
    autocast = torch.is_autocast_enabled(inputs_embeds.device.type)
    if inputs_embeds.dtype != compute_dtype and not autocast:
        raise TypeError(f"inputs_embeds has dtype {inputs_embeds.dtype} but the model computes in {compute_dtype}; "
                        f"cast it first (inputs_embeds.to({compute_dtype}))")


def _check_cache(
    cache: Any, b: int, s: int, num_layers: int, compute_dtype: torch.dtype, read_back: bool, cache_layer: int
) -> tuple[int | None, int]:
    """`(cached tokens, capacity)`: cached tokens None when a static cache counts them on the device and they may not
    be read back; capacity -1 for a cache that grows."""
    if cache is None:
        return 0, -1
    if not isinstance(cache, Cache):
        raise TypeError(f"cache must be a transformers Cache (such as MLACache), got {type(cache).__name__}")
    fixed_layers = getattr(cache, "layer_class_to_replicate", None) is None  # a replicating cache grows its layers
    if fixed_layers and len(cache.layers) < num_layers:
        raise ValueError(f"cache has {len(cache.layers)} layers but the model has num_hidden_layers = {num_layers}; "
                         "it belongs to another model")
    filled = next((layer for layer in cache.layers if layer.is_initialized and layer.keys is not None), None)
    if filled is not None:
        keys = filled.keys
        if keys.shape[0] != b:
            raise ValueError(f"cache holds {keys.shape[0]} sequences but the inputs have batch {b}")
        rope = filled.values  # k_pe, in the model's dtype in every cache (an FP8 cache quantises c_kv only)
        if rope.dtype != compute_dtype and not torch.is_autocast_enabled(keys.device.type):
            raise TypeError(f"cache holds {rope.dtype} latents but the model computes in {compute_dtype}; it belongs "
                            "to a model of another dtype")
    past = cache.get_seq_length(cache_layer)
    if not isinstance(past, int):  # a static cache counts its tokens in a tensor
        if not read_back:
            return None, -1
        past = int(past)
    capacity = max((layer.get_max_length() for layer in cache.layers), default=-1)
    if capacity > 0 and past + s > capacity:
        raise ValueError(
            f"the cache holds at most {capacity} tokens; it has {past} and {s} more were given. Allocate a "
            "larger static cache (max_cache_len) or use the default dynamic MLACache"
        )
    return past, capacity


def _check_attention_mask(
    mask: Any, b: int, s: int, past: int | None, capacity: int, heads: int, values: DeviceChecks | None
) -> None:
    _require_tensor("attention_mask", mask)
    shape = tuple(mask.shape)
    if mask.dim() == 2:
        if past is not None and shape != (b, past + s):
            raise ValueError(f"attention_mask has shape {shape}, expected [batch, cached + new tokens] = "
                             f"{(b, past + s)}")
        if values is not None:
            bad = (mask != 0) & (mask != 1)
            values.add(bad.any(), lambda: (
                f"a 2-D attention_mask is a padding mask of 1 (token) and 0 (padding), but it holds "
                f"{mask[bad][0].item()}. An additive mask (0 = attend, -inf = masked) must be given 4-D, "
                "[batch, 1, seq, keys]"
            ))
    elif mask.dim() == 4:
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(f"a 4-D attention_mask must be boolean (True = attend) or additive floating point "
                            f"(0 / -inf), got dtype {mask.dtype}")
        keys = capacity if capacity > 0 else None if past is None else past + s
        if (
            shape[0] not in (1, b)
            or shape[1] not in (1, heads)
            or shape[2] != s
            or (keys is not None and shape[3] != keys)
        ):
            expected = f"[{b} or 1, 1 or {heads}, {s}, {keys if keys is not None else 'keys'}]"
            raise ValueError(f"a 4-D attention_mask must be [batch, heads, seq, keys] = {expected}, got shape {shape}")
    else:
        raise ValueError(f"attention_mask must be 2-D [batch, cached + new tokens] (1 = token, 0 = padding) or a "
                         f"prepared 4-D mask [batch, 1, seq, keys], got shape {shape}")


def _check_position_ids(position_ids: Any, b: int, s: int, values: DeviceChecks | None) -> None:
    _require_integer_tensor("position_ids", position_ids)
    shape = tuple(position_ids.shape)
    if position_ids.dim() != 2 or shape[0] not in (1, b) or shape[1] != s:
        raise ValueError(f"position_ids must be [batch, seq] = {(b, s)} (or [1, {s}], shared), got shape {shape}")
    if values is not None:
        values.add((position_ids < 0).any(),
                   lambda: f"position_ids contains {int(position_ids.min())}; positions must be >= 0")


def _check_logits_to_keep(logits_to_keep: Any, s: int, values: DeviceChecks | None) -> int:
    """The number of positions whose logits are computed."""
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, (int, torch.Tensor)):
        raise TypeError(f"logits_to_keep must be an int or a 1-D integer tensor, got {logits_to_keep!r}")
    if isinstance(logits_to_keep, int):
        if not 0 <= logits_to_keep <= s:
            raise ValueError(f"logits_to_keep = {logits_to_keep} is invalid: it must be 0 (all positions) or the "
                             f"number of last positions to keep, at most the {s} given")
        return logits_to_keep or s
    _require_integer_tensor("logits_to_keep", logits_to_keep)
    if logits_to_keep.dim() != 1:
        raise ValueError(f"logits_to_keep as a tensor must be 1-D positions, got shape {tuple(logits_to_keep.shape)}")
    if values is not None:
        outside = (logits_to_keep < -s) | (logits_to_keep >= s)
        values.add(outside.any(), lambda: f"logits_to_keep contains position {int(logits_to_keep[outside][0])}, "
                                          f"outside [-{s}, {s})")
    return logits_to_keep.numel()
