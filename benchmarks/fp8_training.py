"""FP8 training's effect on the loss, measured against the seed-to-seed noise of the same training run.

A tiny model trains on the packaged Shakespeare bytes, every decoder GEMM in FP8 (`enable_fp8_training`, the routed
experts included) and, from the same init seed and data order, in full precision (fp32); the loss on 64 held-out
sequences at the end is compared. Repeated for a few init seeds, it gives the FP8 effect, `(fp8 - full) / full` per
seed, and the noise, `|full_i - full_j| / full_j` over pairs of seeds: how far the end point moves when only the init
changes. `tests/model/test_training.py` takes its tolerance from this file.

    python benchmarks/fp8_training.py                         # seeds 0 1 2, 200 steps: ~3 min per seed on a CPU
    python benchmarks/fp8_training.py --seeds 0 1 2 3 --steps 300 --result-file /tmp/fp8_training.json
"""

from __future__ import annotations

import argparse
import itertools
from importlib import resources

import torch
from result_file import ResultFile

from modeling_deepseek_v3 import DeepseekV3ForCausalLM, load_preset
from modeling_deepseek_v3.training import enable_fp8_training

SEQ, BATCH, HELD_OUT = 64, 8, 64


def shakespeare() -> tuple[torch.Tensor, torch.Tensor]:
    """(training bytes, held-out `[64, 64]` batch) of the packaged text, bytes as token ids (vocab 512 > 256)."""
    text = resources.files("modeling_deepseek_v3.data").joinpath("shakespeare.txt").read_bytes()[:400_000]
    data = torch.tensor(list(text), dtype=torch.long)
    return data[:350_000], data[350_000 : 350_000 + HELD_OUT * SEQ].view(HELD_OUT, SEQ)


def train(fp8: bool, steps: int, data: torch.Tensor, held_out: torch.Tensor, seed: int = 0) -> tuple[float, float]:
    """Trains the tiny model `steps` steps from init seed `seed` (the data order is fixed); returns (first training
    loss, loss on `held_out` at the end). Warm-up then linear decay of the learning rate, so that the end point is
    settled rather than caught mid-descent (where tiny perturbations move it by %)."""
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(load_preset("tiny", hidden_size=128, q_lora_rank=64, kv_lora_rank=64,
                                              moe_intermediate_size=64, intermediate_size=256))
    if fp8:
        enable_fp8_training(model)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 20) * max(0.1, 1 - step / steps)
    )
    generator = torch.Generator().manual_seed(1)
    first = None
    for _ in range(steps):
        starts = torch.randint(0, data.numel() - SEQ - 1, (BATCH,), generator=generator)
        batch = torch.stack([data[s : s + SEQ] for s in starts.tolist()])
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        first = loss.item() if first is None else first
    model.eval()
    with torch.no_grad():
        return first, model(held_out, labels=held_out).loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="init seeds (at least two)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a shared machine)")
    parser.add_argument("--result-file", default=None, help="default: benchmarks/results/fp8_training.json")
    args = parser.parse_args()
    if len(set(args.seeds)) < 2:
        raise SystemExit(f"--seeds: the noise needs at least two different seeds, got {args.seeds}")
    torch.set_num_threads(args.threads)
    record = ResultFile("fp8_training", args.result_file)
    data, held_out = shakespeare()
    end = {True: {}, False: {}}
    print(f"{'seed':>4}  {'full':>8}  {'fp8':>8}  fp8 effect")
    for seed in args.seeds:
        for fp8 in (False, True):  # the two sides alternate, seed by seed
            end[fp8][seed] = train(fp8, args.steps, data, held_out, seed)[1]
        effect = (end[True][seed] - end[False][seed]) / end[False][seed]
        print(f"{seed:>4}  {end[False][seed]:8.4f}  {end[True][seed]:8.4f}  {effect:+.3%}", flush=True)
    effects = [(end[True][s] - end[False][s]) / end[False][s] for s in args.seeds]
    noise = [abs(end[False][i] - end[False][j]) / end[False][j] for i, j in itertools.combinations(args.seeds, 2)]
    record.add_series("held-out loss, full precision", [end[False][s] for s in args.seeds], "nats/token")
    record.add_series("held-out loss, fp8", [end[True][s] for s in args.seeds], "nats/token")
    record.add_series("fp8 effect: (fp8 - full) / full, per seed", effects, "relative")
    noise_summary = record.add_series("seed-to-seed noise: |full_i - full_j| / full_j, per pair", noise, "relative")
    print(f"largest |fp8 effect| {max(map(abs, effects)):.3%}; seed-to-seed noise median {noise_summary['median']:.3%}"
          f" (min {noise_summary['min']:.3%}, max {noise_summary['max']:.3%})")
    record.write(extra={"seeds": args.seeds, "steps": args.steps, "batch": BATCH, "sequence": SEQ,
                        "held_out_sequences": HELD_OUT})


if __name__ == "__main__":
    main()
