"""examples/finetune.py on a saved model: it trains with the model's own tokenizer and saves what it trained."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from modeling_deepseek_v3 import DeepseekV3ForCausalLM, load_preset
from tests.utils import word_tokenizer

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "finetune.py"


def _example():
    spec = importlib.util.spec_from_file_location("finetune_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_a_saved_model_trains_from_its_own_loss_and_what_it_trained_reloads(tmp_path: Path, lora: bool) -> None:
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
    argv = ["--model", str(folder), "--steps", "1", "--text", str(text), "--out", str(out)] + ["--lora"] * lora
    trainer = _example().main(argv)

    # the reference: the saved model's next-token loss on the first block, tokenized by hand (word i -> id i)
    block = torch.tensor([[int(word[1:]) for word in words[:128]]])
    model = DeepseekV3ForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(block).logits
    expected = F.cross_entropy(logits[0, :-1], block[0, 1:]).item()
    first = trainer.state.log_history[0]
    assert first["step"] == 1 and not any(key.startswith("mtp_") for key in first)  # tiny has no MTP module
    # the logged objective adds the balance loss to the next-token loss
    assert first["loss"] - first.get("balance_loss", 0.0) == pytest.approx(expected, abs=2e-3)

    # --out holds what was trained: the adapter over the saved model, or the whole model
    trained = trainer.model.eval()
    if lora:
        assert not (out / "model.safetensors").exists()
        reloaded = PeftModel.from_pretrained(DeepseekV3ForCausalLM.from_pretrained(folder), out).eval()
        names = [name for name, _ in trained.named_parameters() if "lora_" in name]
    else:
        reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
        names = list(trained.state_dict())  # the routing biases included
        assert any(not torch.equal(trained.state_dict()[n], model.state_dict()[n]) for n in names)  # it trained
    saved = reloaded.state_dict()
    assert names and all(torch.equal(saved[n], trained.state_dict()[n]) for n in names)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(block).logits, trained(block).logits, rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(out)(" ".join(words[:5]))["input_ids"] == block[0, :5].tolist()


def test_a_model_folder_without_a_tokenizer_is_refused(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "model"
    DeepseekV3ForCausalLM(load_preset("tiny")).save_pretrained(folder)
    with pytest.raises(SystemExit) as exc:
        _example().main(["--model", str(folder), "--steps", "1", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert f"--model: {folder} has no tokenizer this example can load" in capsys.readouterr().err
