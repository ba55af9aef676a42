"""Continuous batching of `DeepseekV3ForCausalLM` through transformers' manager and scheduler, over the paged latent
cache.

`generate_batch`, `generate(cache_implementation="paged")` and `continuous_batching_context_manager` all build their
manager with `init_continuous_batching`. `ContinuousBatchingMixin` overrides it to hand that manager a batch processor
whose cache is a `PagedLatentCache` (transformers' own would hold per-head keys and values) and whose scheduler
fails alone each request it cannot run (a bad prompt, or one the pool could never hold); a workload announced longer
than the pool, and generation options that continuous batching does not implement, are refused before anything runs.
`generate_batch` sizes an unsized pool for its requests, and the paged `generate` runs each row as its own request.
Each forward then gets a `PagedBatch`, the layout of its flat batch that every layer's attention shares.

References: docs/design.md (Continuous batching); transformers `generation/continuous_batching/continuous_api.py`.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from math import ceil

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig, GenerationMixin
from transformers.generation.continuous_batching import ContinuousBatchingManager, PagedAttentionCache, RequestStatus

from .batch_requests import check_generation_options, check_prompt_types, num_draft_tokens, prompt_refusal
from .latent_fp8 import check_cache_dtype, latent_cache_options
from .paged_attention import PagedBatch
from .paged_cache import PagedLatentCache, PagedLatentCacheWithDrafter
from .private_api import (
    batch_processor_with,
    default_max_batch_tokens,
    discard_unstarted_manager,
    prepare_generation_config,
    scheduler_classes,
)
from .speculative_batching import SpeculativeBatchProcessor

# the arguments of `generate(cache_implementation="paged")` beside the generation-config fields and the batching config
PAGED_GENERATE_ARGUMENTS = ("input_ids", "attention_mask")


class ContinuousBatchingMixin(GenerationMixin):
    """The continuous-batching entry points of the causal LM over the paged latent cache."""

    @torch.no_grad()
    def init_continuous_batching(self, generation_config=None, continuous_batching_config=None, workload_hints=None):
        """transformers' continuous-batching manager (behind `generate_batch`, `generate(cache_implementation="paged")`
        and `continuous_batching_context_manager`) over a paged cache whose pages hold only the MLA latent of each
        token; its batch processor (and pool) exists from now on.

        Example:
            >>> outputs = model.generate_batch(prompts, generation_config=GenerationConfig(max_new_tokens=32),
            ...                                continuous_batching_config=ContinuousBatchingConfig(num_blocks=64))

        Raises:
            ValueError: when the generation config sets an option continuous batching does not implement (or, for
                DeepSeek-V3.2, FP8 pages) before any manager exists; or when
                `workload_hints` (set by `generate_batch`) announce a request longer than the pool: the manager is
                then discarded and the model left as it was.
        """
        # transformers writes eos_token_id=-1 into a config without one: the caller's config (or the model's, which
        # save_pretrained would then write) stays as it was
        generation_config = copy.deepcopy(self.generation_config if generation_config is None else generation_config)
        check_generation_options(generation_config)
        options = latent_cache_options(generation_config)  # cache_config's cache_dtype / scale_fmt: FP8 pages
        # before any manager exists (FP8 pages are refused for DeepSeek-V3.2)
        check_cache_dtype(options.get("cache_dtype"), options.get("scale_fmt"), self.config)
        drafts = 0
        if generation_config.use_mtp:
            drafts = num_draft_tokens(generation_config, len(getattr(self, "mtp", ())))
            continuous_batching_config = self._drafting_batching_config(continuous_batching_config)
        manager = super().init_continuous_batching(generation_config, continuous_batching_config, workload_hints)
        if manager.batch_processor is None:
            manager.batch_processor = _batch_processor_over_latent_pages(manager, options, drafts)
        if workload_hints is not None:
            refusal = too_long_for_pool(
                manager.batch_processor.cache, workload_hints.max_prompt_length, workload_hints.max_generated_length
            )
            if refusal is not None:
                discard_unstarted_manager(manager)
                raise ValueError(refusal)
        return manager

    def _drafting_batching_config(self, cb_config: ContinuousBatchingConfig | None) -> ContinuousBatchingConfig:
        """A copy of `cb_config` (or of transformers' defaults) for MTP drafting: synchronous steps (a step's drafts
        need the previous step's tokens), no prefix sharing (a shared block would lack the MTP module's rows of the
        request that found it).

        Raises:
            ValueError: when the model has no active MTP module, or `cb_config` asks for asynchronous batching.
        """
        if not getattr(self, "mtp_active", False):
            raise ValueError(
                "use_mtp=True drafts with MTP module 1, but this model has none active (num_nextn_predict_layers="
                f"{self.config.num_nextn_predict_layers}, use_mtp_modules={self.config.use_mtp_modules})"
            )
        cb_config = cb_config if cb_config is not None else ContinuousBatchingConfig()
        if cb_config.use_async_batching:
            raise ValueError("use_mtp=True with use_async_batching=True: a step's drafts need the tokens of the step "
                             "before; leave use_async_batching unset or False")  # fmt: skip
        return dataclasses.replace(cb_config, use_async_batching=False, allow_block_sharing=False)

    @torch.no_grad()
    def generate_batch(self, inputs: list[list[int]], generation_config: GenerationConfig | None = None,
                       continuous_batching_config: ContinuousBatchingConfig | None = None,
                       record_timestamps: bool = False, progress_bar: bool = False, persistent_manager: bool = False,
                       warmup: bool = True, **kwargs) -> dict:  # fmt: skip
        """transformers' `generate_batch`: request id ("req_0", ... in the order of `inputs`) to its
        `GenerationOutput`. Generation-config fields given as keywords (`max_new_tokens=16`, `do_sample=True`, ...)
        apply over `generation_config`, completed like `generate()` with the model's generation config.

        A request whose prompt is empty or holds an id outside the vocabulary fails alone: its output carries the
        error (naming the request, the token and the rule) and the other requests run. Without `num_blocks` (and
        `max_memory_percent`) in `continuous_batching_config`, the pool holds all the requests at once: their tokens
        rounded up to pages, not a share of free memory.

        Raises:
            TypeError: when `inputs` is not a list of lists of int token ids.
            ValueError: for a keyword that is not a generation-config field (or `num_draft_tokens`), an option
                continuous batching does not implement (`num_beams > 1`, `min_new_tokens`, `use_mtp` with sampling,
                ...), no `max_new_tokens`, or a request longer than a given pool; all before a manager exists.
        """
        check_prompt_types(inputs)
        generation_config, others = self._generation_options(generation_config, kwargs)
        unknown = sorted(name for name, value in others.items() if value is not None)
        if unknown:
            raise ValueError(f"generate_batch does not take {', '.join(unknown)}: its keywords are "
                             "generation-config fields (max_new_tokens, do_sample, temperature, ...)")  # fmt: skip
        check_generation_options(generation_config, needs_max_new_tokens=True)
        if not inputs:
            return {}
        continuous_batching_config = pool_for_requests(
            continuous_batching_config, inputs, generation_config.max_new_tokens, generation_config.num_return_sequences
        )
        return super().generate_batch(inputs, generation_config, continuous_batching_config, record_timestamps,
                                      progress_bar, persistent_manager, warmup)  # fmt: skip

    def generate(self, inputs: torch.Tensor | None = None, generation_config: GenerationConfig | None = None, **kwargs):
        """`generate()`; with `cache_implementation="paged"`, each row runs as a request of continuous batching
        (`generate_batch`), and the result is laid out as transformers' paged `generate` does: `[1, rows, tokens]`,
        each row its prompt as given, then its new tokens, padded on the right with `pad_token_id` (else the first
        EOS id) to the longest, as `generate()` pads rows that stopped early. An `attention_mask` with left padding
        takes each row's padding out of its request (a row runs as it would alone).

        Raises:
            ValueError: with `cache_implementation="paged"`, for an argument it does not take (`logits_processor`,
                `streamer`, ...), an `attention_mask` that is not left padding of `input_ids`' shape, an option
                `generate_batch` refuses, or a row that fails as a request (its error).
        """
        if kwargs.get("cache_implementation", getattr(generation_config, "cache_implementation", None)) != "paged":
            return super().generate(inputs, generation_config, **kwargs)
        kwargs.pop("cache_implementation", None)
        cb_config = kwargs.pop("continuous_batching_config", None)
        generation_config, others = self._generation_options(generation_config, kwargs)
        unknown = sorted(name for name, value in others.items()
                         if name not in PAGED_GENERATE_ARGUMENTS and value is not None)  # fmt: skip
        if unknown:
            raise ValueError(f"generate(cache_implementation='paged') does not take {', '.join(unknown)}: it runs "
                             "through continuous batching, which applies the generation config only")  # fmt: skip
        ids = inputs if inputs is not None else others.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() not in (1, 2):
            raise ValueError(f"generate(cache_implementation='paged') needs input_ids as a 1-D or 2-D tensor, got "
                             f"{type(ids).__name__}{'' if ids is None else f' of shape {tuple(ids.shape)}'}")
        ids = ids.reshape(-1, ids.shape[-1])
        if generation_config.max_new_tokens is None:  # as generate(): max_length counts the (padded) prompt
            if generation_config.max_length <= ids.shape[1]:
                raise ValueError(f"max_length={generation_config.max_length} leaves no new token after input_ids of "
                                 f"length {ids.shape[1]}: set max_new_tokens")  # fmt: skip
            generation_config.max_new_tokens = generation_config.max_length - ids.shape[1]
        prompts = unpadded_rows(ids, others.get("attention_mask"))
        outputs = list(self.generate_batch(prompts, generation_config, cb_config).values())
        failed = [output.error for output in outputs if output.error is not None]
        if failed:
            raise ValueError(f"generate(cache_implementation='paged'): {len(failed)} of {len(outputs)} requests "
                             f"failed: {'; '.join(failed)}")  # fmt: skip
        if len(outputs) != len(prompts) * generation_config.num_return_sequences:
            raise RuntimeError("generate(cache_implementation='paged'): the continuous batching loop stopped before "
                               f"every row finished ({len(outputs)} of {len(prompts)} returned)")  # fmt: skip
        rows = [ids[i // generation_config.num_return_sequences].tolist() + output.generated_tokens
                for i, output in enumerate(outputs)]  # fmt: skip
        return torch.tensor(right_padded(rows, generation_config), device=ids.device).unsqueeze(0)

    def _generation_options(self, generation_config: GenerationConfig | None,
                            kwargs: dict) -> tuple[GenerationConfig, dict]:  # fmt: skip
        """A copy of `generation_config` with the generation-config fields among `kwargs` set, completed as
        `generate()` completes it (the model's generation config, then the defaults); and the other `kwargs`.
        transformers warns that passing both a config and fields is deprecated: for `generate_batch` it is the API."""
        config = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
        if "num_draft_tokens" in kwargs:  # ours, not a field transformers declares: `update` would not set it
            config.num_draft_tokens = kwargs.pop("num_draft_tokens")
        others = config.update(**kwargs)
        return prepare_generation_config(self, config, {})[0], others

    @contextmanager
    def continuous_batching_context_manager(self, *args, **kwargs) -> Iterator[ContinuousBatchingManager]:
        """transformers' context manager (behind `generate_batch` and `generate(cache_implementation="paged")`), run
        in eval mode and leaving the model in the mode it found: transformers' manager switches the model to eval()
        for good, which would silently stop a training loop's bias updates and balance loss."""
        was_training = self.training
        self.eval()  # a cached (persistent) manager does not switch it again
        try:
            with super().continuous_batching_context_manager(*args, **kwargs) as manager:
                yield manager
        finally:
            self.train(was_training)


def too_long_for_pool(cache: PagedLatentCache, prompt_length: int, max_new_tokens: int | None) -> str | None:
    """Why a request of `prompt_length` tokens generating up to `max_new_tokens` (None: no limit) can never fit in the
    pool of `cache`, or None when it can. The scheduler caches every token it feeds: the prompt and all new tokens
    but the last."""
    needed = prompt_length + max((max_new_tokens or 0) - 1, 0)
    if needed <= cache.max_request_tokens():
        return None
    return (
        f"continuous batching: a request of {prompt_length} prompt tokens and max_new_tokens={max_new_tokens} needs "
        f"{needed} cached tokens, but the paged cache holds at most {cache.max_request_tokens()} per request "
        f"({cache.allocator.num_blocks} blocks of page_size {cache.allocator.tokens_per_page}); raise num_blocks in "
        "the ContinuousBatchingConfig or shorten the request"
    )


def pool_for_requests(cb_config: ContinuousBatchingConfig | None, inputs: list[list[int]], max_new_tokens: int,
                      num_return_sequences: int) -> ContinuousBatchingConfig:  # fmt: skip
    """`cb_config` for `generate_batch`, or, when it sets neither `num_blocks` nor `max_memory_percent`, a copy of it
    (or of transformers' defaults) whose pool holds every request at once (each request's cached tokens rounded up to
    pages, once per returned sequence) and whose steps are no longer than all the prompts together: transformers would
    size both from free memory (60 % of the RAM on a CPU) whatever the requests need."""
    cb_config = cb_config if cb_config is not None else ContinuousBatchingConfig()
    if cb_config.num_blocks is not None or cb_config.max_memory_percent is not None:
        return cb_config
    page = cb_config.page_size
    num_blocks = sum(ceil(max(len(prompt) + max_new_tokens - 1, 1) / page) for prompt in inputs) * num_return_sequences
    max_batch_tokens = cb_config.max_batch_tokens
    if max_batch_tokens is None:  # every prompt at once, or one decoding token per request
        needed = max(sum(len(prompt) for prompt in inputs), len(inputs)) * num_return_sequences
        max_batch_tokens = min(default_max_batch_tokens(), needed)
    return dataclasses.replace(cb_config, num_blocks=num_blocks, max_batch_tokens=max_batch_tokens)


def unpadded_rows(ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[list[int]]:
    """The rows of `ids` `[b, s]` without their left padding (the zeros of `attention_mask`, if given).

    Raises:
        ValueError: when `attention_mask` is not `ids`' shape, or a row's zeros are not all before its ones.
    """
    if attention_mask is None:
        return ids.tolist()
    mask = attention_mask.reshape(-1, attention_mask.shape[-1]) if attention_mask.dim() == 1 else attention_mask
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)} must have input_ids' shape "
                         f"{tuple(ids.shape)}")  # fmt: skip
    rows = []
    for i, (row, keep) in enumerate(zip(ids.tolist(), mask.tolist())):
        start = next((j for j, value in enumerate(keep) if value != 0), len(keep))  # the first kept token
        if any(value != 1 for value in keep[start:]):
            raise ValueError(f"attention_mask row {i} = {keep} is not left padding (zeros, then ones): "
                             "cache_implementation='paged' takes each row's padding out of its request, which needs "
                             "the padding on the left")  # fmt: skip
        rows.append(row[start:])
    return rows


def right_padded(rows: list[list[int]], generation_config: GenerationConfig) -> list[list[int]]:
    """`rows` padded on the right to the longest with `pad_token_id`, else the first EOS id, as `generate()` pads."""
    longest = max(len(row) for row in rows)
    pad = generation_config.pad_token_id
    if pad is None:
        eos = generation_config.eos_token_id
        pad = eos[0] if isinstance(eos, list) else eos
    if pad is None and any(len(row) < longest for row in rows):
        raise ValueError("rows ended at different lengths with neither pad_token_id nor eos_token_id to pad them")
    return [row + [pad] * (longest - len(row)) for row in rows]


class RefusesBadRequests:
    """Mixed into transformers' schedulers: a request whose prompt cannot run (empty, or not token ids of the
    vocabulary) or that the pool could never hold is refused when it arrives. transformers fails that request alone
    with the error in its output (its other requests go on), where the bad prompt would otherwise fail the forward of
    the whole batch and stop the loop, and a request too long for the pool would stall it ("No requests can be
    scheduled")."""

    cache: PagedLatentCache

    def add_waiting_request(self, state) -> None:
        refusal = prompt_refusal(state.request_id, state.initial_tokens, self.cache.config.vocab_size)
        if refusal is None:
            refusal = too_long_for_pool(self.cache, len(state.initial_tokens), state.max_new_tokens)
        if refusal is not None:
            raise ValueError(refusal)
        super().add_waiting_request(state)


class KeepsDraftsOfDecodingRequests:
    """Mixed into transformers' schedulers under MTP drafting: a decoding request with more query tokens (its newest
    and its drafts) than the step's token budget keeps the drafts that fit, where transformers would split it as a
    prompt and carry the rest over as prompt tokens."""

    def _schedule_request(self, state, request_tokens, token_budget, request_ids_to_remove_from_waiting) -> None:
        if state.status == RequestStatus.DECODING:
            state.tokens_to_process = request_tokens[:token_budget]
            return
        super()._schedule_request(state, request_tokens, token_budget, request_ids_to_remove_from_waiting)


def paged_batch(cache: PagedAttentionCache, cb_kwargs: dict, dtype: torch.dtype) -> PagedBatch:
    """The layout of one continuous-batching forward over `cache` (see `PagedBatch`).

    Raises:
        ValueError: when `cache` is transformers' own paged cache (sized for per-head keys), not a `PagedLatentCache`.
    """
    if not isinstance(cache, PagedLatentCache):
        raise ValueError(
            f"continuous batching of DeepSeek-V3 needs the paged latent cache, got {type(cache).__name__}: create the "
            "manager with model.init_continuous_batching (generate_batch and continuous_batching_context_manager do)"
        )
    return PagedBatch(cache, cb_kwargs, dtype)


def _batch_processor_over_latent_pages(manager: ContinuousBatchingManager, options: dict, num_draft_tokens: int = 0):
    """transformers' own batch processor for `manager` (sizing, scheduler, inputs), built with `PagedLatentCache` for
    its cache (with `options`: `cache_dtype`, `scale_fmt`) and with schedulers that refuse bad requests one by one:
    the manager offers no hook for either. With `num_draft_tokens`, the processor drafts with MTP module 1
    (`SpeculativeBatchProcessor`) over a cache with a page for it, and its schedulers keep a decoding request's drafts
    whole or cut them, never split it as a prompt."""
    mixins = (RefusesBadRequests, KeepsDraftsOfDecodingRequests) if num_draft_tokens else (RefusesBadRequests,)
    schedulers = {name: type(cls.__name__, (*mixins, cls), {}) for name, cls in scheduler_classes().items()}
    if not num_draft_tokens:
        return batch_processor_with(manager, cache_class=PagedLatentCache.with_options(**options),
                                    scheduler_classes=schedulers)  # fmt: skip
    processor = batch_processor_with(manager, cache_class=PagedLatentCacheWithDrafter.with_options(**options),
                                     scheduler_classes=schedulers, processor_class=SpeculativeBatchProcessor)
    processor.enable_drafting(num_draft_tokens)
    return processor
