"""What continuous batching accepts: each request's prompt, and the generation options of a batch.

transformers' manager runs every request of a step in one forward and fails the whole loop when that forward raises
(an out-of-vocabulary id does, in the embedding), and it serves an empty prompt the next-token output of another
request. It also reads only some generation options (the length, EOS, sampling with temperature / top-k / top-p, the
number of sequences per prompt) and drops or ignores the rest. Here a bad prompt is one request's error and an option
that continuous batching does not implement is refused by name, before a manager exists.

References: docs/batching.md (Bad requests, Options); transformers `generation/continuous_batching/continuous_api.py`
(`_handle_request_error`, which fails one request with the error raised at its admission) and `cb_logits_processors.py`
(the processors it supports).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

from transformers import GenerationConfig

from .private_api import generation_defaults

# the generation-config fields transformers' continuous batching reads and applies (the sampling ones through the
# logits processors it marks as supported), and those that say nothing about the output
APPLIED_FIELDS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "num_return_sequences",
                  "eos_token_id", "pad_token_id")  # fmt: skip
NEUTRAL_FIELDS = (
    "bos_token_id",  # a prompt carries its own
    "use_cache",  # every request is cached anyway
    "disable_compile",  # the batching step is never compiled
    "continuous_batching_config",  # transformers' deprecated way of passing it, still read
    "max_length",  # generate_batch and the manager read max_new_tokens only (generate() converts max_length)
    "transformers_version", "_from_model_config",
)


# the fields of MTP drafting inside continuous batching (`speculative_batching.py`)
DRAFTING_FIELDS = ("use_mtp", "num_draft_tokens")


def _not_a_token_id(token) -> bool:
    return isinstance(token, bool) or not isinstance(token, numbers.Integral)


def prompt_refusal(request_id: str, input_ids: Sequence, vocab_size: int) -> str | None:
    """Why the prompt `input_ids` of request `request_id` cannot run, or None when it can: it needs at least one
    token, and every token an int id in [0, vocab_size)."""
    if len(input_ids) == 0:
        return (f"request {request_id!r}: input_ids is empty: a prompt needs at least one token (the model predicts "
                "the next token from the last one)")  # fmt: skip
    for position, token in enumerate(input_ids):
        if _not_a_token_id(token):
            return (f"request {request_id!r}: input_ids[{position}] = {token!r} ({type(token).__name__}) is not a "
                    "token id: input_ids must be a list of ints (tokenize text first; a tensor gives one with "
                    ".tolist())")  # fmt: skip
        if not 0 <= token < vocab_size:
            return (f"request {request_id!r}: input_ids[{position}] = {token} is outside the vocabulary: token ids "
                    f"must be in [0, vocab_size={vocab_size})")  # fmt: skip
    return None


def check_prompt_types(inputs: Sequence) -> None:
    """Refuses `inputs` (of `generate_batch`) unless it is a list of prompts, each a list or tuple of token ids (int):
    transformers measures and sorts the prompts before any request exists, which text or None would break mid-way.
    (Empty prompts and ids outside the vocabulary fail as their own requests.)

    Raises:
        TypeError: naming the first prompt (`inputs[i]`) or token that is not of those types.
    """
    if not isinstance(inputs, (list, tuple)):
        raise TypeError(f"inputs = {inputs!r} ({type(inputs).__name__}) must be a list of prompts, each a list of "
                        "token ids (int)")  # fmt: skip
    for i, prompt in enumerate(inputs):
        if not isinstance(prompt, (list, tuple)):
            raise TypeError(f"inputs[{i}] = {prompt!r} ({type(prompt).__name__}) must be a list of token ids (int): "
                            "tokenize text first; a tensor gives one with .tolist()")  # fmt: skip
        for position, token in enumerate(prompt):
            if _not_a_token_id(token):
                raise TypeError(f"inputs[{i}][{position}] = {token!r} ({type(token).__name__}) is not a token id: "
                                "each prompt must be a list of ints")  # fmt: skip


def check_generation_options(config: GenerationConfig, *, needs_max_new_tokens: bool = False) -> None:
    """Refuses a generation config with a field set that continuous batching does not implement (beam search,
    `min_new_tokens`, repetition penalties, ...): transformers would drop it, or apply it to the flat batch as if it
    were one sequence. `use_mtp=True` (MTP drafting, `speculative_batching.py`) takes `num_draft_tokens` (an int >= 1)
    and one sequence per prompt. With `needs_max_new_tokens` (a batch that must end:
    `generate_batch`), the config must give `max_new_tokens`.

    Raises:
        TypeError: for a `use_mtp` that is not a bool.
        ValueError: naming each such field and its value, or the missing `max_new_tokens`.
    """
    values = config.to_dict()
    check_drafting_options(values)
    if values.get("cache_implementation") not in (None, "paged"):
        raise ValueError(f"cache_implementation={values['cache_implementation']!r} does not apply to continuous "
                         "batching, which always uses its paged cache: leave it unset or 'paged'")  # fmt: skip
    defaults = generation_defaults()
    # cache_config: the paged cache's options (FP8 pages), read by `ContinuousBatchingMixin.init_continuous_batching`
    known = {*APPLIED_FIELDS, *NEUTRAL_FIELDS, *DRAFTING_FIELDS, "cache_implementation", "cache_config"}
    unsupported = {name: value for name, value in values.items()
                   if name not in known and value not in (None, False) and value != defaults.get(name)}  # fmt: skip
    if unsupported:
        settings = ", ".join(f"{name}={value!r}" for name, value in unsupported.items())
        raise ValueError(f"continuous batching does not implement {settings}: it applies {', '.join(APPLIED_FIELDS)}; "
                         "leave the others unset, or use model.generate")  # fmt: skip
    if needs_max_new_tokens and values.get("max_new_tokens") is None:
        raise ValueError(f"generate_batch needs max_new_tokens (got None, with max_length={values.get('max_length')!r}"
                         "): continuous batching reads no max_length, and a request without a limit generates until "
                         "EOS or until the pool is full")  # fmt: skip


def check_drafting_options(values: dict) -> None:
    """Refuses the drafting fields of a generation config (as a dict) that continuous batching cannot run: a
    `use_mtp` that is not a bool, `num_draft_tokens` without `use_mtp=True` or not an int >= 1, and with
    `use_mtp=True` several sequences per prompt.

    Raises:
        TypeError, ValueError: naming the field, its value and the rule.
    """
    use_mtp, num_draft_tokens = values.get("use_mtp"), values.get("num_draft_tokens")
    if use_mtp is not None and not isinstance(use_mtp, bool):
        raise TypeError(f"use_mtp = {use_mtp!r} ({type(use_mtp).__name__}) is invalid: it must be True or False")
    if num_draft_tokens is not None:
        if not use_mtp:
            raise ValueError(f"num_draft_tokens={num_draft_tokens!r} sets how many tokens MTP drafting proposes per "
                             "step: it needs use_mtp=True")  # fmt: skip
        if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, numbers.Integral) \
                or num_draft_tokens < 1:  # fmt: skip
            raise ValueError(f"num_draft_tokens={num_draft_tokens!r} is invalid: it must be an int >= 1 (the drafts "
                             "MTP module 1 chains per request and step)")  # fmt: skip
    if not use_mtp:
        return
    if (values.get("num_return_sequences") or 1) > 1:
        raise ValueError(f"use_mtp=True with num_return_sequences={values['num_return_sequences']}: MTP drafting "
                         "inside continuous batching runs one sequence per prompt")  # fmt: skip


def num_draft_tokens(config: GenerationConfig, num_mtp_modules: int) -> int:
    """The drafts per request and step of a config with `use_mtp=True`: its `num_draft_tokens`, else as many as
    `generate(use_mtp=True)` drafts (one per MTP module)."""
    value = getattr(config, "num_draft_tokens", None)
    return num_mtp_modules if value is None else int(value)
