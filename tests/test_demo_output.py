"""What the demo shows a reader: the parts of the loss in its log lines, and the labels of its plots."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from modeling_deepseek_v3.demo import (
    EVAL_CAPTION,
    EVAL_LABEL,
    MTP_LABEL,
    NEXT_TOKEN_LABEL,
    OBJECTIVE_LABEL,
    ShortLogLines,
    expert_load_panel_names,
    next_token_loss,
)
from modeling_deepseek_v3.plots import balance_summary, expert_load_figure, loss_figure


def test_next_token_loss_takes_the_mtp_and_balance_terms_out_of_the_objective() -> None:
    # objective = main + λ/D·Σ_k MTP_k + balance, with λ = 0.3
    assert next_token_loss({"loss": 5.0, "mtp_1_loss": 4.0, "balance_loss": 0.01}, 0.3) == pytest.approx(3.79)
    two_modules = {"loss": 5.0, "mtp_1_loss": 4.0, "mtp_2_loss": 6.0, "mtp_1_accuracy": 0.5}
    assert next_token_loss(two_modules, 0.3) == pytest.approx(3.5)  # 0.3 / 2 · (4 + 6)
    assert next_token_loss({"loss": 5.0}, 0.3) == 5.0


def test_the_log_line_names_the_next_token_and_mtp_losses_and_the_total_objective(tmp_path, capsys) -> None:
    ticks = iter([100.0, 114.0])  # training begins at 100 s, the log at step 7 comes 14 s later
    callback = ShortLogLines(mtp_loss_weight=0.3, clock=lambda: next(ticks))
    state = TrainerState(global_step=7, max_steps=300)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    callback.on_train_begin(args, state, TrainerControl())
    logs = {"loss": 5.0, "mtp_1_loss": 4.0, "balance_loss": 0.01, "expert_load_max_over_mean": 1.25}
    callback.on_log(args, state, TrainerControl(), logs=logs)
    callback.on_log(args, state, TrainerControl(), logs={"eval_loss": 4.5})  # not a training log: no line
    assert capsys.readouterr().out.splitlines() == [
        "[demo] each line: the main model's next-token loss, the MTP module's loss, and the total objective trained "
        "(next token + 0.3 x MTP + balance loss)",
        "[demo] step 7/300: next-token loss 3.790, MTP loss 4.000, total objective 5.000, max/mean expert load 1.250; "
        "2.00 s/step",
    ]


def test_balance_summary_is_the_per_step_statistic_not_the_summed_load() -> None:
    # per-step max/mean: 4, 1, 2 (median 2); the loads summed over the steps would give 7 / 3 = 2.33
    load = torch.tensor([[4, 0, 0, 0], [1, 1, 1, 1], [2, 1, 1, 0], [0, 0, 0, 0]])
    assert balance_summary(load) == "max/mean per step: median 2.00 (1.00-4.00), last 3 steps"


def test_expert_load_panels_name_the_mtp_module_and_the_even_share() -> None:
    loads = {"model.layers.3": torch.tensor([[3, 1]] * 12), "model.layers.4": torch.tensor([[1, 1]] * 12)}
    names = expert_load_panel_names(list(loads), num_hidden_layers=4)
    assert names == {"model.layers.3": "model.layers.3", "model.layers.4": "MTP module 1 (model.layers.4)"}
    figure = expert_load_figure(loads, "expert load", names)
    main, mtp = figure.axes
    assert main.get_title() == "model.layers.3\nmax/mean per step: median 1.50 (1.50-1.50), last 10 steps"
    assert mtp.get_title().startswith("MTP module 1 (model.layers.4)\nmax/mean per step: median 1.00")
    assert [t.get_text() for t in mtp.get_legend().get_texts()] == ["even share 1/2"]


def test_the_loss_plot_labels_every_curve_and_explains_the_held_out_marker() -> None:
    curves = {OBJECTIVE_LABEL.format(weight=0.3): [6.0, 5.0], NEXT_TOKEN_LABEL: [4.0, 3.5], MTP_LABEL: [4.2, 3.6]}
    figure = loss_figure([1, 2], curves, 5.5, EVAL_LABEL, EVAL_CAPTION)
    labels = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    assert labels == ["total objective (next token + 0.3 x MTP + balance)", "next-token loss (main model)",
                      "MTP loss (module 1)", "held-out next-token loss (text not trained on) 5.500"]
    assert [t.get_text() for t in figure.texts] == [EVAL_CAPTION]
    assert "held-out text the model never trained on" in EVAL_CAPTION
