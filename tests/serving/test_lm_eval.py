"""`deepseek-v3 lm-eval`: lm-eval's own command line on a saved folder, with this package's class, on a tiny local
generation task (a task YAML and a JSON-lines dataset written here; no network), with and without `use_mtp=True`."""

import json

import pytest
import torch

import modeling_deepseek_v3
from modeling_deepseek_v3 import DeepseekV3ForCausalLM
from modeling_deepseek_v3.transformers_patch import PATCH_ENV_VAR
from modeling_deepseek_v3_cli import main

from ..utils import word_tokenizer

pytest.importorskip("lm_eval")

pytestmark = pytest.mark.slow

QUESTIONS = ["w005 w009 w017", "w040 w041", "w099 w100 w101", "w200"]
MAX_GEN_TOKS = 6
TASK = """\
task: tiny_words
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: {max_gen_toks}
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def task(mtp_folder, tmp_path_factory):
    """The task folder: the first and third questions' answers are the model's own greedy continuations (computed by
    plain `generate`), the others a word it does not say, so exact match is 0.5."""
    model = DeepseekV3ForCausalLM.from_pretrained(mtp_folder).eval()
    tokenizer = word_tokenizer()
    greedy = []
    for question in QUESTIONS:
        ids = tokenizer(question, return_tensors="pt").input_ids
        new = model.generate(ids, max_new_tokens=MAX_GEN_TOKS, do_sample=False)[0, ids.shape[1]:]
        greedy.append(tokenizer.decode(new, skip_special_tokens=True))
    answers = [greedy[0], "w003", greedy[2], "w003"]
    path = tmp_path_factory.mktemp("task")
    (path / "data.jsonl").write_text("".join(json.dumps({"question": q, "answer": a}) + "\n"
                                             for q, a in zip(QUESTIONS, answers)))
    (path / "tiny_words.yaml").write_text(TASK.format(data=path / "data.jsonl", max_gen_toks=MAX_GEN_TOKS))
    return path, greedy


def ran(module: torch.nn.Module) -> str | None:
    """What a forward of `module` says: the package of a `DeepseekV3*` class, or that an MTP module drafted."""
    name = type(module).__name__
    if name.startswith("DeepseekV3"):
        return type(module).__module__.split(".")[0]
    return name if name == "MTPLayer" else None


def evaluate(folder, task_path, out, extra: list[str]) -> tuple[float, list[str], set[str]]:
    """`deepseek-v3 lm-eval run ...`; returns the exact-match score, each document's answer, and what ran (`ran`)."""
    classes = set()
    hook = torch.nn.modules.module.register_module_forward_pre_hook(lambda module, args: classes.add(ran(module)))
    try:
        status = main(["lm-eval", "run", "--model", "hf", "--model_args", f"pretrained={folder},dtype=float32",
                       "--tasks", "tiny_words", "--include_path", str(task_path), "--device", "cpu",
                       "--batch_size", "1", "--output_path", str(out), "--log_samples", *extra])
    finally:
        hook.remove()
    assert status == 0
    (results,) = out.glob("**/results_*.json")
    (samples,) = out.glob("**/samples_tiny_words_*.jsonl")
    score = json.loads(results.read_text())["results"]["tiny_words"]["exact_match,none"]
    rows = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda r: r["doc_id"])
    return score, [row["filtered_resps"][0] for row in rows], classes


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No network, datasets cached under tmp_path, and the patch and its environment variable undone afterwards."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.delenv(PATCH_ENV_VAR, raising=False)
    yield
    modeling_deepseek_v3.restore_transformers()


def test_lm_eval_scores_a_folder_with_our_class(mtp_folder, task, isolated, tmp_path):
    score, answers, classes = evaluate(mtp_folder, task[0], tmp_path / "out", [])
    assert [a.split() for a in answers] == [g.split() for g in task[1]]
    assert score == 0.5
    assert classes - {None} == {"modeling_deepseek_v3"}


def test_lm_eval_with_use_mtp_scores_as_plain_decoding(mtp_folder, task, isolated, tmp_path):
    score, answers, classes = evaluate(mtp_folder, task[0], tmp_path / "out", ["--gen_kwargs", "use_mtp=True"])
    assert [a.split() for a in answers] == [g.split() for g in task[1]]
    assert score == 0.5
    assert classes - {None} == {"modeling_deepseek_v3", "MTPLayer"}  # our classes, and the MTP module drafted
