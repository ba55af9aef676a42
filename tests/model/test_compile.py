"""torch.compile of decoding over the static latent cache: one graph per decode step (no graph break), no recompile
as the position advances, the same greedy tokens as eager decoding; in fp32 and bf16, by hand and through
`generate()`'s own compilation of static-cache decoding."""

from collections.abc import Callable

import pytest
import torch
from transformers import CompileConfig

from modeling_deepseek_v3 import DeepseekV3ForCausalLM, MLACache, MLAStaticCache, private_api

from ..utils import random_ids, random_model

STEPS = 16


def cpu_compile_config(**kwargs) -> CompileConfig:
    """A `CompileConfig` that `generate()` also honours on the CPU (transformers compiles static-cache decoding by
    itself on accelerators only)."""
    return private_api.compile_on_all_devices(CompileConfig(**kwargs))


@torch.no_grad()
def greedy_steps(model, step, prompt: torch.Tensor, cache, steps: int) -> torch.Tensor:
    """Prefill `prompt` eagerly into `cache`, then `steps` one-token greedy decode steps through `step`."""
    token = model(prompt, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    tokens = [token]
    for _ in range(steps):
        token = step(token, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
        tokens.append(token)
    return torch.cat(tokens, dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_decode_step_is_one_graph_without_recompiles(dtype):
    torch.compiler.reset()
    model = random_model().to(dtype)
    prompt = random_ids(model.config, 2, 6)
    eager = greedy_steps(model, model.forward, prompt, MLAStaticCache(config=model.config, max_cache_len=32), STEPS)

    step = torch.compile(model.forward, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break is an error
    cache = MLAStaticCache(config=model.config, max_cache_len=32)
    greedy_steps(model, step, prompt, cache, 1)  # compiles the step
    cache.reset()
    with torch.compiler.set_stance("fail_on_recompile"):  # 16 more positions, each a new value of the cache length
        compiled = greedy_steps(model, step, prompt, cache, STEPS)
    assert torch.equal(compiled, eager)


def test_generate_compiles_static_cache_decoding_once():
    torch.compiler.reset()
    assert DeepseekV3ForCausalLM._can_compile_fullgraph
    model = random_model()
    ids = random_ids(model.config, 2, 6)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding: generate passes a 4-D mask to the compiled step
    kwargs = dict(attention_mask=mask, do_sample=False, cache_implementation="static")
    eager = model.generate(ids, max_new_tokens=STEPS + 1, **kwargs)
    graphs = []

    def counting_backend(graph: torch.fx.GraphModule, example_inputs) -> Callable:  # records what generate compiled
        graphs.append(graph)
        return graph.forward

    compile_config = cpu_compile_config(fullgraph=True, backend=counting_backend, mode=None)
    model.generate(ids, max_new_tokens=2, compile_config=compile_config, **kwargs)  # compiles the decode step
    assert len(graphs) == 1
    with torch.compiler.set_stance("fail_on_recompile"):
        compiled = model.generate(ids, max_new_tokens=STEPS + 1, compile_config=compile_config, **kwargs)
    assert len(graphs) == 1 and torch.equal(compiled, eager)


@pytest.mark.slow  # two compilations: ~40 s on 2 CPU cores
def test_generate_compiles_a_fullgraph_forward_for_every_input_set():
    """transformers' `test_generate_compile_model_forward_fullgraph`: two input sets of one shape (the second with
    the test's lower-triangular masks), compiled with `fullgraph=True, dynamic=False`, the second set compiled by the
    first's graph, with the eager outputs' tokens and scores. The default cache (the latent `MLACache`, not
    transformers' `DynamicCache`) is not compiled; `cache_implementation="static"` is."""
    torch.compiler.reset()
    model = random_model()
    ids = random_ids(model.config, 4, 7)
    input_sets = [dict(input_ids=ids[:2], attention_mask=torch.ones_like(ids[:2])),
                  dict(input_ids=ids[2:], attention_mask=torch.tril(torch.ones_like(ids[2:])))]
    kwargs = dict(do_sample=False, max_new_tokens=5, return_dict_in_generate=True, output_scores=True,
                  compile_config=cpu_compile_config(fullgraph=True, dynamic=False, backend="aot_eager"))
    with torch.compiler.set_stance("force_eager"):
        eager = [model.generate(**inputs, **kwargs) for inputs in input_sets]
    assert all(isinstance(out.cache, MLACache) and not out.cache.is_compileable for out in eager)
    assert not hasattr(model, "_compiled_call")
    compiled = [model.generate(**input_sets[0], cache_implementation="static", **kwargs)]
    with torch.compiler.set_stance("fail_on_recompile"):
        compiled.append(model.generate(**input_sets[1], cache_implementation="static", **kwargs))
    assert hasattr(model, "_compiled_call") and all(out.cache.is_compileable for out in compiled)
    for expected, got in zip(eager, compiled):
        assert torch.equal(got.sequences, expected.sequences)
        for a, b in zip(got.scores, expected.scores):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_inductor_decoding_gives_the_eager_greedy_tokens():
    """The real compiler (inductor's generated CPU code) in fp32: the same tokens as eager decoding."""
    torch.compiler.reset()
    model = random_model()
    prompt = random_ids(model.config, 2, 6)
    eager = greedy_steps(model, model.forward, prompt, MLAStaticCache(config=model.config, max_cache_len=32), STEPS)
    step = torch.compile(model.forward, fullgraph=True)
    compiled = greedy_steps(model, step, prompt, MLAStaticCache(config=model.config, max_cache_len=32), STEPS)
    assert torch.equal(compiled, eager)
