"""The rules and the statistics of speculative decoding, shared by `generate(use_mtp=True)` (`generation.py`) and
MTP drafting inside continuous batching (`speculative_batching.py`): which drafts a step accepts, greedily or by the
speculative rejection rule, and what is counted.

Dimension letters: b rows, D drafts, V vocabulary.
References: Leviathan et al. 2023 (arXiv 2211.17192) and Chen et al. 2023 (arXiv 2302.01318), speculative sampling.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class SpeculativeStats:
    """Acceptance statistics of a `generate(use_mtp=True)` call (`output.speculative_stats` with
    `return_dict_in_generate=True`), and of MTP drafting inside continuous batching (each request's output's
    `speculative_stats`; the run's on the manager's batch processor).

    Counts cover the rows still generating at each step.

    Args:
        proposed: per depth k (index k - 1), drafts of depth k that were checked: those whose shallower drafts of
            the same step were all accepted.
        accepted: per depth k, drafts of depth k that were accepted.
        main_forwards: main-model forwards, the prefill included.
        row_steps: verification forwards × rows still generating.
        tokens: tokens the verification forwards added, all rows (the prefill's first token not counted).
    """

    proposed: list[int]
    accepted: list[int]
    main_forwards: int = 0
    row_steps: int = 0
    tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts over all drafts made (D per row and step)."""
        drafted = len(self.accepted) * self.row_steps
        return sum(self.accepted) / drafted if drafted else 0.0

    @property
    def acceptance_rate_per_depth(self) -> list[float]:
        """Depth k: the share of its checked drafts that were accepted (given that drafts 1..k-1 were)."""
        return [a / p if p else 0.0 for a, p in zip(self.accepted, self.proposed)]

    @property
    def tokens_per_forward(self) -> float:
        """Tokens a row gains per verification forward (1 + its accepted drafts), averaged over rows and steps."""
        return self.tokens / self.row_steps if self.row_steps else 0.0

    def add_step(self, drafted: int, accepted: int, kept: int) -> None:
        """Tally one row's verification step: `drafted` drafts checked in order, the first `accepted` of them taken,
        `kept` tokens added (fewer than `accepted + 1` when the row stopped inside them)."""
        for depth in range(drafted):
            self.proposed[depth] += depth <= accepted
            self.accepted[depth] += depth < accepted
        self.row_steps += 1
        self.tokens += kept


def greedy_accepted(drafts: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """How many drafts each row accepts greedily: the longest prefix of `drafts` `[b, D]` equal to the main model's
    argmax `target` `[b, >= D]` at the same positions (a draft id of -1 never matches: rows with fewer drafts)."""
    return (drafts == target[:, : drafts.shape[1]]).long().cumprod(-1).sum(-1)


def speculative_sampling(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The speculative rejection rule: draft d_k is accepted with probability min(1, p(d_k) / q(d_k)) while all before
    it were; the first rejected one is replaced by a sample of norm(max(0, p - q)) at its position, and after D accepted
    drafts a bonus token comes from p. The tokens are then distributed exactly as sampling from p alone.

    Args:
        p: `[b, D + 1, V]` the main model's distributions at the newest token and each draft.
        q: `[b, D, V]` the drafter's distributions the drafts were sampled from.
        drafts: `[b, D]`.

    Returns:
        `(accepted [b], step_tokens [b, D + 1])`: row r keeps `step_tokens[r, : accepted[r] + 1]`.
    """
    depth = drafts.shape[1]
    p_draft = p[:, :depth].gather(-1, drafts[..., None]).squeeze(-1)
    q_draft = q.gather(-1, drafts[..., None]).squeeze(-1)
    accepted = (torch.rand_like(p_draft) * q_draft < p_draft).long().cumprod(-1).sum(-1)  # u < p / q
    # the first rejected position samples norm(max(0, p - q)); after D accepted drafts q is 0 there: p itself
    q = torch.cat([q, torch.zeros_like(p[:, :1])], dim=1)
    at = accepted[:, None, None].expand(-1, 1, p.shape[-1])
    p_next, q_next = p.gather(1, at).squeeze(1), q.gather(1, at).squeeze(1)
    residual = (p_next - q_next).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_next)  # p == q to rounding
    bonus = torch.multinomial(residual, num_samples=1)  # normalises
    step_tokens = torch.cat([drafts, bonus], dim=1).scatter(1, accepted[:, None], bonus)
    return accepted, step_tokens
