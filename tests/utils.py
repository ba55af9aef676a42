"""Shared test helpers: tiny configs and models with every weight randomised (norms, router bias included)."""

from __future__ import annotations

import torch

from modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM, load_preset


def tiny_config(**overrides) -> DeepseekV3Config:
    return load_preset("tiny", **overrides)


def random_model(config: DeepseekV3Config | None = None, **overrides) -> DeepseekV3ForCausalLM:
    """A tiny fp32 model whose norms and routing biases are random too, so no term of the math is trivially 1 or 0."""
    model = DeepseekV3ForCausalLM(config or tiny_config(**overrides)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.2)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0.0, 0.1)
    return model


def word_tokenizer(vocab_size: int = 512):
    """A tokenizer of the words `w000 .. w{vocab_size - 1}` (id = number, split on whitespace; `w003` is `[UNK]`),
    with `w000` as bos, `w001` as eos and `w002` as pad like the tiny preset, and a chat template that writes each
    message's role and content on a line: every text of such words encodes and decodes exactly, offline. (The
    numbers have three digits because special tokens match inside words: with `w1` as eos, `w17` would be `w1 7`.)"""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i:03d}" for i in range(vocab_size)]
    vocab = {word: i for i, word in enumerate(words) if i != 3}
    tok = Tokenizer(models.WordLevel(vocab={**vocab, "[UNK]": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=words[0], eos_token=words[1],
                                        pad_token=words[2])
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }}\n{% endfor %}"
    return tokenizer


def spread_routing(model: DeepseekV3ForCausalLM) -> DeepseekV3ForCausalLM:
    """`model` with its routers' weights scaled up and their biases zeroed, so that each token's experts depend on the
    token (random weights and biases alone tend to send every token to the same experts)."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("e_score_correction_bias"):
                tensor.zero_()
            elif name.endswith("mlp.gate.weight"):
                tensor.mul_(30)
    return model


def random_ids(config: DeepseekV3Config, batch: int, length: int) -> torch.Tensor:
    # avoid the special ids so EOS does not stop generation early
    return torch.randint(3, config.vocab_size, (batch, length))


def agreeing_mtp_model(
    depth: int, context_weight: float, mtp_context_weight: float = 0.0, **overrides
) -> DeepseekV3ForCausalLM:
    """A tiny random model whose MTP modules draft what the main model will choose most of the time.

    The main model's attention and FFN outputs are scaled by `context_weight`, so it is a bigram model (next token a
    function of the current one) plus that much context. Every MTP module passes the embedding of its input token
    through (`eh_proj = [I, w·I]`) to the shared norm and head, its block adding w times its attention and FFN
    outputs (w = `mtp_context_weight`), i.e. it predicts that token's bigram successor (plus some context): drafts are
    accepted unless the context changes the main model's choice.
    """
    model = random_model(tiny_config(num_nextn_predict_layers=depth, **overrides))
    hidden = model.config.hidden_size
    with torch.no_grad():
        for name, param in model.model.layers.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
                param.mul_(context_weight)
        for module in model.mtp:
            for name, param in module.block.named_parameters():
                if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
                    param.mul_(mtp_context_weight)
            module.enorm.weight.fill_(1.0)
            module.eh_proj.weight[:, :hidden] = torch.eye(hidden)
            module.eh_proj.weight[:, hidden:] = mtp_context_weight * torch.eye(hidden)
            module.shared_head.norm.weight.copy_(model.model.norm.weight)
    return model


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def reference_mtp_logits(model: DeepseekV3ForCausalLM, ids: torch.Tensor) -> list[torch.Tensor]:
    """The MTP chain written out from its formula on the model's weights (the tests' oracle): depth k's logits
    `[b, s - k - 1, vocab]` (its positions with a target), each depth's block fed
    `eh_proj(cat[enorm(Emb(t_{i+k})), hnorm(h^{k-1}_i)])` under a causal mask."""
    eps = model.config.rms_norm_eps
    s = ids.shape[1]
    emb = model.model.embed_tokens.weight[ids]
    hidden = model.model(ids).last_hidden_state  # h^0, after the final norm
    all_logits = []
    for k, module in enumerate(model.mtp, start=1):
        n = s - k - 1
        x = torch.cat([rms_norm(emb[:, k : k + n], module.enorm.weight, eps),
                       rms_norm(hidden[:, :n], module.hnorm.weight, eps)], dim=-1) @ module.eh_proj.weight.T
        causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
        positions = torch.arange(n)[None].expand(ids.shape[0], -1)
        hidden = module.block(x, model.model.rotary_emb(x, positions), causal)
        all_logits.append(rms_norm(hidden, module.shared_head.norm.weight, eps) @ model.lm_head.weight.T)
    return all_logits


# An FP8 checkpoint of the official format, and a tiny shape whose dims pass 128 so that full and partial blocks mix
QUANTIZATION = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
# dims past 128 so that full and partial blocks mix: kv_a_proj_with_mqa has 136 + 8 = 144 rows (the 576-row case)
SHAPE = dict(hidden_size=192, q_lora_rank=160, kv_lora_rank=136, qk_rope_head_dim=8, qk_nope_head_dim=16,
             v_head_dim=16, num_attention_heads=2, intermediate_size=200, moe_intermediate_size=136,
             n_routed_experts=4, n_group=2, topk_group=1, num_experts_per_tok=2, num_hidden_layers=2,
             first_k_dense_replace=1)


E4M3_MAX = 448.0  # the largest finite float8_e4m3fn: 1.75 · 2^8


def e4m3_tiles(x: torch.Tensor, tile: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 from the format's definition, written here independently of the package's quantiser: `x` `[..., R, C]`
    in `tile`-sized blocks over its last two dims (edge blocks may be partial), each block's scale `amax / 448` in
    fp32 (1 for an all-zero block), the payload `x / scale` cast to float8_e4m3fn (round to nearest even; in range by
    construction). Returns `(q [..., R, C] e4m3, s [..., ceil(R/r), ceil(C/c)] fp32)`."""
    r, c = tile
    rows, cols = x.shape[-2:]
    rb, cb = -(-rows // r), -(-cols // c)
    padded = torch.zeros(*x.shape[:-2], rb * r, cb * c, dtype=torch.float64, device=x.device)
    padded[..., :rows, :cols] = x.double()
    blocks = padded.unflatten(-1, (cb, c)).unflatten(-3, (rb, r))  # [..., rb, r, cb, c]
    amax = blocks.abs().amax(dim=(-3, -1)).float()
    s = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))  # fp32 division, as the definition reads
    q = (blocks / s.double()[..., :, None, :, None]).flatten(-2).flatten(-3, -2)[..., :rows, :cols]
    return q.to(torch.float8_e4m3fn), s


def e4m3_value(q: torch.Tensor, s: torch.Tensor, tile: tuple[int, int]) -> torch.Tensor:
    """The fp64 value `q · s` of `e4m3_tiles`' output (each element times its block's scale)."""
    rows, cols = q.shape[-2:]
    scale = s.double().repeat_interleave(tile[0], dim=-2)[..., :rows, :].repeat_interleave(tile[1], dim=-1)
    return q.double() * scale[..., :cols]


def row_tiles(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` `[..., K]` in 1×128 tiles along its last dim (activations): `(q [..., K], s [..., ceil(K/128)])`."""
    q, s = e4m3_tiles(x.reshape(-1, x.shape[-1]), (1, 128))
    return q.view(x.shape), s.view(*x.shape[:-1], s.shape[-1])


def weight_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`w` `[..., N, K]` in 128×128 blocks (weights, checkpoints' `weight_scale_inv`)."""
    return e4m3_tiles(w, (128, 128))


# The package's quantiser multiplies amax by the fp32-rounded 1/448 where `e4m3_tiles` divides by 448: a scale may be
# one fp32 step apart, which moves the rare payload that lies on a rounding boundary by one e4m3 step. A GEMM over
# operands from the two quantisers then differs by up to ~1e-4 (relative Frobenius); a wrong tiling differs by ~5%.
EMULATION_TOLERANCE = 1e-3


def through_row_tiles(x):  # through 1×128 tiles along the last dim, back in fp64
    return e4m3_value(*e4m3_tiles(x.reshape(-1, x.shape[-1]), (1, 128)), (1, 128)).view(x.shape)


def through_column_tiles(x):  # through 128×1 tiles along the first dim
    return e4m3_value(*e4m3_tiles(x, (128, 1)), (128, 1))


def through_weight_blocks(w):  # through 128×128 blocks
    return e4m3_value(*e4m3_tiles(w, (128, 128)), (128, 128))


def recorded_drafts(monkeypatch) -> tuple[dict, dict, dict]:
    """Records the first draft MTP module 1 makes at each request's newest position: `(batched, alone, current)`,
    `batched[(request number, position)]` inside continuous batching, `alone[(current["prompt"], position)]` in
    `generate(use_mtp=True)` (set `current["prompt"]` to the number of the prompt it runs)."""
    from modeling_deepseek_v3.generation import SelfSpeculativeDecoder
    from modeling_deepseek_v3.speculative_batching import SpeculativeBatchProcessor

    batched, alone, current = {}, {}, {"prompt": 0}
    draft, alone_draft = SpeculativeBatchProcessor._draft, SelfSpeculativeDecoder._draft

    def record_batched(self, model, requests, *rest):
        drafts, probs = draft(self, model, requests, *rest)
        for fs, row in zip(requests, drafts):
            newest = fs.state.position_offset - fs.query_length
            batched[(int(fs.state.request_id.split("_")[1]), newest)] = row[0]
        return drafts, probs

    def record_alone(self, window):
        drafts, probs = alone_draft(self, window)
        alone[(current["prompt"], int(self.next_position[0]))] = int(drafts[0, 0])
        return drafts, probs

    monkeypatch.setattr(SpeculativeBatchProcessor, "_draft", record_batched)
    monkeypatch.setattr(SelfSpeculativeDecoder, "_draft", record_alone)
    return batched, alone, current
