"""What the demo shows a reader: the parts of the loss in its log lines, and the labels of its plots."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from modeling_deepseek_v3.demo import EVAL_LABEL, ShortLogLines, expert_load_panel_names, next_token_loss
from modeling_deepseek_v3.plots import balance_summary, expert_load_figure, loss_figure


def test_next_token_loss_takes_the_mtp_and_balance_terms_out_of_the_objective() -> None:
    # objective = main + λ/D·Σ_k MTP_k + balance, with λ = 0.3
    assert next_token_loss({"loss": 5.0, "mtp_1_loss": 4.0, "balance_loss": 0.01}, 0.3) == pytest.approx(3.79)
    two_modules = {"loss": 5.0, "mtp_1_loss": 4.0, "mtp_2_loss": 6.0, "mtp_1_accuracy": 0.5}
    assert next_token_loss(two_modules, 0.3) == pytest.approx(3.5)  # 0.3 / 2 · (4 + 6)
    assert next_token_loss({"loss": 5.0}, 0.3) == 5.0


class _Bar:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, line: str) -> None:
        self.lines.append(line)


def test_the_log_line_shows_the_objective_and_its_next_token_and_mtp_parts(tmp_path) -> None:
    callback = ShortLogLines(mtp_loss_weight=0.3)
    callback.training_bar = _Bar()
    logs = {"loss": 5.0, "mtp_1_loss": 4.0, "balance_loss": 0.01, "expert_load_max_over_mean": 1.25}
    state = TrainerState(global_step=7)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    callback.on_log(args, state, TrainerControl(), logs=logs)
    assert callback.training_bar.lines == [
        "[demo] step 7: loss 5.000 (next token 3.790, MTP 4.000), max/mean expert load 1.250"
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


def test_the_loss_plot_labels_the_held_out_marker_as_text_not_trained_on() -> None:
    figure = loss_figure([1, 2], {"training objective": [6.0, 5.0]}, 5.5, EVAL_LABEL)
    labels = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    assert labels == ["training objective", "held-out text (not trained on), next token 5.500"]
