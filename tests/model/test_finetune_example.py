"""examples/finetune.py on a saved model: it trains with the model's own tokenizer and saves what it trained."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from modeling_deepseek_v3 import DeepseekV3ForCausalLM, load_preset
from tests.utils import word_tokenizer

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "finetune.py"


def _example():
    spec = importlib.util.spec_from_file_location("finetune_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lora_on_a_saved_model_starts_at_the_models_own_loss_and_saves_the_adapter(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = load_preset("tiny", use_cache=False)
    folder = tmp_path / "model"
    DeepseekV3ForCausalLM(config).save_pretrained(folder)
    tokenizer = word_tokenizer(config.vocab_size)
    tokenizer.save_pretrained(folder)
    # 300 words: one train block of 128 tokens (the example's block size) and one held-out block
    words = [f"w{(7 * i) % 400 + 10:03d}" for i in range(300)]
    text = tmp_path / "text.txt"
    text.write_text(" ".join(words), encoding="utf-8")

    out = tmp_path / "out"
    logs = _example().main(["--model", str(folder), "--lora", "--steps", "1", "--text", str(text), "--out", str(out)])

    # the reference: the saved model's next-token loss on the first block, tokenized by hand (word i -> id i)
    block = torch.tensor([[int(word[1:]) for word in words[:128]]])
    model = DeepseekV3ForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(block).logits
    expected = F.cross_entropy(logits[0, :-1], block[0, 1:]).item()
    first = logs[0]
    assert first["step"] == 1 and not any(key.startswith("mtp_") for key in first)  # tiny has no MTP module
    # the logged objective adds the balance loss to the next-token loss
    assert first["loss"] - first.get("balance_loss", 0.0) == pytest.approx(expected, abs=2e-3)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert (out / "tokenizer.json").is_file()


def test_a_model_folder_without_a_tokenizer_is_refused(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "model"
    DeepseekV3ForCausalLM(load_preset("tiny")).save_pretrained(folder)
    with pytest.raises(SystemExit) as exc:
        _example().main(["--model", str(folder), "--steps", "1", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert f"--model: {folder} has no tokenizer this example can load" in capsys.readouterr().err
