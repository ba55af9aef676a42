"""Scalar training metrics recorded by the model during training forwards (balance losses, MTP losses, expert load)
and read by `Trainer` logging or a custom loop.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class TrainingMetrics:
    """Means of named scalars since the last `pop()`.

    Example:
        >>> model.training_metrics.add("mtp_1_loss", loss)   # in forward
        >>> model.training_metrics.pop()                       # at logging time: {"mtp_1_loss": 2.31}
    """

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}

    def add(self, name: str, value: torch.Tensor | float) -> None:
        """Record one value of `name`."""
        value = value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
        # summed on the value's device: no host sync per step, one read back at `pop`
        self._sums[name] = self._sums[name] + value if name in self._sums else value
        self._counts[name] = self._counts.get(name, 0) + 1

    def add_each(self, pattern: str, values: torch.Tensor) -> None:
        """Record `values[i]` as `pattern.format(i + 1)`, e.g. one loss per MTP depth."""
        for i, value in enumerate(values, start=1):
            self.add(pattern.format(i), value)

    def pop(self, distributed: bool = False, group=None) -> dict[str, float]:
        """The mean of every metric recorded since the last call, then forget them.

        Args:
            distributed: average over the ranks of `group` too (default: all ranks), which must all call `pop`
                with the same metrics recorded (e.g. the data-parallel ranks, each training on its own batch).
        """
        names = sorted(self._sums)
        if names and distributed and dist.is_initialized() and dist.get_world_size(group) > 1:
            device = self._sums[names[0]].device  # a model split over devices records on each: one for the collective
            sums = torch.stack([self._sums[name].to(device) for name in names])
            counts = torch.tensor([float(self._counts[name]) for name in names], device=device)
            totals = torch.cat([sums, counts])  # one collective for all metrics
            dist.all_reduce(totals, group=group)
            sums, counts = totals.split(len(names))
            means = dict(zip(names, (sums / counts).tolist()))
        else:
            means = {name: (self._sums[name] / self._counts[name]).item() for name in names}
        self._sums.clear()
        self._counts.clear()
        return means
