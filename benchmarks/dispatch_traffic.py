"""Bytes per token that one MoE layer's expert-parallel dispatch sends over the network, with node-limited routing on
(DeepSeek-V3: each token's 8 experts within topk_group = 4 of n_group = 8 groups) and off (topk_group = 8).

The routes come from this package's router (`TopkRouter`) at DeepSeek-V3 671B's shapes (hidden 7168, 256 experts,
8 groups, top-8) with random weights (std = initializer_range) over random normalised hidden states; a trained
router routes less uniformly, while the bound from the group limit holds for any router. Tokens start spread evenly
over the destinations. Two dispatches are counted:

* per expert: a token's hidden state sent once per chosen expert on another destination (an all-to-all of
  (token, expert) pairs, as transformers' `AllToAllEP` does);
* per destination: sent once per other destination that holds any of its experts (as DeepSeek's dispatch does).

Every row printed is kept in the result file (`--result-file`, default `benchmarks/results/dispatch_traffic.json`).

    python benchmarks/dispatch_traffic.py --tokens 4096

References: DeepSeek-V3 report §2.1.2 (node-limited routing) and §3.2.2 (dispatch in FP8, combine in bf16).
"""

from __future__ import annotations

import argparse

import torch
from result_file import ResultFile  # beside this script

from modeling_deepseek_v3 import load_preset
from modeling_deepseek_v3.dispatch_traffic import dispatch_traffic
from modeling_deepseek_v3.moe import TopkRouter

GPUS_PER_NODE = 8
# (name, expert-parallel ranks): one node, two nodes, the report's 64-way expert parallelism over 8 nodes
LAYOUTS = (("ep8, 1 node", 8), ("ep16, 2 nodes", 16), ("ep64, 8 nodes", 64))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--result-file", default=None, help="default: benchmarks/results/dispatch_traffic.json")
    args = parser.parse_args()
    record = ResultFile("dispatch_traffic", args.result_file)
    rows = []
    torch.manual_seed(args.seed)
    base = load_preset("deepseek-v3-671b")
    hidden = torch.randn(args.tokens, base.hidden_size)
    weight = torch.randn(base.n_routed_experts, base.hidden_size) * base.initializer_range
    # bf16 rows, or FP8 rows with one fp32 scale per 128 elements (the report's dispatch)
    row_bytes = {"bf16": base.hidden_size * 2, "fp8": base.hidden_size + base.hidden_size // 128 * 4}

    print(f"{args.tokens} tokens, hidden {base.hidden_size}, {base.n_routed_experts} experts in {base.n_group} groups, "
          f"top-{base.num_experts_per_tok}; MB per 1k tokens per MoE layer (dispatch; the combine returns as many)")
    print(f"{'layout':<15} {'to':<5} {'topk_group':>10} {'max dest.':>9} "
          + " ".join(f"{f'per expert {d}':>15} {f'per dest. {d}':>14}" for d in row_bytes))
    for topk_group in (base.topk_group, base.n_group):
        config = load_preset("deepseek-v3-671b", topk_group=topk_group)
        router = TopkRouter(config)
        with torch.no_grad():
            router.weight.copy_(weight)
            router.e_score_correction_bias.zero_()
            indices = router(hidden).indices
        for name, ep_size in LAYOUTS:
            per_gpu = config.n_routed_experts // ep_size
            levels = [("GPUs", per_gpu)] + ([("nodes", per_gpu * GPUS_PER_NODE)] if ep_size > GPUS_PER_NODE else [])
            for level, experts_per_destination in levels:
                destinations = config.n_routed_experts // experts_per_destination
                source = torch.arange(args.tokens) % destinations
                label = "on" if topk_group < config.n_group else "off"
                row = {"layout": name, "destinations": level, "topk_group": topk_group, "group_limit": label}
                for rows_of, nbytes in row_bytes.items():
                    traffic = dispatch_traffic(indices, experts_per_destination, source, nbytes)
                    row["max_destinations"] = traffic.max_destinations
                    row[f"per_expert_{rows_of}"] = traffic.per_expert * 1000 / 2**20
                    row[f"per_destination_{rows_of}"] = traffic.per_destination * 1000 / 2**20
                rows.append(row)
                cells = [f"{row[f'per_expert_{d}']:>15.1f} {row[f'per_destination_{d}']:>14.1f}"
                         for d in row_bytes]
                print(f"{name:<15} {level:<5} {f'{topk_group} ({label})':>10} {row['max_destinations']:>9} "
                      + " ".join(cells))
    # computed from the routes, not timed: no series, every printed row
    record.write(extra={"args": vars(args), "unit": "MB (2**20 bytes) per 1k tokens per MoE layer", "rows": rows})


if __name__ == "__main__":
    main()
