"""Where a decode step's time goes: `generate()` traced by torch.profiler's Python tracer, each Python call and op
charged to a component of the step (mask construction, rotary, attention projections, router, ...).

Every traced event belongs to the component of its own name (a module class or a function, see `COMPONENTS`), or
else to its caller's; its exclusive time (its duration minus its children's) is added to that component. Time in
nothing named (module `__call__`, layer and model `forward` bodies, output classes) is the Python/dispatch
overhead. Only the decoding loop of `generate` is counted (not its setup nor the prefill), per decode step.

The tracer slows Python calls down (each call and return is recorded), so the components add up to more than an
untraced step; `profile_decode` measures both and prints the ratio.
"""

from __future__ import annotations

import re
import statistics
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LogitsProcessor, LogitsProcessorList

GLUE = "Python/dispatch (module calls, forward bodies)"
GENERATE = "generate: loop (token choice, ids, stop check)"

# (pattern on the event name, component); the first match wins. Module events are named "nn.Module: Class_N",
# Python functions "path/file.py(line): name", ops "aten::name".
COMPONENTS = [
    (r"^nn\.Module: DeepseekV3", GLUE),  # the causal LM, base model and decoder layers themselves
    (r"masking_utils\.py\(\d+\): create_causal_mask$", "mask construction"),
    (r"^nn\.Module: RotaryEmbedding_", "rotary (cos/sin, apply)"),
    (r"rope\.py\(\d+\): apply_rope$", "rotary (cos/sin, apply)"),
    (r"^nn\.Module: RMSNorm_", "norms"),
    (r"^nn\.Module: Embedding_", "embedding"),
    (r"^nn\.Module: TopkRouter_", "router"),
    (r"grouped_gemm\.py\(\d+\): grouped_(mm|swiglu)$", "experts: grouped GEMM"),
    (r"^nn\.Module: RoutedExperts_", "experts: sort, gather, scatter"),
    (r"^nn\.Module: MLP_", "dense FFN, shared experts"),
    (r"cache(_utils)?\.py\(\d+\): (update|get_seq_length|get_mask_sizes|_publish)$", "cache update, length"),
    (r"attention\.py\(\d+\): (_absorbed|absorbed)$", "absorbed attention"),
    (r"kernels/__init__\.py\(\d+\): mla_decode$", "absorbed attention"),
    (r"^nn\.Module: MultiHeadLatentAttention_", "attention: views, path choice"),
    (r"inputs\.py\(\d+\): check_(model|causal_lm)_inputs$", "input checks"),
    (r"balancing\.py\(\d+\): ", "routing log"),
    (r"utils\.py\(\d+\): prepare_inputs_for_generation$", "generate: prepare inputs"),
    (r"utils\.py\(\d+\): _update_model_kwargs_for_generation$", "generate: update kwargs"),
    (r"logits_process\.py\(\d+\): __call__$", "generate: logits processors"),
    (r"stopping_criteria\.py\(\d+\): __call__$", "generate: stopping criteria"),
]
_PATTERNS = [(re.compile(pattern), component) for pattern, component in COMPONENTS]


def _component(name: str, inherited: str) -> str:
    if name.startswith("nn.Module: Linear_"):
        # a linear layer is charged by where it is called: attention, an FFN, or the output head
        if inherited.startswith("attention"):
            return "attention projections"
        return "output head" if inherited == GLUE else inherited
    for pattern, component in _PATTERNS:
        if pattern.search(name):
            return component
    return inherited


def _charge(event, inherited: str, totals: dict[str, float]) -> None:
    component = _component(event.name, inherited)
    children = event.cpu_children
    totals[component] += event.time_range.elapsed_us() - sum(c.time_range.elapsed_us() for c in children)
    for child in children:
        _charge(child, component, totals)


def _is_model_call(event, model) -> bool:
    return event.name.startswith(f"nn.Module: {type(model).__name__}_")


def decode_loop_breakdown(events, model) -> tuple[dict[str, float], int]:
    """Exclusive µs per component over the decoding loop of one traced `generate` call (the prefill, inside
    `_prefill`, left out), and the number of decode steps (forwards of `model` in the loop)."""
    loop = next(e for e in events if re.search(r"generation/utils\.py\(\d+\): _sample$", e.name))
    totals: dict[str, float] = defaultdict(float)
    steps = 0
    for child in loop.cpu_children:
        if child.name.endswith(": _prefill"):
            continue
        steps += _count_model_calls(child, model)
        _charge(child, GENERATE, totals)
    return totals, steps


def _count_model_calls(event, model) -> int:
    if _is_model_call(event, model):
        return 1
    return sum(_count_model_calls(c, model) for c in event.cpu_children)


def _generate(model, context: torch.Tensor, new_tokens: int, **kwargs) -> None:
    model.generate(context, attention_mask=torch.ones_like(context), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, **kwargs)


def sync(tensor: torch.Tensor) -> None:
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)


class StepClock(LogitsProcessor):
    """Notes `clock()` each time `generate` has the logits of a new token (after each forward); leaves them as they
    are. The first note ends the prefill; the span from it to the last is that many whole decode steps."""

    def __init__(self, clock, device: torch.device) -> None:
        self.clock, self.device, self.times = clock, device, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        sync(scores)
        self.times.append(self.clock())
        return scores


@torch.inference_mode()
def untraced_step_ms(model, context: torch.Tensor, steps: int, repeats: int, **kwargs) -> list[float]:
    """ms per decode step of `generate` without the tracer, by the wall clock from the first new token to the last
    (`StepClock`: the prefill is left out, whose time at long contexts varies by more than the steps take), one sample
    per repeat."""
    per_step = []
    for _ in range(repeats):
        clock = StepClock(time.perf_counter, context.device)
        _generate(model, context, steps + 1, logits_processor=LogitsProcessorList([clock]), **kwargs)
        per_step.append((clock.times[-1] - clock.times[0]) / steps * 1e3)
    return per_step


@torch.inference_mode()
def profile_decode(model, context: torch.Tensor, steps: int, repeats: int, **kwargs) -> dict:
    """Breakdown (ms per decode step) of `generate(context, max_new_tokens=steps + 1)`, greedy, plus the traced and
    untraced step times (the median, and every sample). `kwargs` go to `generate` (e.g.
    `cache_implementation="static"`)."""
    _generate(model, context, 4, **kwargs)  # warm-up
    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        _generate(model, context, steps + 1, **kwargs)
    totals, counted = decode_loop_breakdown(prof.events(), model)
    components = {name: us / counted / 1e3 for name, us in sorted(totals.items(), key=lambda kv: -kv[1])}
    untraced = untraced_step_ms(model, context, steps, repeats, **kwargs)
    return {
        "components_ms": components,
        "traced_step_ms": sum(components.values()),
        "untraced_step_ms": statistics.median(untraced),
        "untraced_step_ms_samples": untraced,
        "steps": counted,
    }


def print_breakdown(title: str, result: dict) -> None:
    traced, untraced = result["traced_step_ms"], result["untraced_step_ms"]
    print(f"\n{title}: {result['steps']} decode steps traced; ms per step")
    for name, ms in result["components_ms"].items():
        print(f"  {name:<52}{ms:>8.3f}{ms / traced:>8.1%}")
    print(f"  {'total under the tracer':<52}{traced:>8.3f}")
    print(f"  {'untraced generate step (median)':<52}{untraced:>8.3f}   tracer inflation {traced / untraced:.2f}x")
