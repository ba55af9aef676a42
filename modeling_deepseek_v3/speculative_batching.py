"""Self-speculative decoding with MTP module 1 inside continuous batching (`generate_batch(..., use_mtp=True)`, the
batching manager, `deepseek-v3 serve --use-mtp`).

Each step, every decoding request asks the scheduler for `1 + n` query slots (its newest token and n drafts, n =
`num_draft_tokens` or fewer near `max_new_tokens`), so its pages are reserved with the rest of the batch. Before the
forward, MTP module 1 catches up on the positions whose main hidden state `h^0` it has not read yet (one flat forward
over all requests), drafts `d_1` from the last one, and chains: draft j reads `d_{j-1}` and the module's own output
of the previous position (one flat forward per depth). The drafts replace the placeholders of the flat batch; one
main-model forward verifies every request's drafts at once. A request keeps its longest prefix of drafts equal to the
main model's argmax plus the main model's next token (`generation.greedy_accepted`, the rule of plain
`generate(use_mtp=True)`), stops at EOS or `max_new_tokens` inside them, and its cached length is set back to its
accepted tokens: the blocks reserved for rejected drafts go back to the pool, and the rows they held are written again
before any read. Greedy output is token for token that of plain continuous batching.

The module's latents live in the same paged cache, one more page per block (`PagedLatentCacheWithDrafter`), at the
rows of the same positions; prefix sharing is off (a shared block would lack the module's rows of the request
that found it).

Dimension letters: T tokens of a flat batch, H hidden, V vocabulary.
References: DeepSeek-V3 report §5.4.3; Leviathan et al. 2023 (arXiv 2211.17192); docs/batching.md (MTP drafting);
transformers `generation/continuous_batching/continuous_api.py` (`ContinuousBatchProcessor`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.generation.continuous_batching import RequestStatus

from .mtp import mtp_step
from .paged_attention import PagedBatch
from .private_api import continuous_batch_processor_class, free_blocks_beyond
from .speculation import SpeculativeStats, greedy_accepted, speculative_sampling


@dataclass
class _Verified:
    """One request's share of a verification forward."""

    future_state: object  # transformers' FutureRequestState
    drafted: int  # drafts among its query tokens
    tokens: list[int]  # its accepted drafts, then the main model's next token (prefill: that token alone)
    hidden: torch.Tensor  # [q, H] h^0 of its query positions


class SpeculativeBatchProcessor(continuous_batch_processor_class()):
    """transformers' batch processor with MTP drafting: built by `init_continuous_batching` when the generation config
    sets `use_mtp=True`, then `enable_drafting` is called.

    Attributes:
        speculative_stats: `SpeculativeStats` of the run (every request; `main_forwards` counts batch forwards).
        request_stats: request id -> its own `SpeculativeStats`, attached to its output as `speculative_stats`.
    """

    def enable_drafting(self, num_draft_tokens: int) -> None:
        self.num_draft_tokens = num_draft_tokens
        self.speculative_stats = SpeculativeStats([0] * num_draft_tokens, [0] * num_draft_tokens)
        self.request_stats: dict[str, SpeculativeStats] = {}
        self.unread: dict[str, torch.Tensor] = {}  # request id -> [n, H] h^0 of its last n cached positions
        self.verified: list[_Verified] = []

    def prepare_next_batch(self) -> bool:
        for state in self.scheduler.active_requests.values():
            if state.status == RequestStatus.DECODING and state.generated_len() > 0:
                room = self.num_draft_tokens
                if state.max_new_tokens is not None:  # the last token comes from the main model
                    room = min(room, state.max_new_tokens - state.generated_len() - 1)
                newest = state.tokens_to_process[0]
                state.tokens_to_process = [newest] * (1 + max(room, 0))  # placeholders for the drafts
        return super().prepare_next_batch()

    @torch.no_grad()
    def _generation_step(self, model) -> None:
        io = self.inputs_and_outputs
        batch = io.get_model_kwargs()
        requests = io.requests_in_batch
        cu_q = io.cumulative_seqlens_q[: len(requests) + 1].tolist()
        # the logits processors' per-request arguments are columns, one per request with a new token, in batch order
        columns = {i: j for j, i in enumerate(i for i, fs in enumerate(requests) if fs.has_new_token)}
        args = batch["logits_processor_args"]
        decoding = [i for i, fs in enumerate(requests) if fs.state.generated_len() > 0 and fs.query_length > 1]
        draft_probs = {}
        if decoding:
            drafts, probs = self._draft(model, [requests[i] for i in decoding], [columns[i] for i in decoding], args)
            for n, (i, row) in enumerate(zip(decoding, drafts)):
                io.input_ids[cu_q[i] + 1 : cu_q[i + 1]] = torch.tensor(row, dtype=io.input_ids.dtype)
                draft_probs[i] = None if probs is None else probs[n]
        model_kwargs = {k: v for k, v in batch.items() if k not in ("logits_indices", "logits_processor_args")}
        hidden = model.model(**model_kwargs).last_hidden_state[0]  # [T, H]
        # logits at every query slot of a decoding request, at the last slot of a prefill that ends
        slots, slot_columns = [], []
        for i, fs in enumerate(requests):
            if fs.has_new_token:
                own = range(cu_q[i], cu_q[i + 1]) if fs.state.generated_len() > 0 else [cu_q[i + 1] - 1]
                slots.extend(own)
                slot_columns.extend([columns[i]] * len(own))
        scores = self._scores(model.lm_head(hidden[slots]), slot_columns, args) if slots else None
        self.verified, at = [], 0
        for i, fs in enumerate(requests):
            rows = hidden[cu_q[i] : cu_q[i + 1]]
            if not fs.has_new_token:
                self.verified.append(_Verified(fs, 0, [], rows))
                continue
            drafted = fs.query_length - 1 if fs.state.generated_len() > 0 else 0
            checked = scores[at : at + drafted + 1]  # [n + 1, V]
            at += drafted + 1
            drafts = io.input_ids[cu_q[i] + 1 : cu_q[i + 1]].long()[None] if drafted else checked.new_zeros(1, 0).long()
            if self.do_sample:
                q = draft_probs.get(i, checked.new_zeros(0, checked.shape[-1]))
                accepted, step = speculative_sampling(torch.softmax(checked, -1)[None], q[None], drafts)
            else:
                step = checked.argmax(-1)[None]
                accepted = greedy_accepted(drafts, step)
            self.verified.append(_Verified(fs, drafted, step[0, : int(accepted) + 1].tolist(), rows))
        self.speculative_stats.main_forwards += 1

    def update_batch(self) -> None:
        outputs = []
        for step in self.verified:
            state = step.future_state.state
            if state.status in (RequestStatus.FINISHED, RequestStatus.PENDING):
                raise RuntimeError(f"Tried to update {state.status.name} request {state.request_id}")
            past = state.position_offset - step.future_state.query_length
            was_decoding = state.generated_len() > 0
            kept, finished = 0, False
            for token in step.tokens:
                kept += 1
                finished = state.update_and_check_completion(token, None)
                if finished:
                    break
            # cached: the prompt chunk, or the newest token and the accepted drafts (the last kept token is fed next)
            cached = step.future_state.query_length - step.drafted - 1 + kept if step.tokens else len(step.hidden)
            state.position_offset = past + cached
            rid = state.request_id
            unread = self.unread.get(rid)
            new = step.hidden[:cached]
            # a request (re)starting its prefill has nothing the module read before
            self.unread[rid] = new.clone() if unread is None or past == 0 else torch.cat([unread, new])
            if was_decoding:
                own = self.request_stats.setdefault(rid, self._new_stats())
                own.main_forwards += 1
                for stats in (self.speculative_stats, own):
                    stats.add_step(step.drafted, len(step.tokens) - 1, kept)
            if finished:
                self.scheduler.finish_request(rid)
                self.scheduler.block_new_requests = False
                self.unread.pop(rid, None)
            else:
                free_blocks_beyond(self.cache, rid, state.position_offset)
            if step.tokens and (state.streaming or finished):
                output = state.to_generation_output()
                stats = self.request_stats.pop(rid, None) if finished else self.request_stats.get(rid)
                output.speculative_stats = stats if stats is not None else self._new_stats()
                outputs.append(output)
        # requests cancelled or failed since: nothing of them is read again
        for table in (self.unread, self.request_stats):
            for rid in [rid for rid in table if rid not in self.scheduler.active_requests]:
                del table[rid]
        if outputs:
            self.output_router.deliver_batch(outputs)

    def _new_stats(self) -> SpeculativeStats:
        stats = SpeculativeStats([0] * self.num_draft_tokens, [0] * self.num_draft_tokens)
        stats.main_forwards = 1  # the prefill
        return stats

    def _scores(self, logits: torch.Tensor, columns: list[int], args: torch.Tensor) -> torch.Tensor:
        """Logits `[R, V]` through the batch's logits processors in fp32, row r with the arguments of the request in
        column `columns[r]` (as transformers processes one row per request)."""
        scores = logits.float()
        if self.logit_processor.do_processing:
            scores = self.logit_processor(None, scores, args[:, columns])
        return scores

    def _choose(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A token per row of `scores` `[R, V]`: the argmax, or a sample with its distribution `[R, V]`."""
        if not self.do_sample:
            return scores.argmax(-1), None
        probs = torch.softmax(scores, -1)
        return torch.multinomial(probs, num_samples=1).squeeze(1), probs

    def _draft(self, model, requests: list, columns: list[int],
               args: torch.Tensor) -> tuple[list[list[int]], list[torch.Tensor] | None]:  # fmt: skip
        """Drafts for each decoding request of the batch (`query_length - 1` each) with MTP module 1: a catch-up
        forward over its unread positions, then one forward per further depth, chained on the module's output.
        Sampling, also the distribution `[n, V]` each request's drafts were drawn from (else None)."""
        spans, embeds, hidden = [], [], []
        for fs in requests:
            state = fs.state
            newest_position = state.position_offset - fs.query_length
            unread = self.unread.pop(state.request_id)
            start = newest_position - unread.shape[0]
            # module 1 at position i reads the token i + 1: the newest token is the last of them
            tokens = (state.initial_tokens + state.generated_tokens)[start + 1 : newest_position + 1]
            spans.append((state.request_id, start, len(tokens)))
            embeds.append(torch.tensor(tokens))
            hidden.append(unread)
        ends = torch.tensor([length for *_, length in spans]).cumsum(0) - 1
        h, logits = self._run_module(model, spans, torch.cat(embeds), torch.cat(hidden), ends)
        draft, probs = self._choose(self._scores(logits, columns, args))
        last = h[ends]  # per request: the module's newest output (and `draft` its newest draft)
        drafts = [[d] for d in draft.tolist()]
        chosen = None if probs is None else [[row] for row in probs]
        wanted = [fs.query_length - 1 for fs in requests]
        for depth in range(2, max(wanted) + 1):
            going = [r for r, n in enumerate(wanted) if n >= depth]
            index = torch.tensor(going)
            # draft `depth` sits at the position after draft `depth - 1`'s, i.e. newest + depth - 2
            chained = [(spans[r][0], spans[r][1] + spans[r][2] + depth - 2, 1) for r in going]
            h, logits = self._run_module(model, chained, draft[index], last[index], torch.arange(len(going)))
            new, probs = self._choose(self._scores(logits, [columns[r] for r in going], args))
            last, draft = last.index_copy(0, index, h), draft.index_copy(0, index, new)
            for n, (r, d) in enumerate(zip(going, new.tolist())):
                drafts[r].append(d)
                if chosen is not None:
                    chosen[r].append(probs[n])
        return drafts, None if chosen is None else [torch.stack(rows) for rows in chosen]

    def _run_module(self, model, spans: list[tuple[str, int, int]], tokens: torch.Tensor, previous: torch.Tensor,
                    keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """MTP module 1 over `spans` (request id, first position, count) laid flat: `tokens` `[T]` the token one
        ahead of each position, `previous` `[T, H]` the hidden state it reads; writes its latents at the positions'
        rows of its page. Returns `h^1` `[T, H]` and the logits `[len(keep), V]` of the rows `keep`."""
        read, write = [[]], [[]]
        cu_q, cu_k, positions = [0], [0], []
        for request_id, start, count in spans:
            self.cache.extend_read_and_write_indices(request_id, start, count, read, write)
            cu_q.append(cu_q[-1] + count)
            cu_k.append(cu_k[-1] + start + count)
            positions.extend(range(start, start + count))
        device = previous.device

        def as_index(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, device=device)

        cb_kwargs = {
            "cu_seq_lens_q": as_index(cu_q),
            "cu_seq_lens_k": {self.cache.allocator.layer_type: as_index(cu_k)},
            "read_index": [as_index(read[0])],
            "write_index": [as_index(write[0])],
        }
        embeds = model.get_input_embeddings()(tokens.to(device))[None]
        layout = PagedBatch(self.cache, cb_kwargs, embeds.dtype)
        h, logits = mtp_step(model, 1, embeds, previous[None], as_index([positions]), None,
                             paged_batch=layout, logits_to_keep=keep.to(device))  # fmt: skip
        return h[0], logits[0]
