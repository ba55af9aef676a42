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


def plot_losses(steps: list[int], curves: dict[str, list[float]], eval_loss: float | None, eval_label: str,
                path: str | Path) -> Path:
    """Training losses at each logged step (`{label: values}`), and the final held-out loss as one marker."""
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(6, 3.6))
    for label, values in curves.items():
        ax.plot(steps, values, label=label)
    if eval_loss is not None:
        ax.scatter([steps[-1]], [eval_loss], color="tab:red", zorder=3, label=f"{eval_label} {eval_loss:.3f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)


def plot_expert_load(loads: dict[str, torch.Tensor], path: str | Path, title: str) -> Path:
    """One panel per MoE layer: each expert's share of the layer's routed tokens over the steps (moving average),
    and the even share `1/E` as a dashed line.

    Args:
        loads: `{layer name: tokens per expert [steps, E]}`.
    """
    plt = _pyplot()
    layers = list(loads)
    figure, axes = plt.subplots(1, len(layers), figsize=(4.5 * len(layers), 3.6), sharey=True, squeeze=False)
    for ax, layer in zip(axes[0], layers):
        load = loads[layer].double()
        share = load / load.sum(dim=1, keepdim=True).clamp(min=1)  # [steps, E]
        kernel = min(SMOOTHING_STEPS, len(share))
        smooth = torch.nn.functional.avg_pool1d(share.T.unsqueeze(1), kernel, stride=1).squeeze(1).T
        ax.plot(range(kernel, len(share) + 1), smooth.numpy())
        ax.axhline(1 / load.shape[1], color="black", linestyle="--", linewidth=1)
        tail = load[-SMOOTHING_STEPS:].sum(0)
        last = min(SMOOTHING_STEPS, len(load))
        balance = (tail.max() / tail.mean()).item()
        ax.set_title(f"{layer}: max/mean {balance:.2f} over the last {last} steps", fontsize=9)
        ax.set_xlabel("optimizer step")
    axes[0][0].set_ylabel("share of routed tokens per expert")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)
