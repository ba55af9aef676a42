"""Self-speculative decoding with the MTP modules: the loop behind `model.generate(..., use_mtp=True)`.

Every step the MTP chain drafts D tokens (module k drafts the token k ahead), and one main-model forward over
`[newest token, d_1 .. d_D]` (D + 1 queries over the latent cache: the absorbed MLA path) verifies them.
* greedy: the longest prefix of drafts equal to the main model's argmax is accepted, plus the main model's own next
  token, so the output is token for token that of plain greedy decoding.
* sampling: draft d_k is accepted with probability min(1, p(d_k) / q(d_k)); the first rejected one is replaced by a
  sample of norm(max(0, p - q)); after D accepted drafts a bonus token comes from p. p and q are the main model's and
  the MTP module's distributions after the same logits warpers (temperature, top-k, top-p, ...), so the output is
  distributed exactly as plain sampling.

Batches: rows accept different numbers of tokens, yet all rows share one cache length. A step appends its D + 1
slots to the main cache, crops the slots that no row accepted, and masks the rejected slots of the other rows in the
attention mask (positions are tracked per row), so no cache is ever copied or realigned. The MTP blocks keep their
slots in the same `MLACache` (layer `mtp_layer_index(L, k)` for module k) with attention masks of their own.
The loop uses only public pieces of the model: its decoder, output head, MTP modules and `mtp.mtp_step`.

Dimension letters: b batch, D MTP depth, V vocabulary, H hidden, n window columns, t cached slots.
References: Leviathan et al. 2023 (arXiv 2211.17192) and Chen et al. 2023 (arXiv 2302.01318), speculative sampling;
DeepSeek-V3 report §2.2 and §5.4.3 (MTP for speculative decoding); transformers `generation/utils.py`
(`custom_generate`, `GenerationMixin._sample`); docs/mtp.md.
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers.distributed import is_fsdp_managed_module
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    InfNanRemoveLogitsProcessor,
    LogitNormalization,
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopHLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)
from transformers.generation.stopping_criteria import (
    EosTokenCriteria,
    MaxLengthCriteria,
    StoppingCriteriaList,
    StopStringCriteria,
)
from transformers.generation.streamers import BaseStreamer
from transformers.generation.utils import GenerateDecoderOnlyOutput, GenerationMixin

from .cache import MLACache, MLAStaticCache
from .configuration import DeepseekV32Config
from .latent_fp8 import LATENT_CACHE_OPTIONS, latent_cache_options
from .mtp import mtp_layer_index, mtp_step
from .private_api import eos_and_pad_tensors, generation_defaults, prepare_cache_for_generation
from .speculation import SpeculativeStats, greedy_accepted, speculative_sampling

# Processors that act on each row's scores alone, so they apply unchanged to every verified position of a step.
# Those that read the generated ids (repetition penalty, n-gram bans, minimum lengths, ...) would see them only
# up to the step's start, and are refused.
POSITIONWISE_PROCESSORS = (
    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper, TypicalLogitsWarper,
    EpsilonLogitsWarper, EtaLogitsWarper, TopHLogitsWarper, LogitNormalization, InfNanRemoveLogitsProcessor,
)  # fmt: skip
STOPPING_CRITERIA = (MaxLengthCriteria, EosTokenCriteria)  # applied per row by the loop itself, on the device
# Generation-config fields of other decoding methods (prompt lookup and assisted decoding, contrastive search, DoLa,
# group beam search, constrained beam search) and of plain decoding's chunked prefill. The loop reads none of them
# and they add no logits processor or stopping criterion, so a value other than transformers' default is refused
# instead of dropped.
IGNORED_FIELDS = (
    "prompt_lookup_num_tokens", "max_matching_ngram_size", "num_assistant_tokens", "num_assistant_tokens_schedule",
    "assistant_confidence_threshold", "assistant_early_exit", "assistant_lookbehind", "target_lookbehind",
    "assistant_ensemble_weight", "speculation_type", "penalty_alpha", "dola_layers", "low_memory", "num_beam_groups",
    "diversity_penalty", "constraints", "force_words_ids", "prefill_chunk_size",
)  # fmt: skip


@dataclasses.dataclass
class SpeculativeDecoderOutput(GenerateDecoderOnlyOutput):
    """What `generate(use_mtp=True, return_dict_in_generate=True)` returns: `sequences` and the call's
    `speculative_stats` (`SpeculativeStats`)."""

    speculative_stats: SpeculativeStats | None = None


def mtp_speculative_decoding(
    model,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config,
    synced_ranks: bool = False,
    streamer: BaseStreamer | None = None,
    **model_kwargs,
) -> SpeculativeDecoderOutput | torch.LongTensor:
    """The `custom_generate` loop that `generate(use_mtp=True)` hands to transformers' `generate`, which prepares
    `input_ids` `[b, w]` (left-padded), the attention mask, the logits processors and the stopping criteria as for
    plain decoding (and has put the prompt to the streamer). With `synced_ranks` (transformers' `synced_gpus`: every
    rank of a sharded model must run the same forwards) a rank whose rows are done keeps stepping, without adding
    tokens, until every rank's rows are done.

    Returns:
        `[b, w + new]` token ids as plain `generate` returns them (finished rows padded with `pad_token_id`), or a
        `SpeculativeDecoderOutput` with `sequences` and `speculative_stats` when `return_dict_in_generate`.

    Raises:
        ValueError: for beam search, a static cache, requested scores / logits / attentions / hidden states,
            inputs_embeds, a logits processor that depends on the generated ids, or a field of another decoding
            method (`IGNORED_FIELDS`).
    """
    _check_request(logits_processor, generation_config, model_kwargs)
    decoder = SelfSpeculativeDecoder(model, generation_config, logits_processor, synced_ranks)
    stops = _RowStops(stopping_criteria, input_ids, eos_and_pad_tensors(generation_config)[0])
    # the loop runs in inference mode (its cache never leaves it); a copy made outside is an ordinary tensor
    sequences = decoder.generate(input_ids, model_kwargs.get("attention_mask"), stops, streamer).clone()
    if generation_config.return_dict_in_generate:
        return SpeculativeDecoderOutput(sequences=sequences, speculative_stats=decoder.stats)
    return sequences


class MTPGenerationMixin(GenerationMixin):
    """`generate()` of the causal LM: the latent `MLACache` by default, and self-speculative decoding with the MTP
    modules when `use_mtp=True`."""

    def generate(self, inputs: torch.Tensor | None = None, generation_config=None, **kwargs):
        """`GenerationMixin.generate`, plus self-speculative decoding with the MTP modules when `use_mtp=True` (the
        keyword, or `generation_config.use_mtp`): greedy output identical to plain greedy decoding, sampling with the
        same output distribution as plain sampling, at any batch size (left padding), for any number of modules.
        Streamers, `stop_strings` (with `tokenizer=`) and stopping criteria work as in plain decoding: the streamer
        receives the same tokens, and every row stops at the same token. With `return_dict_in_generate=True` the
        output carries `speculative_stats` (`SpeculativeStats`).

        Example:
            >>> out = model.generate(**inputs, max_new_tokens=128, use_mtp=True, return_dict_in_generate=True)
            >>> out.speculative_stats.acceptance_rate, out.speculative_stats.tokens_per_forward

        Raises:
            TypeError: if `use_mtp` is not a bool.
            ValueError: with `use_mtp=True`, if the model has no active MTP modules (`num_nextn_predict_layers = 0`
                or `use_mtp_modules = False`), with an assistant model, a cache passed in, `custom_generate`, or
                `stop_strings` without a tokenizer; and for what the loop does not support (see
                `mtp_speculative_decoding`).
        """
        use_mtp = kwargs.pop("use_mtp", None)
        if use_mtp is None:
            use_mtp = getattr(generation_config or self.generation_config, "use_mtp", None)
        if use_mtp is None:
            use_mtp = False
        elif not isinstance(use_mtp, bool):  # 0 or "" would pass as False, "no" as True
            raise TypeError(f"use_mtp = {use_mtp!r} ({type(use_mtp).__name__}) is invalid: it must be True or False")
        # transformers' own `use_mtp` drafter (MTPCandidateGenerator) never runs: the flag is ours. It is switched off
        # in a copy of a given generation config (transformers deprecates passing one together with its fields).
        if generation_config is None:
            kwargs["use_mtp"] = False
        else:
            generation_config = copy.deepcopy(generation_config)
            generation_config.use_mtp = False
        if not use_mtp:
            return super().generate(inputs, generation_config, **kwargs)
        if not self.mtp_active:
            raise ValueError(
                "use_mtp=True drafts with the MTP modules, but this model has none active (num_nextn_predict_layers="
                f"{self.config.num_nextn_predict_layers}, use_mtp_modules={self.config.use_mtp_modules})"
            )
        for name in ("assistant_model", "custom_generate", "cache", "past_key_values"):
            if kwargs.get(name) is not None:
                raise ValueError(f"use_mtp=True runs its own decoding loop and cache; {name} is not supported with it")
        _stop_strings_to_criterion(self.generation_config, generation_config, kwargs)
        # as transformers' synced_gpus: by default on when FSDP shards the model over several ranks
        synced = kwargs.pop("synced_gpus", None)
        if synced is None:
            synced = is_fsdp_managed_module(self) and dist.is_initialized() and dist.get_world_size() > 1
        # transformers puts the prompt to the streamer, then hands a callable loop only the arguments of its own
        # signature that plain decoding does not have: the streamer reaches the loop here
        loop = functools.partial(mtp_speculative_decoding, synced_ranks=synced, streamer=kwargs.get("streamer"))
        # transformers prepares inputs, processors and stopping criteria as for plain decoding, then runs our loop
        return super().generate(inputs, generation_config, custom_generate=loop, **kwargs)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length) -> None:
        # The default cache of generate() becomes the latent MLACache (static and user-given caches are kept), with
        # the options of `cache_config` (`cache_dtype`, `scale_fmt`).
        default = generation_config.cache_implementation in (None, "dynamic")
        options = latent_cache_options(generation_config) if default else {}
        if default and model_kwargs.get("cache") is not None and options:
            raise ValueError(f"cache_config={generation_config.cache_config!r} sets up generate()'s own latent cache, "
                             "but a cache was passed in: build that one with the options instead (MLACache(config, "
                             "cache_dtype='fp8'))")  # fmt: skip
        if model_kwargs.get("cache") is None and generation_config.use_cache is not False and default:
            model_kwargs["cache"] = MLACache(self.config, **options)
            return
        if not default and set(generation_config.cache_config or {}) & set(LATENT_CACHE_OPTIONS):
            implementation = generation_config.cache_implementation
            raise ValueError(f"cache_config={generation_config.cache_config!r}: cache_dtype and scale_fmt apply to the "
                             f"default latent cache, not cache_implementation={implementation!r}; for a static FP8 "
                             "cache pass cache=MLAStaticCache(config=..., max_cache_len=..., "
                             "cache_dtype='fp8')")  # fmt: skip
        if (  # DeepSeek-V3.2's static cache keeps the indexer keys too: transformers' StaticCache would not
            isinstance(self.config, DeepseekV32Config)
            and model_kwargs.get("cache") is None
            and generation_config.cache_implementation == "static"
        ):
            model_kwargs["cache"] = MLAStaticCache(config=self.config, max_cache_len=max_cache_length)
            return
        prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                     max_cache_length)


def _stop_strings_to_criterion(model_config, generation_config, kwargs: dict) -> None:
    """Turn the call's stop strings (the keyword, else the given generation config's, else the model's) into a
    `StopStringCriteria` among `kwargs["stopping_criteria"]`, and take them out of what transformers reads: it hands
    a callable loop no tokenizer, so its own criterion could not be built."""
    stop_strings = kwargs.pop("stop_strings", None)
    for config in (generation_config, model_config):
        if stop_strings is None and config is not None:
            stop_strings = config.stop_strings
    if stop_strings is None:
        return
    tokenizer = kwargs.get("tokenizer")
    if tokenizer is None:
        raise ValueError(f"stop_strings = {stop_strings!r} needs the model's tokenizer to match text against the "
                         f"generated ids: pass tokenizer=... to generate()")
    kwargs["stopping_criteria"] = StoppingCriteriaList(
        [*(kwargs.get("stopping_criteria") or []), StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings)]
    )
    if generation_config is not None:
        generation_config.stop_strings = None  # a copy, made by `generate`
    if generation_config is None or model_config.stop_strings is not None:
        kwargs["stop_strings"] = None  # the call's value overrides the model's


def _check_request(logits_processor, generation_config, model_kwargs) -> None:
    if generation_config.num_beams > 1:
        raise ValueError(f"use_mtp=True decodes greedily or by sampling, not by beam search "
                         f"(num_beams={generation_config.num_beams}); set num_beams=1")
    if generation_config.cache_implementation not in (None, "dynamic"):
        raise ValueError(f"use_mtp=True builds its own dynamic latent cache; cache_implementation="
                         f"{generation_config.cache_implementation!r} is not supported")
    if model_kwargs.get("inputs_embeds") is not None:
        raise ValueError("use_mtp=True needs input_ids (the MTP modules embed the drafted tokens), not inputs_embeds")
    outputs = ("output_scores", "output_logits", "output_attentions", "output_hidden_states")
    requested = [name for name in outputs if getattr(generation_config, name, False)]
    if requested:
        raise ValueError(f"use_mtp=True returns sequences only; {', '.join(requested)} is not supported")
    defaults = generation_defaults()
    ignored = {name: value for name in IGNORED_FIELDS
               if (value := getattr(generation_config, name, None)) not in (None, defaults.get(name))}
    if ignored:
        raise ValueError(f"use_mtp=True runs self-speculative decoding, which does not use {ignored}: these "
                         f"fields belong to other decoding methods; leave them unset or drop use_mtp=True")
    processors = [type(p).__name__ for p in logits_processor if not isinstance(p, POSITIONWISE_PROCESSORS)]
    if processors:
        raise ValueError(
            f"use_mtp=True applies only logits processors that act on each position's scores alone "
            f"({', '.join(c.__name__ for c in POSITIONWISE_PROCESSORS)}); this call adds {', '.join(processors)}"
        )


class _RowStops:
    """The stopping criteria that the loop does not apply on the device itself (stop strings, the caller's own,
    `max_time`), checked as plain decoding checks them: after every new token, on the row's ids up to it."""

    def __init__(self, stopping_criteria: StoppingCriteriaList, input_ids: torch.Tensor, eos: torch.Tensor | None):
        self.criteria = StoppingCriteriaList([c for c in stopping_criteria if not isinstance(c, STOPPING_CRITERIA)])
        self.prompts = input_ids
        names = [type(c).__name__ for c in self.criteria]
        if names and eos is None and input_ids.shape[0] > 1:
            raise ValueError(
                f"use_mtp=True stops a row of a batch by {', '.join(names)} only with an eos_token_id: without one, "
                f"plain decoding pads nothing and keeps generating for a stopped row until every row has stopped, "
                f"which this loop does not reproduce; set eos_token_id, or generate one row at a time"
            )

    def __bool__(self) -> bool:
        return bool(self.criteria)

    def cut(self, generated: torch.Tensor, count: torch.Tensor, new: torch.Tensor,
            lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows append `new[r, :lengths[r]]` after `generated[r, :count[r]]`; returns the lengths cut after the
        first token at which a criterion stops the row, and which rows it stopped. Plain decoding passes its scores
        only when they are returned, which this loop never does, so the criteria get None."""
        lengths, stopped = lengths.tolist(), []
        for row, (done, n) in enumerate(zip(count.tolist(), list(lengths))):
            ids = torch.cat([self.prompts[row], generated[row, :done], new[row, :n]])
            first = next((j for j in range(n) if self.criteria(ids[None, : ids.shape[0] - n + j + 1], None).any()),
                         None)
            stopped.append(first is not None)
            if first is not None:
                lengths[row] = first + 1
        return torch.tensor(lengths, device=new.device), torch.tensor(stopped, device=new.device)


@dataclasses.dataclass
class _Window:
    """The positions an MTP module computes in one step, right-aligned per row (invalid columns on the left)."""

    hidden: torch.Tensor  # [b, n, H], h^{k-1} of each position
    tokens: torch.Tensor  # [b, n], t_{i+k} of each position i
    positions: torch.Tensor  # [b, n]
    valid: torch.Tensor  # [b, n] bool

    def column(self, index: int, width: int) -> _Window:
        """Column `index` (negative: from the end) as a 1-wide window; an invalid one if the window is narrower."""
        if -index > width:
            return _Window(self.hidden[:, :1] * 0, self.tokens[:, :1], self.positions[:, :1] - 1,
                           torch.zeros_like(self.valid[:, :1]))
        pick = slice(width + index, width + index + 1)
        return _Window(self.hidden[:, pick], self.tokens[:, pick], self.positions[:, pick], self.valid[:, pick])


class _Sequences:
    """The generated tokens of every row, with the stopping rules of plain `generate` applied per row."""

    def __init__(self, batch: int, max_new: int, width: int, eos: torch.Tensor | None, pad, device,
                 stops: _RowStops) -> None:
        self.max_new, self.eos, self.stops = max_new, eos, stops
        fill = 0 if pad is None else int(pad)
        self.tokens = torch.full((batch, max_new + width), fill, dtype=torch.long, device=device)
        self.count = torch.zeros(batch, dtype=torch.long, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)

    def append(self, new: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Append the first `lengths[r]` tokens of `new[r]` `[b, m]` to the unfinished rows, cut after an EOS and at
        `max_new` tokens; returns how many each row kept."""
        m = new.shape[1]
        offsets = torch.arange(m, device=new.device)
        lengths = torch.minimum(lengths, self.max_new - self.count).masked_fill(self.finished, 0)
        hit = torch.zeros_like(self.finished)
        if self.eos is not None:
            is_eos = torch.isin(new, self.eos) & (offsets < lengths[:, None])
            hit = is_eos.any(-1)
            lengths = torch.where(hit, is_eos.int().argmax(-1) + 1, lengths)
        if self.stops:
            lengths, stopped = self.stops.cut(self.tokens, self.count, new, lengths)
            hit = hit | stopped
        index = self.count[:, None] + offsets
        keep = offsets < lengths[:, None]
        self.tokens.scatter_(1, index, torch.where(keep, new, self.tokens.gather(1, index)))
        self.count += lengths
        self.finished |= hit | (self.count >= self.max_new)
        return lengths

    @property
    def done(self) -> bool:
        return bool(self.finished.all())

    def result(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.cat([input_ids, self.tokens[:, : int(self.count.max())]], dim=1)


class _Streamer:
    """Puts the generated tokens to a streamer exactly as plain decoding does: one `[b]` column per step, a finished
    row's column holding the pad id. A column goes out once every unfinished row has reached it."""

    def __init__(self, streamer: BaseStreamer | None) -> None:
        self.streamer, self.sent = streamer, 0

    def put(self, sequences: _Sequences) -> None:
        if self.streamer is None:
            return
        count, finished = sequences.count.tolist(), sequences.finished.tolist()
        ready = min((n for n, done in zip(count, finished) if not done), default=max(count))
        for column in sequences.tokens[:, self.sent : ready].cpu().unbind(1):
            self.streamer.put(column)
        self.sent = max(self.sent, ready)

    def end(self) -> None:
        if self.streamer is not None:
            self.streamer.end()


class SelfSpeculativeDecoder:
    """State of one `generate(use_mtp=True)` call: the shared latent cache, the attention masks, the MTP carries.

    MTP bookkeeping. Module k at position i reads `t_{i+k}` and `h^{k-1}_i`. When a step ends with newest token
    `t_N` (not yet fed to the main model), module k has cache slots for positions `<= N - 1`, of which the last
    k - 1 were computed from drafted tokens: the next step crops them and recomputes positions `N - k + 1 ..
    N' - 1` with accepted tokens (`N'` the next newest). The hidden state `h^{k-1}` of the first of them, computed
    a step earlier by module k - 1, is kept as the module's carry.
    """

    def __init__(self, model, generation_config, logits_processor: LogitsProcessorList, synced_ranks: bool) -> None:
        self.model = model
        self.synced_ranks = synced_ranks
        self.decoder, self.head = model.get_decoder(), model.get_output_embeddings()
        self.num_layers = model.config.num_hidden_layers
        self.depth = len(model.mtp)
        self.do_sample = generation_config.do_sample
        self.logits_processor = logits_processor
        self.generation_config = generation_config
        self.cache = MLACache(model.config, num_layers=mtp_layer_index(self.num_layers, self.depth) + 1,
                              **latent_cache_options(generation_config))  # fmt: skip
        self.mtp_masks: list[torch.Tensor | None] = [None] * self.depth  # [b, t_k] valid slots of module k's cache
        self.carries: list[_Window] | None = None  # per module k < D: module k's column that module k + 1 reads next
        self.main_mask: torch.Tensor | None = None  # [b, t] valid slots of the main layers' cache
        self.holes = False  # whether main_mask has a False slot (else no mask is passed, as in plain decoding)
        self.next_position: torch.Tensor | None = None  # [b], position of each row's newest token
        self.stats = SpeculativeStats([0] * self.depth, [0] * self.depth)
        self.accepted_histogram: torch.Tensor | None = None  # [D + 1]: row-steps that accepted 0..D drafts
        self.tokens_kept: torch.Tensor | None = None  # tokens added by verification steps, all rows

    def _scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits `[..., V]` through the (position-wise) processors, in fp32."""
        flat = logits.float().reshape(-1, logits.shape[-1])
        return self.logits_processor(None, flat).view(logits.shape)

    def _choose(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A token per row from logits `[b, V]`: argmax, or a sample; with its distribution when sampling."""
        scores = self._scores(logits)
        if not self.do_sample:
            return scores.argmax(-1), None
        probs = F.softmax(scores, dim=-1)
        return torch.multinomial(probs, num_samples=1).squeeze(1), probs

    def generate(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None, stops: _RowStops,
                 streamer: BaseStreamer | None = None) -> torch.LongTensor:
        """Decode until every row has stopped (EOS, `max_length`, or a stopping criterion); returns prompt + new
        tokens `[b, w + new]`. The new tokens go to `streamer` as they are accepted, and `streamer.end()` at the end."""
        stream = _Streamer(streamer)
        # In inference mode, except for a model sharded by FSDP2: torch cannot unshard a group of one rank (an
        # expert group holding whole experts) in it (`wait_for_unshard` in torch/distributed/fsdp/_fully_shard/
        # _fsdp_param_group.py reads the version counter of a buffer it allocates there).
        with torch.inference_mode(not is_fsdp_managed_module(self.model)):
            sequences = self._decode(input_ids, attention_mask, stops, stream)
        stream.end()
        return sequences

    def _decode(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None, stops: _RowStops,
                stream: _Streamer) -> torch.LongTensor:
        config, depth = self.generation_config, self.depth
        b, w = input_ids.shape
        device = input_ids.device
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        positions = (valid.long().cumsum(-1) - 1).masked_fill(~valid, 1)  # as generate() numbers left padding
        # the prefill is exactly plain decoding's (no mask when nothing is padded), so its first token is the same
        hidden = self.decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                              cache=self.cache, use_cache=True, return_dict=True).last_hidden_state
        self.stats.main_forwards += 1
        newest, _ = self._choose(self.head(hidden[:, -1:])[:, -1])
        sequences = _Sequences(b, config.max_length - w, depth + 1, *eos_and_pad_tensors(config), device, stops)
        sequences.append(newest[:, None], torch.ones_like(newest))
        stream.put(sequences)
        self.main_mask, self.holes = valid, attention_mask is not None
        self.next_position = valid.sum(-1)  # the position of `newest`
        if self._all_done(sequences.finished.all()):
            return sequences.result(input_ids)
        drafts, draft_probs = self._draft(_Window(hidden, torch.cat([input_ids[:, 1:], newest[:, None]], 1),
                                                  positions, valid))
        while True:
            active = ~sequences.finished
            accepted, step_tokens, hidden, positions = self._verify(newest, drafts, draft_probs)
            accepted = accepted.masked_fill(~active, 0)  # finished rows keep nothing
            kept = sequences.append(step_tokens, accepted + 1)
            stream.put(sequences)
            self._count(accepted, active, kept)
            # the step's one read-back to the host, as plain decoding's stop check: the most drafts a row accepted,
            # whether another row accepted fewer, whether every row is done
            most = accepted.max()
            done = self._all_done(sequences.finished.all(), read_back=False)
            widest, uneven, done = torch.stack([most, (accepted != most).any(), done]).tolist()
            self._keep_accepted_slots(accepted, widest, bool(uneven))
            if done:
                self._finish_stats()
                return sequences.result(input_ids)
            # module 1 reads the verified positions N .. N + a of each row, right-aligned in widest + 1 columns
            shift = widest - accepted
            columns = torch.arange(widest + 1, device=device)
            index = (columns - shift[:, None]).clamp(min=0)
            window = _Window(hidden[:, : widest + 1].gather(1, index[..., None].expand(-1, -1, hidden.shape[-1])),
                             step_tokens.gather(1, index), positions.gather(1, index), columns >= shift[:, None])
            newest = step_tokens.gather(1, accepted[:, None]).squeeze(1)
            drafts, draft_probs = self._draft(window)

    def _all_done(self, finished: torch.Tensor, read_back: bool = True) -> torch.Tensor | bool:
        """Whether every row is done (`finished`, a bool scalar), on every rank when they step in sync."""
        if self.synced_ranks:
            finished = finished.to(torch.int32)
            dist.all_reduce(finished, op=dist.ReduceOp.MIN)
        return bool(finished) if read_back else finished.bool()

    def _verify(self, newest: torch.Tensor, drafts: torch.Tensor, draft_probs: torch.Tensor | None):
        """One main-model forward over `[newest, d_1 .. d_D]`.

        Returns:
            `(accepted [b], step_tokens [b, D + 1], hidden [b, D + 1, H], positions [b, D + 1])`: row r keeps
            `step_tokens[r, : accepted[r] + 1]` (its accepted drafts, then the main model's token).
        """
        depth = drafts.shape[1]
        ids = torch.cat([newest[:, None], drafts], dim=1)
        positions = self.next_position[:, None] + torch.arange(depth + 1, device=ids.device)
        self.main_mask = torch.cat([self.main_mask, torch.ones_like(ids, dtype=torch.bool)], dim=1)
        # the drafts and the newest token come from the model: no value checks, which would read them back each step
        hidden = self.decoder(input_ids=ids, attention_mask=self.main_mask.long() if self.holes else None,
                              position_ids=positions, cache=self.cache, use_cache=True,
                              return_dict=True, check_values=False).last_hidden_state
        self.stats.main_forwards += 1
        scores = self._scores(self.head(hidden))  # [b, D + 1, V]
        if not self.do_sample:
            target = scores.argmax(-1)
            return greedy_accepted(drafts, target), target, hidden, positions
        accepted, step_tokens = speculative_sampling(F.softmax(scores, dim=-1), draft_probs, drafts)
        return accepted, step_tokens, hidden, positions

    def _keep_accepted_slots(self, accepted: torch.Tensor, widest: int, uneven: bool) -> None:
        """Roll the main cache back: crop the slots no row accepted, mask each row's other rejected ones; advance
        the positions. `widest`: the most drafts a row accepted; `uneven`: whether some row accepted fewer."""
        rejected_by_all = self.depth - widest
        if rejected_by_all:
            for layer in self.cache.layers[: self.num_layers]:
                layer.crop(-rejected_by_all)
            self.main_mask = self.main_mask[:, :-rejected_by_all]
        self.main_mask[:, -(widest + 1) :] = torch.arange(widest + 1, device=accepted.device) <= accepted[:, None]
        self.holes = self.holes or uneven
        self.next_position = self.next_position + accepted + 1

    def _count(self, accepted: torch.Tensor, active: torch.Tensor, kept: torch.Tensor) -> None:
        """Tally a step on the device (read back once, by `_finish_stats`)."""
        # by index_add, not bincount of the active rows, whose boolean selection would read the mask back
        histogram = torch.zeros(self.depth + 1, dtype=torch.long, device=accepted.device)
        histogram.index_add_(0, accepted, active.long())
        first = self.accepted_histogram is None
        self.accepted_histogram = histogram if first else self.accepted_histogram + histogram
        self.tokens_kept = kept.sum() if first else self.tokens_kept + kept.sum()

    def _finish_stats(self) -> None:
        """Depth k was checked in the row-steps that accepted at least k - 1 drafts, and accepted in those with k."""
        if self.accepted_histogram is None:
            return
        at_least = self.accepted_histogram.flip(0).cumsum(0).flip(0).tolist()  # [a]: row-steps accepting >= a drafts
        self.stats.proposed = at_least[:-1]
        self.stats.accepted = at_least[1:]
        self.stats.row_steps = at_least[0]
        self.stats.tokens = int(self.tokens_kept)

    def _draft(self, window: _Window) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the MTP chain; `window` holds module 1's new positions (after the prefill: the whole prompt).

        Returns:
            `(drafts [b, D], their distributions [b, D, V] when sampling, else None)`.
        """
        first = self.carries is None
        drafts, probs, carries = [], [], []
        hidden = window.hidden  # h^{k-1} of the window's positions
        shift = (~window.valid).sum(-1, keepdim=True)  # invalid columns left of each row's positions (steps)
        for k in range(1, self.depth + 1):
            if k > 1:
                previous = window
                if first:  # same positions, tokens one further ahead
                    tokens = torch.cat([previous.tokens[:, 1:], drafts[-1][:, None]], dim=1)
                    window = _Window(hidden, tokens, previous.positions, previous.valid)
                else:  # one more position, whose h^{k-1} module k - 1 computed a step ago, just left of the others
                    window = self._extend(previous, hidden, self.carries[k - 2], shift, drafts[-1])
            hidden, logits = self._run_module(k, window)
            token, token_probs = self._choose(logits[:, -1])
            drafts.append(token)
            probs.append(token_probs)
            if k < self.depth:  # position N' - k, the first that module k + 1 recomputes next step
                carries.append(_Window(hidden, window.tokens, window.positions, window.valid)
                               .column(-k, hidden.shape[1]))
        self.carries = carries
        return torch.stack(drafts, 1), torch.stack(probs, 1) if self.do_sample else None

    @staticmethod
    def _extend(previous: _Window, hidden: torch.Tensor, carry: _Window, shift: torch.Tensor, draft: torch.Tensor):
        """Module k's window from module k - 1's (`previous`, output `hidden`): the carried position inserted just
        left of each row's `previous` positions (right-aligned after `shift` invalid columns), and every position's
        token one further ahead, the newest draft last."""
        columns = torch.arange(previous.valid.shape[1] + 1, device=shift.device)
        index = torch.where(columns > shift, columns, 0)  # into [carry, previous]; invalid columns copy the carry
        # a column is as valid as the one it copies (module k - 1's own carry may be invalid for a short prompt)
        valid = torch.cat([carry.valid, previous.valid], 1).gather(1, index) & (columns >= shift)
        hidden = torch.cat([carry.hidden, hidden], 1).gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
        positions = torch.cat([carry.positions, previous.positions], 1).gather(1, index)
        # column c + 1 holds previous column c's position; its token, one further ahead, is previous token c + 1
        tokens = torch.cat([previous.tokens, draft[:, None]], 1)
        return _Window(hidden, tokens, positions, valid)

    def _run_module(self, k: int, window: _Window) -> tuple[torch.Tensor, torch.Tensor]:
        """Module k over `window`, after dropping its slots computed from drafted tokens; returns `h^k` `[b, n, H]` and
        the logits of the last column `[b, 1, V]`."""
        layer = self.cache.layers[mtp_layer_index(self.num_layers, k)]
        past = self.mtp_masks[k - 1]
        if past is None:
            past = window.valid[:, :0]
        elif k > 1:
            layer.crop(-(k - 1))
            past = past[:, : max(past.shape[1] - (k - 1), 0)]
        keys = torch.cat([past, window.valid], dim=1)  # [b, t]
        self.mtp_masks[k - 1] = keys
        n, t = window.valid.shape[1], keys.shape[1]
        query_slot = t - n + torch.arange(n, device=keys.device)[:, None]
        slots = torch.arange(t, device=keys.device)
        # causal over valid slots; a query always sees its own slot, so an invalid one never meets an empty row
        mask = ((keys[:, None, :] & (slots <= query_slot)) | (slots == query_slot))[:, None]  # [b, 1, n, t]
        embeds = self.model.get_input_embeddings()(window.tokens)
        return mtp_step(self.model, k, embeds, window.hidden, window.positions.clamp(min=0), mask, cache=self.cache,
                        logits_to_keep=1)
