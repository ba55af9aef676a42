"""End-to-end demo of the whole recipe: train a byte-level BPE tokenizer and a small DeepSeek-V3 with one MTP module
and the routing-bias update on Shakespeare, then sample from it, decode speculatively with the MTP module against
plain decoding, and plot the loss and the expert load.

Everything runs offline: the corpus ships in `modeling_deepseek_v3/data`, and the trained model is reloaded from disk
through `pipeline("text-generation")`, i.e. through the Auto classes this package registers for `deepseek_v3`.

References: karpathy/nanoGPT `data/shakespeare_char` (the corpus idea); transformers `Trainer`, `pipeline`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
    TrainingArguments,
    default_data_collator,
    pipeline,
    set_seed,
)
from transformers.trainer_callback import PrinterCallback, TrainerCallback
from transformers.utils import logging as hf_logging

from .configuration import load_preset
from .model import DeepseekV3ForCausalLM
from .plots import plot_expert_load, plot_losses
from .trainer import DeepseekV3Trainer, ExpertBalanceCallback

SPECIAL_TOKEN = "<|endoftext|>"
BLOCK_SIZE = 256
EVAL_FRACTION = 0.05
BATCH_SIZE = 8
# The presets small enough to train from scratch in fp32 on one device (not the 671B one).
DEMO_PRESETS = ("tiny", "small", "bench")
# Written into the output folder, listing the files the run saved: a later run may replace exactly those.
DEMO_RECORD = "demo-output.json"
MTP_MODULES = 1  # as in DeepSeek-V3
SPECULATIVE_PROMPTS = 4  # held-out prompts decoded both ways
PROMPT_TOKENS = 32
LOG_POINTS = 20  # logged training steps, for the loss plot
# The loss plot's marker: the final eval on the held-out blocks, text never trained on, so it may sit above the curve
EVAL_LABEL = "held-out next-token loss (text not trained on)"
# The loss plot's curves, by what the line names (the objective's weights are filled in from the config)
OBJECTIVE_LABEL = "total objective (next token + {weight:g} x MTP + balance)"
NEXT_TOKEN_LABEL = "next-token loss (main model)"
MTP_LABEL = "MTP loss (module 1)"
EVAL_CAPTION = ("The red marker is the next-token loss on held-out text the model never trained on, after the last "
                "step; unseen text is harder, so it may sit above the training next-token curve.")


class DemoArgumentError(ValueError):
    """A bad `run_demo` argument or corpus; the CLI prints it as a one-line error instead of a traceback."""


def next_token_loss(logs: dict[str, float], mtp_loss_weight: float) -> float:
    """The main model's next-token loss in a training log: the logged `loss` is the whole objective,
    main + λ/D·Σ_k MTP_k + balance, with λ = `mtp_loss_weight` and D the MTP modules in the log."""
    mtp = [value for key, value in logs.items() if re.fullmatch(r"mtp_\d+_loss", key)]
    mtp_term = mtp_loss_weight / len(mtp) * sum(mtp) if mtp else 0.0
    return logs["loss"] - mtp_term - logs.get("balance_loss", 0.0)


class ShortLogLines(TrainerCallback):
    """The demo's own progress: one short line per training log (the full log, per layer, stays in the Trainer's
    `log_history`), in place of transformers' progress bar and log dictionaries. A line names each loss: the main
    model's next-token loss, the MTP loss, and the total objective the optimizer minimises; then the least balanced
    layer's max/mean expert load and the seconds per step so far (a slow machine shows at the first line)."""

    def __init__(self, mtp_loss_weight: float, clock: Callable[[], float] = time.perf_counter) -> None:
        self.mtp_loss_weight = mtp_loss_weight
        self.clock = clock
        self.start = 0.0

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        self.start = self.clock()
        if state.is_world_process_zero:
            print(f"[demo] each line: the main model's next-token loss, the MTP module's loss, and the total objective "
                  f"trained (next token + {self.mtp_loss_weight:g} x MTP + balance loss)")

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if not (state.is_world_process_zero and logs and "loss" in logs):
            return
        parts = [f"next-token loss {next_token_loss(logs, self.mtp_loss_weight):.3f}"]
        if "mtp_1_loss" in logs:
            parts.append(f"MTP loss {logs['mtp_1_loss']:.3f}")
        parts.append(f"total objective {logs['loss']:.3f}")
        if "expert_load_max_over_mean" in logs:
            parts.append(f"max/mean expert load {logs['expert_load_max_over_mean']:.3f}")
        seconds = (self.clock() - self.start) / max(state.global_step, 1)
        print(f"[demo] step {state.global_step}/{state.max_steps}: {', '.join(parts)}; {seconds:.2f} s/step")


def expert_load_panel_names(layers: list[str], num_hidden_layers: int) -> dict[str, str]:
    """Names for the expert-load panels: an MTP module's block (a decoder-layer index past the main model's) is
    named as the module, e.g. `MTP module 1 (model.layers.4)`; the main model's layers keep their names."""
    names = {}
    for layer in layers:
        index = int(layer.rsplit(".", 1)[1])
        names[layer] = f"MTP module {index - num_hidden_layers + 1} ({layer})" if index >= num_hidden_layers else layer
    return names


class BlockDataset(torch.utils.data.Dataset):
    """Fixed-length token blocks; labels equal input_ids because the model shifts them for the next-token loss."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks  # [n_blocks, block_size], int64

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i].clone()}


def _read_corpus(corpus: str | Path | None) -> str:
    if corpus is None:
        return resources.files("modeling_deepseek_v3.data").joinpath("shakespeare.txt").read_text(encoding="utf-8")
    path = Path(corpus)
    if not path.is_file():
        raise DemoArgumentError(f"corpus: {path} is not an existing file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DemoArgumentError(f"corpus: {path} is not UTF-8 text ({e})") from e
    if not text.strip():
        raise DemoArgumentError(f"corpus: {path} is empty")
    return text


def _previous_demo_files(out: Path) -> list[str]:
    """The files an earlier demo run saved in `out` (empty for a new or empty folder).

    Raises:
        DemoArgumentError: if `out` is a file, or a non-empty folder that is not an earlier demo output: the demo would
            overwrite (or, for a sharded checkpoint, half replace) what it holds.
    """
    if out.exists() and not out.is_dir():
        raise DemoArgumentError(f"out: {out} is a file, not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return []
    record = out / DEMO_RECORD
    if not record.is_file():
        raise DemoArgumentError(
            f"out: {out} is not empty and is not the output of an earlier demo run (it has no {DEMO_RECORD}); the "
            "demo would overwrite its files. Choose a new or empty folder"
        )
    try:
        entry = json.loads(record.read_text())
        listed, name = (entry["kept"], "kept") if entry.get("unfinished") else (entry["files"], "files")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise DemoArgumentError(f"out: {record} is not a demo record ({e!r}); choose another folder") from e
    if not isinstance(listed, list) or not all(isinstance(f, str) and Path(f).name == f for f in listed):
        raise DemoArgumentError(f"out: {record} must list plain file names under '{name}'")
    if entry.get("unfinished"):  # an interrupted save: every file but the user's own is the demo's
        return sorted(_file_names(out) - set(listed))
    return listed


def _save_replacing(out: Path, previous: list[str], writers: list[Callable[[Path], object]]) -> None:
    """Write into `out` with `writers` (each called with the folder) after removing the previous demo run's files, so
    no stale shard or index survives, and record what was written."""
    out.mkdir(parents=True, exist_ok=True)
    others = _file_names(out) - set(previous)  # files of the user's, kept and never recorded
    # recorded first, so that a rerun after an interruption knows which files to replace (all but the user's)
    (out / DEMO_RECORD).write_text(json.dumps({"unfinished": True, "kept": sorted(others)}, indent=2) + "\n")
    for name in previous:
        (out / name).unlink(missing_ok=True)
    for write in writers:
        write(out)
    (out / DEMO_RECORD).write_text(json.dumps({"files": sorted(_file_names(out) - others)}, indent=2) + "\n")


def _file_names(folder: Path) -> set[str]:
    return {path.name for path in folder.iterdir() if path.is_file() and path.name != DEMO_RECORD}


def train_tokenizer(text: str, vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a GPT-2-style byte-level BPE on `text`, with `<|endoftext|>` as bos, eos and pad.

    A small corpus may run out of merges before `vocab_size`; callers must size the model from `len(tokenizer)`.
    """
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False so that decode(encode(prompt)) == prompt and generated text starts with the prompt.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL_TOKEN],
        # The full byte alphabet keeps every input encodable, even bytes the corpus never contains.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIAL_TOKEN, eos_token=SPECIAL_TOKEN, pad_token=SPECIAL_TOKEN
    )


def make_datasets(ids: list[int], block_size: int) -> tuple[BlockDataset, BlockDataset, int]:
    """Cut `ids` into blocks and hold out the last ~5% of them for eval.

    Returns:
        (train, eval, block_size); block_size shrinks when the corpus has fewer than two full blocks.
    """
    block_size = min(block_size, len(ids) // 2)
    if block_size < 2:
        raise DemoArgumentError(f"corpus: only {len(ids)} tokens, too few to make a train and an eval block")
    n_blocks = len(ids) // block_size
    blocks = torch.tensor(ids[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)
    n_eval = max(1, round(n_blocks * EVAL_FRACTION))
    return BlockDataset(blocks[:-n_eval]), BlockDataset(blocks[-n_eval:]), block_size


@dataclasses.dataclass
class DemoReport:
    """What `run_demo` measured."""

    sample: str  # the sampled continuation, prompt included
    eval_loss: float
    perplexity: float
    acceptance_rate: float  # of the MTP drafts in greedy speculative decoding
    tokens_per_forward: float  # tokens per main-model forward in speculative decoding
    speedup: float  # plain decoding time / speculative decoding time, same prompts
    identical: bool  # greedy speculative output equals plain greedy output
    plots: list[Path]


def compare_decoding(model, prompts: list[torch.Tensor], new_tokens: int) -> tuple[float, float, float, bool]:
    """Greedy decoding of each prompt (`[1, w]`) plainly and with `use_mtp=True`, alternating, `new_tokens` each.

    Returns:
        `(speed-up, acceptance rate, tokens per main forward, outputs identical)`.
    """
    plain_seconds = speculative_seconds = 0.0
    accepted = drafted = row_steps = tokens = 0
    identical = True
    greedy = dict(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)  # exactly new_tokens per prompt
    with torch.inference_mode():
        for ids in prompts:
            start = time.perf_counter()
            plain = model.generate(ids, **greedy)
            plain_seconds += time.perf_counter() - start
            start = time.perf_counter()
            out = model.generate(ids, use_mtp=True, return_dict_in_generate=True, **greedy)
            speculative_seconds += time.perf_counter() - start
            identical &= torch.equal(out.sequences, plain)
            stats = out.speculative_stats
            accepted += sum(stats.accepted)
            drafted += len(stats.accepted) * stats.row_steps
            row_steps += stats.row_steps
            tokens += stats.tokens
    return plain_seconds / speculative_seconds, accepted / drafted, tokens / row_steps, identical


def run_demo(
    steps: int = 300,
    out: str | Path = "deepseek-v3-demo",
    preset: str = "small",
    corpus: str | Path | None = None,
    seed: int = 0,
    prompt: str = "ROMEO:",
    max_new_tokens: int = 60,
    threads: int | None = None,
    compare_tokens: int = 64,
) -> DemoReport:
    """Train a tokenizer and a DeepSeek-V3 with one MTP module from scratch on a text corpus (the routing biases
    train too), save both with PNG plots of the loss and the expert load, reload them, sample, and compare greedy
    self-speculative decoding with plain greedy decoding on held-out prompts.

    Args:
        steps: optimizer steps (>= 1).
        out: folder for the model, tokenizer, generation config and plots: a new or empty folder, or the output of
            an earlier run, whose saved files (listed in its `demo-output.json`) are replaced; created if missing.
        preset: name of a trainable configuration preset (`DEMO_PRESETS`).
        corpus: UTF-8 text file; None uses the packaged ~1 MB Shakespeare excerpt.
        seed: seeds weights, data order and sampling.
        prompt: text the sample continues.
        max_new_tokens: length of the sample in tokens (>= 1).
        threads: torch's intra-op threads for the run (>= 1), restored afterwards; None keeps torch's default (one
            per core). On a shared or busy machine 1 can be much faster: threads that wait for each other's cores
            stall every step.
        compare_tokens: tokens each held-out prompt decodes in the comparison of speculative and plain decoding
            (>= 1).

    Returns:
        A `DemoReport`.

    Raises:
        DemoArgumentError (a ValueError): on a bad argument, a missing or empty corpus, a preset not in
            `DEMO_PRESETS`, a corpus too short for two blocks, or an `out` that is a file or a non-empty folder
            other than an earlier demo output.
    """
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise DemoArgumentError(f"threads must be an int >= 1 (or None for torch's default), got {threads!r}")
    default_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers' loading and saving bars: the demo prints its own progress lines
    try:
        return _run_demo(steps, Path(out), preset, corpus, seed, prompt, max_new_tokens, compare_tokens)
    finally:
        torch.set_num_threads(default_threads)
        if bars:
            hf_logging.enable_progress_bar()


def _run_demo(steps: int, out: Path, preset: str, corpus: str | Path | None, seed: int, prompt: str,
              max_new_tokens: int, compare_tokens: int) -> DemoReport:
    if steps < 1:
        raise DemoArgumentError(f"steps must be >= 1, got {steps}")
    if max_new_tokens < 1:
        raise DemoArgumentError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if compare_tokens < 1:
        raise DemoArgumentError(f"compare_tokens must be >= 1, got {compare_tokens}")
    if preset not in DEMO_PRESETS:
        raise DemoArgumentError(f"preset: {preset!r} is not one of the demo presets {', '.join(DEMO_PRESETS)}")
    if not prompt:
        raise DemoArgumentError("prompt must be non-empty")
    text = _read_corpus(corpus)
    previous = _previous_demo_files(out)

    threads = torch.get_num_threads()
    print(f"[demo] torch uses {threads} CPU thread{'s' if threads > 1 else ''}; on a shared or busy machine "
          "`--threads 1` can be much faster")
    target_vocab = load_preset(preset).vocab_size
    print(f"[demo] corpus: {len(text.encode('utf-8')):,} bytes; training byte-level BPE (target vocab {target_vocab})")
    tokenizer = train_tokenizer(text, target_vocab)
    special_id = tokenizer.convert_tokens_to_ids(SPECIAL_TOKEN)
    config = load_preset(
        preset,
        vocab_size=len(tokenizer),
        bos_token_id=special_id,
        eos_token_id=special_id,
        pad_token_id=special_id,
        num_nextn_predict_layers=MTP_MODULES,
    )
    ids = tokenizer.backend_tokenizer.encode(text).ids
    train_ds, eval_ds, block_size = make_datasets(ids, min(BLOCK_SIZE, config.max_position_embeddings))
    print(
        f"[demo] tokenizer: vocab {len(tokenizer)}; {len(ids):,} tokens -> {len(train_ds)} train / {len(eval_ds)} "
        f"eval blocks of {block_size}"
    )

    set_seed(seed)  # weights depend on the seed only, not on what ran before
    model = DeepseekV3ForCausalLM(config)
    model.config.use_cache = False  # a cache is useless in training and costs memory every forward
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[demo] model: preset {preset!r} with {MTP_MODULES} MTP module, {n_params / 1e6:.2f} M parameters; "
          f"training {steps} steps (MTP loss, routing-bias update, balance loss)")

    use_cpu = not torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=BATCH_SIZE,
        per_device_eval_batch_size=BATCH_SIZE,
        learning_rate=1e-3,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,  # a float below 1 is a fraction of max_steps
        weight_decay=0.1,
        logging_steps=max(1, steps // LOG_POINTS),
        report_to="none",
        use_cpu=use_cpu,
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,  # the demo prints its own progress lines (ShortLogLines), no bars between them
        dataloader_num_workers=0,
        dataloader_pin_memory=not use_cpu,  # pinned memory only serves copies to a GPU
        seed=seed,
    )
    balance = ExpertBalanceCallback(keep_history=True)  # every step's expert load, for the plot
    trainer = DeepseekV3Trainer(  # Trainer plus the balance and MTP metrics in its logs
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, data_collator=default_data_collator,
        callbacks=[balance],
    )
    trainer.remove_callback(PrinterCallback)  # it prints every log as a dictionary
    trainer.add_callback(ShortLogLines(config.mtp_loss_weight))
    trainer.train()

    # perplexity is the main model's (the next token): the evaluation runs without the MTP term of the objective
    model.config.use_mtp_modules = False
    try:
        eval_loss = trainer.evaluate()["eval_loss"]
    finally:
        model.config.use_mtp_modules = True
    perplexity = math.exp(min(eval_loss, 50.0))
    print(f"[demo] held-out next-token loss {eval_loss:.4f}, perplexity {perplexity:.2f}, on text not trained on "
          "(harder than the training text, so it may sit above the training next-token loss; the red marker in "
          "loss.png)")

    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    curves = {
        OBJECTIVE_LABEL.format(weight=config.mtp_loss_weight): [e["loss"] for e in logged],
        NEXT_TOKEN_LABEL: [next_token_loss(e, config.mtp_loss_weight) for e in logged],
        MTP_LABEL: [e["mtp_1_loss"] for e in logged],
    }
    loads = {layer: torch.stack([step[layer] for step in balance.history]) for layer in balance.history[0]}
    plots = [out / "loss.png", out / "expert_load.png"]
    model.config.use_cache = True
    model.generation_config = GenerationConfig(
        bos_token_id=special_id, eos_token_id=special_id, pad_token_id=special_id
    )
    _save_replacing(out, previous, [
        model.save_pretrained,
        tokenizer.save_pretrained,
        lambda _: plot_losses([e["step"] for e in logged], curves, eval_loss, EVAL_LABEL, plots[0], EVAL_CAPTION),
        lambda _: plot_expert_load(loads, plots[1], f"expert load per MoE layer, {steps} steps, routing-bias update "
                                   f"γ = {config.routing_bias_update_speed}",
                                   expert_load_panel_names(list(loads), config.num_hidden_layers)),
    ])
    print(f"[demo] saved model and tokenizer to {out}")

    # Reload from disk, as a user would: this exercises the Auto registration and the saved tokenizer.
    generator = pipeline("text-generation", model=str(out), tokenizer=str(out), device="cpu" if use_cpu else 0)
    set_seed(seed)
    sample = generator(prompt, do_sample=True, top_k=50, temperature=0.8, max_new_tokens=max_new_tokens)
    generated = sample[0]["generated_text"]
    print(f"[demo] sample ({max_new_tokens} new tokens max):\n{generated}")

    prompts = [eval_ds[i]["input_ids"][None, :PROMPT_TOKENS].to(generator.model.device)
               for i in range(min(SPECULATIVE_PROMPTS, len(eval_ds)))]
    speedup, acceptance, per_forward, identical = compare_decoding(generator.model, prompts, compare_tokens)
    print(f"[demo] speculative decoding with the MTP module, {len(prompts)} held-out prompts x "
          f"{compare_tokens} new tokens, greedy: acceptance {acceptance:.1%}, {per_forward:.2f} tokens per "
          f"main-model forward, {speedup:.2f}x the speed of plain decoding; outputs identical: "
          f"{'yes' if identical else 'NO'}")
    print(f"[demo] plots: {plots[0]}, {plots[1]}")
    return DemoReport(generated, eval_loss, perplexity, acceptance, per_forward, speedup, identical, plots)
