"""PNG plots of a training run: the loss over the steps, and every expert's share of the routed tokens per MoE layer.

matplotlib draws them into files only (no display).
"""

from __future__ import annotations

from pathlib import Path

import torch

SMOOTHING_STEPS = 10  # moving average of the expert shares, so the trend shows through step-to-step noise


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    return plt


def loss_figure(steps: list[int], curves: dict[str, list[float]], eval_loss: float | None, eval_label: str,
                caption: str | None = None):
    """Training losses at each logged step (`{label: values}`), the final held-out loss as one marker labelled
    `eval_label`, and `caption` (e.g. what the marker means) under the axes; returns the matplotlib figure."""
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(7, 4.4 if caption else 3.8))
    for label, values in curves.items():
        ax.plot(steps, values, label=label)
    if eval_loss is not None:
        ax.scatter([steps[-1]], [eval_loss], color="tab:red", zorder=3, label=f"{eval_label} {eval_loss:.3f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    if caption:
        figure.text(0.01, 0.01, caption, fontsize=8, wrap=True, va="bottom")
    figure.tight_layout(rect=(0, 0.09 if caption else 0, 1, 1))
    return figure


def plot_losses(steps: list[int], curves: dict[str, list[float]], eval_loss: float | None, eval_label: str,
                path: str | Path, caption: str | None = None) -> Path:
    """`loss_figure` saved as a PNG at `path`."""
    return _save(loss_figure(steps, curves, eval_loss, eval_label, caption), path)


def balance_summary(load: torch.Tensor) -> str:
    """The per-step max/mean expert load (the statistic the training log prints) over the last `SMOOTHING_STEPS`
    steps of `load` (`[steps, E]` tokens per expert): its median and range. Steps that routed no tokens are left out.
    """
    tail = load[-SMOOTHING_STEPS:].double()
    tail = tail[tail.sum(dim=1) > 0]
    if len(tail) == 0:
        return "no tokens routed"
    ratio = tail.max(dim=1).values / tail.mean(dim=1)
    return (f"max/mean per step: median {ratio.median().item():.2f} ({ratio.min().item():.2f}-"
            f"{ratio.max().item():.2f}), last {len(tail)} steps")


def expert_load_figure(loads: dict[str, torch.Tensor], title: str, names: dict[str, str] | None = None):
    """One panel per MoE layer: each expert's share of the layer's routed tokens over the steps (moving average),
    the even share `1/E` as a dashed line, and `balance_summary` in the panel's title; returns the figure.

    Args:
        loads: `{layer name: tokens per expert [steps, E]}`.
        title: the figure's title.
        names: a panel name per layer name (e.g. to name an MTP module); a layer not in it keeps its own name.
    """
    names = names or {}
    plt = _pyplot()
    layers = list(loads)
    figure, axes = plt.subplots(1, len(layers), figsize=(4.5 * len(layers), 3.8), sharey=True, squeeze=False)
    for ax, layer in zip(axes[0], layers):
        load = loads[layer].double()
        share = load / load.sum(dim=1, keepdim=True).clamp(min=1)  # [steps, E]
        kernel = min(SMOOTHING_STEPS, len(share))
        smooth = torch.nn.functional.avg_pool1d(share.T.unsqueeze(1), kernel, stride=1).squeeze(1).T
        ax.plot(range(kernel, len(share) + 1), smooth.numpy())
        n_experts = load.shape[1]
        even = ax.axhline(1 / n_experts, color="black", linestyle="--", linewidth=1, label=f"even share 1/{n_experts}")
        ax.legend(handles=[even], fontsize=8, loc="upper right")  # the experts' lines are too many to name
        ax.set_title(f"{names.get(layer, layer)}\n{balance_summary(load)}", fontsize=9)
        ax.set_xlabel("optimizer step")
    axes[0][0].set_ylabel(f"share of routed tokens per expert\n(moving average of {SMOOTHING_STEPS} steps)")
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def plot_expert_load(loads: dict[str, torch.Tensor], path: str | Path, title: str,
                     names: dict[str, str] | None = None) -> Path:
    """`expert_load_figure` saved as a PNG at `path`."""
    return _save(expert_load_figure(loads, title, names), path)


def _save(figure, path: str | Path) -> Path:
    figure.savefig(path, dpi=110)
    _pyplot().close(figure)
    return Path(path)
