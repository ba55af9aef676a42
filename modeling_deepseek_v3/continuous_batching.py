"""Continuous batching of `DeepseekV3ForCausalLM` through transformers' manager and scheduler, over the paged latent
cache.

`generate_batch`, `generate(cache_implementation="paged")` and `continuous_batching_context_manager` all build their
manager with `init_continuous_batching`. `ContinuousBatchingMixin` overrides it to hand that manager a batch processor
whose cache is a `PagedLatentCache` (transformers' own would hold per-head keys and values) and whose scheduler
refuses requests the pool could never hold; a workload announced longer than the pool is refused before anything
runs. Each forward then gets a `PagedBatch`, the layout of its flat batch that every layer's attention shares.

References: docs/design.md (Continuous batching); transformers `generation/continuous_batching/continuous_api.py`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import GenerationMixin
from transformers.generation.continuous_batching import ContinuousBatchingManager, PagedAttentionCache

from .indexer import refuse_continuous_batching
from .paged_attention import PagedBatch
from .paged_cache import PagedLatentCache
from .private_api import batch_processor_with, discard_unstarted_manager, scheduler_classes


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
            ValueError: when `workload_hints` (set by `generate_batch`) announce a request longer than the pool; the
                manager is then discarded and the model left as it was. For DeepSeek-V3.2 (not built yet).
        """
        refuse_continuous_batching(self.config)
        # transformers writes eos_token_id=-1 into a config without one: the caller's config (or the model's, which
        # save_pretrained would then write) stays as it was
        generation_config = copy.deepcopy(self.generation_config if generation_config is None else generation_config)
        manager = super().init_continuous_batching(generation_config, continuous_batching_config, workload_hints)
        if manager.batch_processor is None:
            manager.batch_processor = _batch_processor_over_latent_pages(manager)
        if workload_hints is not None:
            refusal = too_long_for_pool(
                manager.batch_processor.cache, workload_hints.max_prompt_length, workload_hints.max_generated_length
            )
            if refusal is not None:
                discard_unstarted_manager(manager)
                raise ValueError(refusal)
        return manager


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


class RefusesRequestsLongerThanThePool:
    """Mixed into transformers' schedulers: a request the pool could never hold is refused when it arrives. transformers
    fails that request alone with the error (its other requests go on), where it would otherwise stall the whole loop
    once the pool is full ("No requests can be scheduled")."""

    cache: PagedLatentCache

    def add_waiting_request(self, state) -> None:
        refusal = too_long_for_pool(self.cache, len(state.initial_tokens), state.max_new_tokens)
        if refusal is not None:
            raise ValueError(refusal)
        super().add_waiting_request(state)


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


def _batch_processor_over_latent_pages(manager: ContinuousBatchingManager):
    """transformers' own batch processor for `manager` (sizing, scheduler, inputs), built with `PagedLatentCache` for
    its cache and with schedulers that refuse requests longer than the pool: the manager offers no hook for either."""
    schedulers = {
        name: type(cls.__name__, (RefusesRequestsLongerThanThePool, cls), {})
        for name, cls in scheduler_classes().items()
    }
    return batch_processor_with(manager, cache_class=PagedLatentCache, scheduler_classes=schedulers)
