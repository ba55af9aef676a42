"""DeepSeek-V3 on transformers' distributed engine, two CPU processes (gloo) against one process on the same weights.

For every layout: logits, greedy and self-speculative decoding of a left-padded batch, a sharded `save_pretrained`
that writes the single-process files (one process and transformers' built-in class reload them); for every layout
but pipeline (inference only in transformers) one training step: loss, gradients, routing-bias update; FP8
checkpoints under tensor and expert parallelism, and the error for an FP8 layout that would split scale blocks;
`DeepseekV3Trainer` with an FSDP-loaded model. One spawn per layout. Without spawning: the declared plans name only
what the model builds, and the dispatch traffic of node-limited routing.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from transformers import DeepseekV3ForCausalLM as BuiltinDeepseekV3ForCausalLM
from transformers import TrainingArguments
from transformers.distributed import DistributedConfig

from modeling_deepseek_v3 import DeepseekV3ForCausalLM, DeepseekV3Trainer
from modeling_deepseek_v3.convert import OFFICIAL_QUANTIZATION, convert_checkpoint
from modeling_deepseek_v3.dispatch_traffic import dispatch_traffic
from modeling_deepseek_v3.moe import TopkRouter
from modeling_deepseek_v3.parallel import (
    check_expert_parallel_layout,
    check_pipeline_layout,
    check_tensor_parallel_layout,
    data_parallel_group,
)
from modeling_deepseek_v3.shards import owned_rows
from modeling_deepseek_v3.training import enable_fp8_training

from ..multiprocess import run_ranks
from ..utils import agreeing_mtp_model, random_ids, random_model, spread_routing, tiny_config

LAYOUTS = {
    "tp": dict(tp_size=2),
    "tp_ep_all_reduce": dict(tp_size=2, ep_size=2, ep_implementation="all_reduce"),
    "tp_ep_all_to_all": dict(tp_size=2, ep_size=2, ep_implementation="all_to_all"),
    "pp": dict(pp_size=2),
    "fsdp": dict(fsdp_size=2),
    "fsdp_ep": dict(fsdp_size=2, ep_size=2),
}
# the FP8 checkpoint under expert and tensor parallelism (`tp_plan="auto"`: tp_size = world size)
FP8_LAYOUTS = {"tp": dict(tp_plan="auto"), "tp_ep_all_reduce": LAYOUTS["tp_ep_all_reduce"],
               "fsdp_ep": LAYOUTS["fsdp_ep"]}
# FP8 dims that split into whole 128-blocks over 2 ranks: 8 heads of 32 + 32 (q_b 512 rows, kv_b 512, o_proj 256
# columns), MLP and expert widths 256
FP8_SHAPE = dict(hidden_size=128, q_lora_rank=64, kv_lora_rank=64, qk_rope_head_dim=32, qk_nope_head_dim=32,
                 v_head_dim=32, num_attention_heads=8, intermediate_size=256, moe_intermediate_size=256,
                 n_routed_experts=4, n_group=2, topk_group=1, num_experts_per_tok=2, num_hidden_layers=2,
                 first_k_dense_replace=1, num_nextn_predict_layers=1)
NEW_TOKENS = 6
UNEVEN_NEW_TOKENS = (2, 7)  # per rank, one prompt each: rank 0 is done first and must keep stepping under FSDP
TRAINER_STEPS = 2


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Checkpoints, inputs, and what one process computes from them."""
    root = tmp_path_factory.mktemp("parallel")
    torch.manual_seed(0)
    model = spread_routing(agreeing_mtp_model(1, context_weight=0.3))  # drafts accepted, and some rejected
    model.save_pretrained(root / "mtp")
    spread_routing(random_model(tiny_config(**FP8_SHAPE))).save_pretrained(root / "fp8_source")
    convert_checkpoint(root / "fp8_source", root / "fp8", "bf16-to-fp8")
    # a dense MLP 128 wide: 64 rows per rank would split its 128-row scale blocks
    random_model(tiny_config(**FP8_SHAPE | dict(intermediate_size=128))).save_pretrained(root / "fp8_split_source")
    convert_checkpoint(root / "fp8_split_source", root / "fp8_split", "bf16-to-fp8")

    ids = random_ids(model.config, 2, 7)
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = model.config.pad_token_id, 0  # left padding
    inputs = dict(ids=ids, mask=mask, train_ids=random_ids(model.config, 4, 12))
    torch.save(inputs, root / "inputs.pt")
    folders = {name: str(root / name) for name in ("mtp", "fp8", "fp8_split")} | {"inputs": str(root / "inputs.pt")}

    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    generation = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    greedy = model.generate(ids, **generation)
    speculative = model.generate(ids, use_mtp=True, return_dict_in_generate=True, **generation)
    assert torch.equal(speculative.sequences, greedy)
    acceptance = speculative.speculative_stats.acceptance_rate
    assert 0 < acceptance < 1
    uneven = [model.generate(ids[r : r + 1], attention_mask=mask[r : r + 1], max_new_tokens=n, do_sample=False)
              for r, n in enumerate(UNEVEN_NEW_TOKENS)]
    fp8 = DeepseekV3ForCausalLM.from_pretrained(root / "fp8", dtype=torch.float32)
    with torch.no_grad():
        fp8_logits = fp8(ids, attention_mask=mask).logits
    training = {path: training_step(load(folders["mtp"], mla_attention_path=path), inputs["train_ids"])
                for path in ("expanded", "absorbed")}
    loaded = routing_biases(model)
    assert any(not torch.equal(bias, loaded[name]) for name, bias in training["expanded"]["biases"].items())
    trainer = run_trainer(load(folders["mtp"]), inputs["train_ids"], root / "trainer")
    return dict(folders=folders, inputs=inputs, logits=logits, greedy=greedy, acceptance=acceptance, uneven=uneven,
                fp8_logits=fp8_logits, training=training, trainer=trainer)


def load(folder: str, layout: dict | None = None, **config) -> DeepseekV3ForCausalLM:
    distributed = None if layout is None else DistributedConfig(**layout)
    return DeepseekV3ForCausalLM.from_pretrained(folder, distributed_config=distributed, dtype=torch.float32, **config)


def training_step(model: DeepseekV3ForCausalLM, ids: torch.Tensor) -> dict:
    """A forward and backward of this rank's share of the global batch `ids`, scaled so that the gradients are the
    global batch's (the loss is a sum over tokens divided by the global count, as under Trainer, and FSDP averages
    gradients over the data-parallel ranks); then the routing-bias update."""
    model.train()
    group = data_parallel_group(getattr(model.config, "distributed_config", None))
    ranks = dist.get_world_size(group) if group is not None else 1
    local = ids.chunk(ranks)[dist.get_rank(group) if group is not None else 0]
    output = model(local, labels=local, num_items_in_batch=(ids[:, 1:] != -100).sum())
    (output.loss * ranks).backward()
    loss = output.loss.detach()
    if ranks > 1:
        dist.all_reduce(loss, group=group)
    grads = {name: full(p.grad) for name, p in model.named_parameters() if p.grad is not None}
    loads = model.update_routing_bias()
    return dict(loss=loss, grads=grads, loads=loads, biases=routing_biases(model))


@contextlib.contextmanager
def recorded_warnings():
    """The messages of the warnings issued inside the block, through Python's `warnings` or transformers' logging."""
    messages = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    library = logging.getLogger("transformers")
    library.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
    finally:
        library.removeHandler(handler)
    messages += [str(w.message) for w in caught]


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def routing_biases(model) -> dict[str, torch.Tensor]:
    return {name: b.clone() for name, b in model.named_buffers() if name.endswith("e_score_correction_bias")}


def run_trainer(model: DeepseekV3ForCausalLM, ids: torch.Tensor, out) -> dict:
    """`DeepseekV3Trainer` with SGD over the rows of `ids`, a global batch of 4 split over the data-parallel ranks."""
    distributed = getattr(model.config, "distributed_config", None)
    ranks = 1 if distributed is None else distributed.dp_size
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4 // ranks, max_steps=TRAINER_STEPS,
                             logging_steps=1, learning_rate=0.1, optim="sgd", report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True, seed=0)
    trainer = DeepseekV3Trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in ids])
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return dict(logs=logs, biases=routing_biases(model))


def layout_worker(rank: int, name: str, folders: dict[str, str], out: str) -> None:
    inputs = torch.load(folders["inputs"])
    ids, mask = inputs["ids"], inputs["mask"]
    with recorded_warnings() as load_warnings:
        model = load(folders["mtp"], LAYOUTS[name])
    results = {"load_warnings": load_warnings}
    with torch.no_grad():
        results["logits"] = model(ids, attention_mask=mask).logits
    generation = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    results["greedy"] = model.generate(ids, **generation)
    speculative = model.generate(ids, use_mtp=True, return_dict_in_generate=True, **generation)
    results["speculative"] = speculative.sequences
    results["acceptance"] = speculative.speculative_stats.acceptance_rate
    if name.startswith("fsdp"):  # each rank its own prompt and length: the ranks step in sync until all are done
        results["speculative_uneven"] = model.generate(
            ids[rank : rank + 1], attention_mask=mask[rank : rank + 1], max_new_tokens=UNEVEN_NEW_TOKENS[rank],
            do_sample=False, use_mtp=True,
        )
    model.save_pretrained(f"{out}/saved")
    if name != "pp":  # transformers' pipeline parallelism is for inference
        results["training"] = training_step(model, inputs["train_ids"])
    else:
        try:  # a stage runs only its own layers: per-layer outputs are refused
            model(ids, attention_mask=mask, output_hidden_states=True)
        except ValueError as error:
            results["per_layer_output_error"] = str(error)
    if name == "tp":  # which rows of a full tensor a shard holds, for uneven shards too (5 rows: 3 and 2)
        rows = distribute_tensor(torch.arange(10.0).view(5, 2), init_device_mesh("cpu", (2,)), [Shard(0)])
        results["owned_rows"] = owned_rows(rows)
        results["owned_columns"] = owned_rows(distribute_tensor(torch.zeros(2, 5), rows.device_mesh, [Shard(1)]))
    if name == "tp":  # the absorbed path's latent gradient, summed over the head shards
        absorbed = load(folders["mtp"], LAYOUTS[name], mla_attention_path="absorbed")
        results["training_absorbed"] = training_step(absorbed, inputs["train_ids"])
        try:
            load(folders["fp8_split"], LAYOUTS[name])
        except ValueError as error:
            results["fp8_split_error"] = str(error)
        try:
            enable_fp8_training(model)
        except ValueError as error:
            results["fp8_training_error"] = str(error)
    if name == "fsdp":
        results["trainer"] = run_trainer(load(folders["mtp"], LAYOUTS[name]), inputs["train_ids"], f"{out}/trainer")
    if name in FP8_LAYOUTS:
        fp8 = load(folders["fp8"], FP8_LAYOUTS[name])
        with torch.no_grad():
            results["fp8_logits"] = fp8(ids, attention_mask=mask).logits
        fp8.save_pretrained(f"{out}/saved_fp8")  # float8 shards gathered as bytes (gloo has no float8)
    torch.save(results, f"{out}/rank{rank}.pt")


@pytest.mark.slow
@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_equals_one_process(reference, tmp_path, name):
    run_ranks(layout_worker, name, reference["folders"], str(tmp_path))
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(results["logits"], reference["logits"], rtol=0, atol=1e-5)
        assert torch.equal(results["greedy"], reference["greedy"])
        assert torch.equal(results["speculative"], reference["greedy"])
        assert results["acceptance"] == reference["acceptance"]  # the same drafts accepted as in one process
        if name.startswith("fsdp"):
            assert torch.equal(results["speculative_uneven"], reference["uneven"][rank])
        # no deprecated style in the plans (transformers 5.25 warns, on rank 0, of `moe_tp_experts`)
        assert not [m for m in results["load_warnings"] if "deprecated" in m.lower()], results["load_warnings"]
        if name != "pp":
            check_training(results["training"], reference["training"]["expanded"])
        else:
            assert "output_hidden_states=True: not available under pipeline" in results["per_layer_output_error"]
        if name == "tp":
            local, start = results["owned_rows"]
            assert torch.equal(local, torch.arange(10.0).view(5, 2)[(0, 3)[rank] :][: (3, 2)[rank]])
            assert start == (0, 3)[rank] and results["owned_columns"] is None  # split along another dim
            check_training(results["training_absorbed"], reference["training"]["absorbed"])
            assert "shards FP8 weights in whole 128-wide scale blocks" in results["fp8_split_error"]
            assert "mlp.gate_proj.weight has 128 rows" in results["fp8_split_error"]
            assert "does not support a model sharded by" in results["fp8_training_error"]
        if name == "fsdp":
            check_trainer(results["trainer"], reference["trainer"])
        if name in FP8_LAYOUTS:  # FP8 weights are dequantised exactly on CPU: as close as fp32 logits
            torch.testing.assert_close(results["fp8_logits"], reference["fp8_logits"], rtol=0, atol=1e-5)
    if name in FP8_LAYOUTS:  # the sharded FP8 model saves the checkpoint it loaded, byte for byte
        saved, source = (load_file(f"{folder}/model.safetensors") for folder in (tmp_path / "saved_fp8",
                                                                                reference["folders"]["fp8"]))
        assert saved.keys() == source.keys()
        assert all(saved[key].dtype == source[key].dtype and torch.equal(saved[key].view(torch.uint8),
                                                                         source[key].view(torch.uint8))
                   for key in source)

    # the sharded save wrote exactly the single-process checkpoint: official keys, MTP copies, the same tensors
    saved, source = load_file(tmp_path / "saved" / "model.safetensors"), load_file(f"{reference['folders']['mtp']}"
                                                                                 "/model.safetensors")
    assert saved.keys() == source.keys()
    assert all(torch.equal(saved[key], source[key]) for key in source)
    ids, mask = reference["inputs"]["ids"], reference["inputs"]["mask"]
    for cls in (DeepseekV3ForCausalLM, BuiltinDeepseekV3ForCausalLM):
        with torch.no_grad():
            logits = cls.from_pretrained(tmp_path / "saved", dtype=torch.float32)(ids, attention_mask=mask).logits
        torch.testing.assert_close(logits, reference["logits"], rtol=0, atol=1e-5)


def check_training(results: dict, expected: dict) -> None:
    torch.testing.assert_close(results["loss"], expected["loss"], rtol=1e-6, atol=0)
    assert results["grads"].keys() == expected["grads"].keys()
    for name, grad in expected["grads"].items():
        torch.testing.assert_close(results["grads"][name], grad, rtol=0, atol=1e-6, msg=name)
    # the token counts are the global batch's (a rank sharing its batch does not count it twice), so the biases
    # take the same steps
    assert all(torch.equal(results["loads"][name], load) for name, load in expected["loads"].items())
    assert all(torch.equal(results["biases"][name], bias) for name, bias in expected["biases"].items())


def check_trainer(results: dict, expected: dict) -> None:
    assert len(results["logs"]) == len(expected["logs"]) == TRAINER_STEPS
    for log, single in zip(results["logs"], expected["logs"]):
        # the loss and the balance metrics are averaged over the data-parallel ranks
        for key in ("loss", "balance_loss", "mtp_1_loss"):
            assert log[key] == pytest.approx(single[key], rel=1e-5), key
        assert log["expert_load_max_over_mean"] == single["expert_load_max_over_mean"]
    assert all(torch.equal(results["biases"][name], bias) for name, bias in expected["biases"].items())


@pytest.mark.parametrize("overrides", [dict(num_nextn_predict_layers=1), dict(q_lora_rank=None, n_shared_experts=0),
                                       dict(quantization_config=OFFICIAL_QUANTIZATION, num_nextn_predict_layers=2)],
                         ids=["mtp", "no-q-lora-no-shared", "fp8-mtp"])
def test_every_plan_rule_names_a_module_or_parameter(overrides):
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(tiny_config(**overrides))
    names = {re.sub(r"\.\d+(?=\.|$)", ".*", name) for name, _ in (*model.named_modules(), *model.named_parameters())}
    for plan in (model.tp_plan, model.ep_plan, model.fsdp_plan):
        assert plan.keys() <= names, sorted(plan.keys() - names)
    # every routed-expert tensor, FP8 scales included, is sharded by the expert-parallel plan
    experts = {name for name in names if ".mlp.experts." in name}
    assert experts and experts <= model.ep_plan.keys()
    mtp_rules = [name for name in model.tp_plan if name.startswith("mtp.*.block.self_attn")]
    assert len(mtp_rules) == (4 if model.config.num_nextn_predict_layers else 0)  # the blocks' attention by heads
    # the routed experts have no tensor-parallel rule: transformers 5.25 deprecates `moe_tp_experts` for them
    assert not any(".mlp.experts" in name for name in model.tp_plan), sorted(model.tp_plan)


def test_layout_checks_refuse_what_cannot_be_split(caplog):
    """Checked before anything is sharded: whole heads and whole FP8 blocks per tensor-parallel rank (the routed
    experts are never split by tensor parallelism), whole experts per expert-parallel rank, pipelines that can
    run."""
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(tiny_config(**FP8_SHAPE | dict(moe_intermediate_size=128, n_shared_experts=2),
                                                  quantization_config=OFFICIAL_QUANTIZATION))
        narrow_shared = DeepseekV3ForCausalLM(tiny_config(**FP8_SHAPE | dict(moe_intermediate_size=128),
                                                          quantization_config=OFFICIAL_QUANTIZATION))
    with pytest.raises(ValueError, match="num_attention_heads = 8 does not divide into tp_size = 3"):
        check_tensor_parallel_layout(model, model.tp_plan, 3)
    # routed experts 128 wide and shared experts 2 x 128: only the shared ones are split, in whole blocks
    check_tensor_parallel_layout(model, model.tp_plan, 2)
    with pytest.raises(ValueError, match=r"shared_experts\.gate_proj\.weight has 128 rows"):
        check_tensor_parallel_layout(narrow_shared, narrow_shared.tp_plan, 2)
    with pytest.raises(ValueError, match="n_routed_experts = 4 does not divide into ep_size = 3"):
        check_expert_parallel_layout(model.config, 3)
    with caplog.at_level("WARNING"):
        check_expert_parallel_layout(tiny_config(n_routed_experts=12, n_group=3, topk_group=1), 4)
    assert "do not line up with ep_size = 4" in caplog.text
    for layout, message in [(dict(pp_size=2, tp_size=2), "pipeline and tensor parallelism cannot be combined"),
                            (dict(pp_size=3), "more than num_hidden_layers=2")]:
        with pytest.raises(ValueError, match=message):
            check_pipeline_layout(model, DistributedConfig(**layout))
    with pytest.raises(ValueError, match="DeepseekV3ForCausalLM only, not DeepseekV3Model"):
        check_pipeline_layout(model.model, DistributedConfig(pp_size=2))


def test_plans_follow_the_layer_kinds():
    """Dense-MLP rules only where a layer is dense, expert rules only where one is MoE."""
    dense = tiny_config(num_hidden_layers=2, first_k_dense_replace=2)
    assert not any(".experts." in name for name in (*dense.base_model_tp_plan, *dense.base_model_ep_plan))
    moe = tiny_config(num_hidden_layers=1, first_k_dense_replace=0, moe_layer_freq=1)
    assert "layers.*.mlp.gate_proj" not in moe.base_model_tp_plan and "layers.*.mlp.experts" in moe.base_model_ep_plan
    assert "layers.*.mlp.shared_experts.gate_proj" in moe.base_model_tp_plan


def test_dispatch_traffic_counts_copies_per_expert_and_per_destination():
    indices = torch.tensor([[0, 1, 4, 5], [0, 2, 3, 1]])  # destinations of 2 experts: [0, 0, 2, 2], [0, 1, 1, 0]
    traffic = dispatch_traffic(indices, experts_per_destination=2, source=torch.tensor([0, 1]), token_bytes=10)
    # token 0 from destination 0 sends 2 copies to destination 2; token 1 from 1 sends 2 copies to destination 0
    assert (traffic.per_expert, traffic.per_destination, traffic.max_destinations) == (20.0, 10.0, 1)
    with pytest.raises(ValueError, match="expected indices"):
        dispatch_traffic(indices, 2, torch.tensor([0]), 10)


def test_node_limited_routing_bounds_the_destinations_a_token_reaches():
    """With a routing group per destination, a token reaches at most topk_group destinations other than its own,
    and (with a dispatch once per destination) moves fewer bytes than without the group limit."""
    torch.manual_seed(0)
    hidden = torch.randn(512, 64)
    reached = {}
    for topk_group in (2, 4):
        router = TopkRouter(tiny_config(n_routed_experts=16, n_group=4, topk_group=topk_group, num_experts_per_tok=4))
        with torch.no_grad():
            router.weight.normal_(0, 0.5)
            router.e_score_correction_bias.zero_()
            indices = router(hidden).indices
        reached[topk_group] = dispatch_traffic(indices, 4, torch.arange(512) % 4, 1.0)
    assert reached[2].max_destinations <= 2 < reached[4].max_destinations
    assert reached[2].per_destination < reached[4].per_destination
