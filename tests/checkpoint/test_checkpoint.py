"""Checkpoints that load silently wrong or fail without naming the key: refused (or warned about) at load time; and
folders made loadable with trust_remote_code by processes that never imported the package."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from transformers import DeepseekV3ForCausalLM as BuiltinDeepseekV3ForCausalLM

from modeling_deepseek_v3 import DeepseekV3ForCausalLM
from modeling_deepseek_v3.checkpoint import write_remote_code
from modeling_deepseek_v3.convert import convert_checkpoint
from modeling_deepseek_v3_cli import main

from ..utils import QUANTIZATION, e4m3_value, random_ids, random_model, tiny_config, weight_blocks

PROJECTION = "model.layers.0.self_attn.q_b_proj.weight"


def write(folder, state: dict, config: dict, name="model.safetensors") -> None:
    folder.mkdir(exist_ok=True)
    save_file(state, folder / name, metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model saved in one file, its state and config."""
    torch.manual_seed(7)
    folder = tmp_path_factory.mktemp("plain")
    random_model().save_pretrained(folder)
    return folder, load_file(folder / "model.safetensors"), json.loads((folder / "config.json").read_text())


@pytest.fixture(scope="module")
def fp8_state(saved):
    """The same model as an official-format FP8 state: decoder projections in e4m3 with 128x128 block scales."""
    _, state, _ = saved
    fp8 = {}
    for key, tensor in state.items():
        if key.startswith("model.layers.") and tensor.dim() == 2 and not key.endswith("mlp.gate.weight"):
            fp8[key], fp8[f"{key}_scale_inv"] = weight_blocks(tensor)
        else:
            fp8[key] = tensor
    return fp8


def test_an_fp8_weight_stored_in_bf16_is_refused(saved, fp8_state, tmp_path):
    """The payload replaced by its dequantised bf16 values, scales and quantization_config kept: loading used to
    cast it back to FP8 and multiply by the scales a second time."""
    _, _, config = saved
    state = dict(fp8_state)
    state[PROJECTION] = e4m3_value(state[PROJECTION], state[f"{PROJECTION}_scale_inv"], (128, 128)).bfloat16()
    write(tmp_path / "ok", fp8_state, {**config, "quantization_config": QUANTIZATION})
    write(tmp_path / "bf16", state, {**config, "quantization_config": QUANTIZATION})
    DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ok")  # the intact FP8 checkpoint loads
    with pytest.raises(ValueError, match=rf"{PROJECTION} \(in model.safetensors\) is stored as BF16 next to its "
                                         rf"{PROJECTION}_scale_inv, but a weight with block scales must be an e4m3"):
        DeepseekV3ForCausalLM.from_pretrained(tmp_path / "bf16")


def test_an_e5m2_payload_is_refused(saved, fp8_state, tmp_path):
    _, _, config = saved
    state = dict(fp8_state)
    state[PROJECTION] = state[PROJECTION].float().to(torch.float8_e5m2)
    write(tmp_path, state, {**config, "quantization_config": QUANTIZATION})
    with pytest.raises(ValueError, match=rf"{PROJECTION} .* is stored as F8_E5M2 .*convert fp8-to-bf16"):
        DeepseekV3ForCausalLM.from_pretrained(tmp_path)


def test_a_tensor_in_two_shards_is_refused_where_transformers_loads_one(saved, tmp_path):
    folder, state, config = saved
    key = "model.norm.weight"
    first = {k: v for k, v in state.items() if k != key}
    index = {"metadata": {}, "weight_map": {**dict.fromkeys(first, "model-00001-of-00002.safetensors"),
                                            key: "model-00002-of-00002.safetensors"}}
    write(tmp_path, {**first, key: state[key] * 2}, config, "model-00001-of-00002.safetensors")
    save_file({key: state[key]}, tmp_path / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    BuiltinDeepseekV3ForCausalLM.from_pretrained(tmp_path)  # loads one of the two copies, without a word
    with pytest.raises(ValueError, match=rf"{key} is stored in both model-0000[12]-of-00002.safetensors and "
                                         r"model-0000[12]-of-00002.safetensors"):
        DeepseekV3ForCausalLM.from_pretrained(tmp_path)


def single_file_with_index(folder, state: dict, config: dict, weight_map: dict) -> None:
    write(folder, state, config)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_a_single_file_beside_an_index_that_agrees_loads(saved, tmp_path):
    """Official-format folders written by other tools hold `model.safetensors` and an index mapping every key to it;
    transformers' built-in class loads them, and so does ours, to the logits of the single file alone."""
    folder, state, config = saved
    single_file_with_index(tmp_path, state, config, dict.fromkeys(state, "model.safetensors"))
    ids = random_ids(tiny_config(), 2, 6)
    expected = DeepseekV3ForCausalLM.from_pretrained(folder).eval()(ids).logits
    loaded = DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=0)
    BuiltinDeepseekV3ForCausalLM.from_pretrained(tmp_path)


def test_a_single_file_beside_an_index_that_disagrees_is_refused(saved, tmp_path):
    """transformers loads model.safetensors and ignores the index, which then describes other weights; the converter
    refuses the same folders (tests/checkpoint/test_convert.py)."""
    _, state, config = saved
    others = tmp_path / "others"
    others.mkdir()
    single_file_with_index(others, state, config, {"x": "other.safetensors"})
    with pytest.raises(ValueError, match=r"holds both model.safetensors and model.safetensors.index.json, whose "
                                         r"index maps weights to other.safetensors"):
        DeepseekV3ForCausalLM.from_pretrained(others)
    unlisted = tmp_path / "unlisted"
    unlisted.mkdir()
    single_file_with_index(unlisted, state, config, dict.fromkeys(set(state) - {PROJECTION}, "model.safetensors"))
    with pytest.raises(ValueError, match=rf"1 keys are stored in model.safetensors but not listed in "
                                         rf"model.safetensors.index.json \({PROJECTION}\)"):
        DeepseekV3ForCausalLM.from_pretrained(unlisted)
    extra = tmp_path / "extra"
    extra.mkdir()
    single_file_with_index(extra, state, config, {**dict.fromkeys(state, "model.safetensors"),
                                                  "model.extra.weight": "model.safetensors"})
    with pytest.raises(ValueError, match=r"1 keys are listed in model.safetensors.index.json but not stored in "
                                         r"model.safetensors \(model.extra.weight\)"):
        DeepseekV3ForCausalLM.from_pretrained(extra)


def test_saving_over_an_earlier_save_of_the_other_layout_leaves_what_a_fresh_save_leaves(tmp_path):
    """Sharded, then one file, then sharded again into one folder: each time the folder holds the files a save into
    an empty folder holds, and loads to its logits. A file the save did not write is never removed."""
    model, ids = random_model(), random_ids(tiny_config(), 2, 6)
    expected = model(ids).logits
    folder = tmp_path / "again"
    folder.mkdir()
    (folder / "notes.txt").write_text("the user's own file")
    for shard_size in ("100KB", "5GB", "100KB"):
        model.save_pretrained(folder, max_shard_size=shard_size)
        fresh = tmp_path / f"fresh-{shard_size}"
        model.save_pretrained(fresh, max_shard_size=shard_size)
        assert sorted(p.name for p in folder.iterdir()) == sorted([p.name for p in fresh.iterdir()] + ["notes.txt"])
        torch.testing.assert_close(DeepseekV3ForCausalLM.from_pretrained(folder).eval()(ids).logits, expected,
                                   rtol=0, atol=0)


@pytest.fixture(scope="module")
def saved_mtp(tmp_path_factory):
    torch.manual_seed(8)
    folder = tmp_path_factory.mktemp("mtp")
    model = random_model(tiny_config(num_nextn_predict_layers=1))
    model.save_pretrained(folder)
    return model, folder


def test_a_stored_copy_holding_nan_warns(saved_mtp, tmp_path, caplog):
    model, folder = saved_mtp
    state = load_file(folder / "model.safetensors")
    state["model.layers.3.shared_head.head.weight"][2, 5] = float("nan")
    write(tmp_path, state, json.loads((folder / "config.json").read_text()))
    with caplog.at_level("WARNING"):
        back = DeepseekV3ForCausalLM.from_pretrained(tmp_path)
    assert "model.layers.3.shared_head.head.weight differs from lm_head.weight (max |difference| = nan)" in caplog.text
    assert torch.equal(back.lm_head.weight, model.lm_head.weight)  # the main tensor is used


def test_a_stored_copy_of_the_wrong_shape_names_the_key(saved_mtp, tmp_path):
    _, folder = saved_mtp
    state = load_file(folder / "model.safetensors")
    state["model.layers.3.embed_tokens.weight"] = state["model.layers.3.embed_tokens.weight"][:-1].clone()
    write(tmp_path, state, json.loads((folder / "config.json").read_text()))
    with pytest.raises(ValueError, match=r"the checkpoint's model.layers.3.embed_tokens.weight has shape \[511, 64\], "
                                         r"but it is a copy of a tensor of shape \[512, 64\]"):
        DeepseekV3ForCausalLM.from_pretrained(tmp_path)


FRESH_PROCESS_LOAD = """
import sys
import torch
from transformers import AutoModelForCausalLM
folder, ids_path = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
import modeling_deepseek_v3  # only now, to check the class: the load above did not need it
assert isinstance(model, modeling_deepseek_v3.DeepseekV3ForCausalLM), type(model)
with torch.no_grad():
    torch.save(model(torch.load(ids_path)).logits, ids_path + ".logits")
print(type(model).__module__)
"""


def logits_in_a_fresh_process(folder, ids, tmp_path) -> torch.Tensor:
    """`model(ids).logits` of `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` in a process
    that never imported the package."""
    torch.save(ids, tmp_path / "ids.pt")
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    script = "import sys; assert 'modeling_deepseek_v3' not in sys.modules\n" + FRESH_PROCESS_LOAD
    done = subprocess.run([sys.executable, "-c", script, str(folder), str(tmp_path / "ids.pt")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("modeling_deepseek_v3_remote")  # the thin subclass of the package's class
    return torch.load(tmp_path / "ids.pt.logits")


@pytest.mark.parametrize("route", ["save_pretrained", "cli"])
def test_remote_code_loads_in_a_process_that_never_imported_the_package(tmp_path, route):
    model = random_model(tiny_config(num_nextn_predict_layers=1))
    folder = tmp_path / "model"
    if route == "save_pretrained":
        model.save_pretrained(folder, remote_code=True)
    else:
        model.save_pretrained(folder)
        assert main(["remote-code", str(folder)]) == 0
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_deepseek_v3_remote.DeepseekV3ForCausalLM"
    ids = random_ids(model.config, 2, 7)
    with torch.no_grad():
        torch.testing.assert_close(logits_in_a_fresh_process(folder, ids, tmp_path), model(ids).logits, rtol=0, atol=0)


def test_remote_code_without_the_package_says_to_install_it_from_a_clone(tmp_path):
    """transformers' own hint for a missing import, `pip install modeling_deepseek_v3`, names a project on the package
    index that is not ours: the code file's error says how to install the package instead."""
    random_model(tiny_config()).save_pretrained(tmp_path / "model", remote_code=True)
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    script = ("import sys; sys.modules['modeling_deepseek_v3'] = None  # as if not installed\n"
              "from transformers import AutoModelForCausalLM\n"
              "AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "model")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("ImportError: This checkpoint loads with the modeling_deepseek_v3 package"), error
    assert "install it from a clone of its repository, `pip install -e <path-to-clone>`" in error
    assert "pip install modeling" not in done.stderr


@pytest.mark.parametrize("trust_remote_code", [False, True])
def test_a_remote_code_folder_saved_again_stays_loadable_without_the_package(tmp_path, trust_remote_code):
    """A model loaded from a remote-code folder in a process that imported the package (the package's class, or
    the folder's thin subclass) and saved again, as a Trainer checkpoint does, keeps the code file its auto_map
    names."""
    model = random_model(tiny_config())
    model.save_pretrained(tmp_path / "first", remote_code=True)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "first", trust_remote_code=trust_remote_code)
    loaded.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "modeling_deepseek_v3_remote.py").is_file()
    ids = random_ids(model.config, 2, 7)
    with torch.no_grad():
        torch.testing.assert_close(logits_in_a_fresh_process(tmp_path / "again", ids, tmp_path), model(ids).logits,
                                   rtol=0, atol=0)


def test_remote_code_adds_to_the_users_auto_map(tmp_path):
    random_model(tiny_config()).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    theirs = {"AutoModelForSequenceClassification": "their_code.Classifier", "AutoTokenizer": ["tok.Slow", None]}
    (tmp_path / "config.json").write_text(json.dumps({**config, "auto_map": theirs}))
    write_remote_code(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map == {**theirs, "AutoConfig": "modeling_deepseek_v3_remote.DeepseekV3Config",
                        "AutoModel": "modeling_deepseek_v3_remote.DeepseekV3Model",
                        "AutoModelForCausalLM": "modeling_deepseek_v3_remote.DeepseekV3ForCausalLM"}
    (tmp_path / "config.json").write_text(json.dumps({**config, "auto_map": ["not", "a", "dict"]}))
    with pytest.raises(ValueError, match=r"`auto_map` = \['not', 'a', 'dict'\] is invalid"):
        write_remote_code(tmp_path)


def test_remote_code_refuses_a_folder_of_another_model(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(SystemExit) as exc:
        main(["remote-code", str(tmp_path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "model_type 'gpt2'" in err and err.count("\n") == 1


@pytest.mark.parametrize("entry", ["../elsewhere.safetensors", "../outside.bin", "/etc/passwd"])
def test_an_index_naming_a_file_outside_its_folder_is_refused(saved, tmp_path, entry):
    """The index may name only files of its own folder (transformers >= 5.25 checks the names itself; before, a torch
    pickle outside the folder was loaded). The refusal names the entry."""
    _, state, config = saved
    folder = tmp_path / "model"
    write(folder, state, config, "model-00001-of-00001.safetensors")
    write(tmp_path, {"model.norm.weight": state["model.norm.weight"]}, config, "elsewhere.safetensors")
    torch.save({"model.norm.weight": state["model.norm.weight"]}, tmp_path / "outside.bin")
    weight_map = {**dict.fromkeys(state, "model-00001-of-00001.safetensors"), "model.norm.weight": entry}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(ValueError, match=rf"{entry.split('/')[-1]}.*(not inside the folder)|"
                                         rf"outside the model directory: {entry}"):
        DeepseekV3ForCausalLM.from_pretrained(folder)


def test_symlinked_weight_files_of_the_hub_cache_layout_load(saved, tmp_path):
    """In the hub cache a snapshot folder holds links to blobs stored elsewhere; they load, single file and shards."""
    folder, state, config = saved
    ids = random_ids(tiny_config(), 1, 5)
    expected = DeepseekV3ForCausalLM.from_pretrained(folder).eval()(ids).logits
    blobs = tmp_path / "blobs"
    write(blobs, state, config, "0123abcd")
    single = tmp_path / "snapshots" / "single"
    single.mkdir(parents=True)
    (single / "config.json").write_text(json.dumps(config))
    (single / "model.safetensors").symlink_to(blobs / "0123abcd")
    torch.testing.assert_close(DeepseekV3ForCausalLM.from_pretrained(single).eval()(ids).logits, expected)
    sharded = tmp_path / "snapshots" / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text(json.dumps(config))
    (sharded / "model-00001-of-00001.safetensors").symlink_to(os.path.relpath(blobs / "0123abcd", sharded))
    index = {"metadata": {}, "weight_map": dict.fromkeys(state, "model-00001-of-00001.safetensors")}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    torch.testing.assert_close(DeepseekV3ForCausalLM.from_pretrained(sharded).eval()(ids).logits, expected)


KILLED_SAVE = """
import os, signal, sys, threading, time
import torch
from modeling_deepseek_v3 import DeepseekV3ForCausalLM, load_preset

folder = sys.argv[1]
torch.manual_seed(2)
model = DeepseekV3ForCausalLM(load_preset("tiny"))
start = time.time()
sys.setswitchinterval(1e-5)

def kill_after_two_new_shards():
    while True:
        shards = [f for f in os.listdir(folder) if f.startswith("model-")]
        if sum(os.path.getmtime(os.path.join(folder, f)) > start for f in shards) >= 2:
            os.kill(os.getpid(), signal.SIGKILL)

threading.Thread(target=kill_after_two_new_shards, daemon=True).start()
model.save_pretrained(folder, max_shard_size="20KB")
print("finished")
"""


def test_an_interrupted_save_over_an_older_checkpoint_is_refused(tmp_path):
    """A save killed after a few of its shards leaves new shards beside old ones, which loaded without error as a
    mix of the two models; the folder is now refused, saying the save did not finish. A save that finishes loads."""
    old = random_model()
    old.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 10
    killed = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(tmp_path)], capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -9 and "finished" not in killed.stdout, killed.stderr[-2000:]
    with pytest.raises(ValueError, match=r"holds an unfinished save \(.unfinished-save is there\): save_pretrained "
                                         r"was interrupted"):
        DeepseekV3ForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds an unfinished save"):
        convert_checkpoint(tmp_path, tmp_path.parent / "converted", "bf16-to-fp8")
    old.save_pretrained(tmp_path, max_shard_size="20KB")  # saving again makes the folder whole
    ids = random_ids(tiny_config(), 1, 5)
    torch.testing.assert_close(DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()(ids).logits,
                               old(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("index_text", ["{not json", '{"weight_map": ["a", "b"]}'], ids=["not-json", "no-weight-map"])
def test_a_malformed_index_is_named(saved, tmp_path, index_text):
    """transformers failed on it with a bare JSON error naming no file."""
    _, state, config = saved
    write(tmp_path, state, config, "model-00001-of-00001.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(index_text)
    with pytest.raises(ValueError, match=r"model.safetensors.index.json (is not valid JSON|has no weight_map)"):
        DeepseekV3ForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model.safetensors.index.json (is not valid JSON|has no weight_map)"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
