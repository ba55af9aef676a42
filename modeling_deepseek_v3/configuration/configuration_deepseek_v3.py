"""`DeepseekV3Config`: the official DeepSeek-V3 `config.json` keys, plus a few clearly named runtime knobs.

References: DeepSeek-V3 technical report (arXiv 2412.19437) §2-3; the released `config.json` of
deepseek-ai/DeepSeek-V3; docs/design.md (Configuration).
"""

from __future__ import annotations

import copy
import math
from typing import Any

from transformers import PreTrainedConfig
from transformers.utils import logging

from . import parallel_plans

logger = logging.get_logger(__name__)

SCORING_FUNCS = ("sigmoid", "softmax")
DEFAULT_ROPE_THETA = 10000.0
TOPK_METHODS = ("noaux_tc",)
MLA_PATHS = ("auto", "expanded", "absorbed")
YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
             "attention_factor")
# the numeric settings each RoPE type reads besides `rope_theta` (YaRN also reads the bool `truncate`, and every type
# `partial_rotary_factor`, as transformers' RoPE functions do); other keys are ignored with a warning, as transformers
# does. YaRN's `original_max_position_embeddings` defaults to `max_position_embeddings`, as in transformers.
ROPE_TYPE_KEYS = {"default": (), "linear": ("factor",), "dynamic": ("factor",), "yarn": YARN_KEYS}
ROPE_TYPES = tuple(ROPE_TYPE_KEYS)
ROPE_REQUIRED_KEYS = {"linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor",)}
ROPE_OTHER_KEYS = {"default": ("partial_rotary_factor",), "linear": ("partial_rotary_factor",),
                   "dynamic": ("partial_rotary_factor",), "yarn": ("partial_rotary_factor", "truncate")}
# torch's grouped GEMM (the routed experts on CPU, and FP8 training's weight gradient) needs every row stride to be a
# multiple of 16 bytes: 8 elements in bf16/fp16, the narrowest dtype a model computes in (4 would do for fp32)
GROUPED_GEMM_ROW_BYTES = 16
# upper bounds on the counts that decide how many modules (and how large an embedding) are built: at least 16x every
# released DeepSeek-V3-family config (61 layers, 1 MTP module, 384 routed experts, 163,840 tokens)
SIZE_BOUNDS = {"num_hidden_layers": 1024, "num_nextn_predict_layers": 16, "n_routed_experts": 8192,
               "vocab_size": 4_194_304}
NARROWEST_COMPUTE_BYTES = 2
BOOLEAN_FIELDS = ("norm_topk_prob", "use_cache", "tie_word_embeddings", "attention_bias", "use_mtp_modules",
                  "use_routing_bias", "routing_bias_auto_update", "output_router_logits")
OPTIONAL_BOOLEAN_FIELDS = ("output_hidden_states", "return_dict")  # transformers' own, None meaning "default"


def _is_finite_number(value: Any) -> bool:
    """An int or float that is neither NaN nor infinite (a bool is not a number here)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _rope_parameters(rope_theta: float | None, rope_scaling: dict | None) -> dict:
    """transformers' form: `{"rope_type", "rope_theta", **scaling}` from the official `rope_theta` + `rope_scaling`
    (which may hold `rope_theta` itself, as the configs this class saves do; None: the default base)."""
    if rope_scaling is not None and not isinstance(rope_scaling, dict):
        _fail("rope_scaling", rope_scaling, "must be a dict or None")
    inner_theta = (rope_scaling or {}).get("rope_theta")
    if rope_theta is not None and inner_theta is not None and inner_theta != rope_theta:
        _fail("rope_theta", rope_theta, f"differs from rope_scaling.rope_theta = {inner_theta!r}; give the base once")
    params = {"rope_type": "default", "rope_theta": DEFAULT_ROPE_THETA if rope_theta is None else rope_theta}
    if rope_scaling:
        params.update(copy.deepcopy({k: v for k, v in rope_scaling.items() if k not in ("type", "rope_type")}))
        params["rope_type"] = rope_scaling.get("type", rope_scaling.get("rope_type"))
    return params


def _official_rope_scaling(rope_parameters: dict) -> dict | None:
    if rope_parameters.get("rope_type", "default") == "default":
        return None
    scaling = {k: v for k, v in rope_parameters.items() if k not in ("rope_theta", "rope_type")}
    return {**scaling, "type": rope_parameters["rope_type"]}


def _fail(field: str, value: Any, rule: str) -> None:
    raise ValueError(f"DeepseekV3Config: `{field}` = {value!r} is invalid: {rule}")


def _validate_rope_parameters(params: dict) -> None:
    """The rules of the RoPE settings (named by their official `rope_scaling` keys)."""
    kind = params["rope_type"]
    if kind not in ROPE_TYPES:
        _fail("rope_scaling.type", kind, f"must be one of {ROPE_TYPES}")
    theta = params["rope_theta"]
    if not _is_finite_number(theta) or theta <= 0:
        _fail("rope_theta", theta, "must be a finite positive number")
    allowed = ROPE_TYPE_KEYS[kind]
    unread = sorted(params.keys() - {"rope_type", "rope_theta"} - set(allowed) - set(ROPE_OTHER_KEYS[kind]))
    if unread:
        logger.warning(f"DeepseekV3Config: rope_scaling keys {unread} are not settings of {kind!r} RoPE, which "
                       f"reads {list(allowed + ROPE_OTHER_KEYS[kind])}; they are ignored")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        _fail("rope_scaling.partial_rotary_factor", params["partial_rotary_factor"],
              "must be 1.0: DeepSeek-V3 rotates the whole rope part of each head; set qk_rope_head_dim to rotate "
              "fewer dimensions")
    if not isinstance(params.get("truncate", True), bool):
        _fail("rope_scaling.truncate", params["truncate"], "must be True or False")
    for key in ROPE_REQUIRED_KEYS.get(kind, ()):
        if key not in params:
            _fail(f"rope_scaling.{key}", None, f"is required for {kind!r} RoPE")
    for key in allowed:
        value = params.get(key)
        if value is not None and (not _is_finite_number(value) or value <= 0):
            _fail(f"rope_scaling.{key}", value, "must be a finite positive number")
    if "factor" in allowed and params["factor"] < 1:
        _fail("rope_scaling.factor", params["factor"], f"{kind!r} RoPE extends the context, so it must be >= 1")


class DeepseekV3Config(PreTrainedConfig):
    r"""Configuration of a DeepSeek-V3 model.

    Field names are those of the official `config.json`, so the released 671B config loads unchanged. Fields
    beyond the official ones:

    Args:
        routing_bias_update_speed (`float`, defaults to 0.001): γ of the auxiliary-loss-free balancing; after each
            optimizer step `e_score_correction_bias_i += γ·sign(mean(load) − load_i)`. 0 freezes the bias.
        seq_balance_loss_alpha (`float`, defaults to 0.0001): α of the complementary sequence-wise balance loss.
        mtp_loss_weight (`float`, defaults to 0.3): λ of the multi-token-prediction loss,
            `loss = main + λ/D · Σ_k CE_k` over the D = `num_nextn_predict_layers` MTP modules.
        use_mtp_modules (`bool`, defaults to True): the switch of the MTP modules. When False they are still built,
            loaded and saved (weights kept), but never computed: no MTP loss in training, and
            `generate(use_mtp=True)` is refused. It has no effect when `num_nextn_predict_layers` is 0.
        use_routing_bias (`bool`, defaults to True): add `e_score_correction_bias` when choosing experts.
        routing_bias_auto_update (`bool`, defaults to True): move the routing biases after every `step()` of any
            torch optimizer holding the model's parameters (Trainer, accelerate, a hand-written loop). False leaves
            the update to explicit `model.update_routing_bias()` calls.
        mla_attention_path (`str`, defaults to "auto"): "auto" picks, per call, the cheaper of the expanded and
            the absorbed MLA paths (docs/design.md); "expanded" / "absorbed" force one (for tests and benchmarks).
        output_router_logits (`bool`, defaults to False): transformers' MoE flag, the default of the forward
            argument of the same name: return every MoE layer's router logits (`router_logits`). It adds no loss.

    `quantization_config` (FP8) is kept in `fp8_quantization_config` so that transformers' own FP8 quantizer never
    sees it, and written back under its official name by `to_dict()`.

    Raises:
        ValueError: naming the field, the value and the rule, for every inconsistent setting.
    """

    model_type = "deepseek_v3"
    keys_to_ignore_at_inference = ["cache"]
    # the names other MoE code reads (transformers' Mixtral-style helpers, TRL's router loss): the routed experts
    attribute_map = {"num_local_experts": "n_routed_experts", "num_experts": "n_routed_experts",
                     "num_mtp_layers": "num_nextn_predict_layers"}
    # parallel plans for transformers' distributed engine; the tensor- and expert-parallel ones are properties below
    base_model_fsdp_plan = parallel_plans.BASE_MODEL_FSDP_PLAN
    base_model_pp_plan = parallel_plans.BASE_MODEL_PP_PLAN

    def __init__(
        self,
        vocab_size: int = 129280,
        hidden_size: int = 7168,
        intermediate_size: int = 18432,
        moe_intermediate_size: int = 2048,
        num_hidden_layers: int = 61,
        num_nextn_predict_layers: int = 1,
        num_attention_heads: int = 128,
        num_key_value_heads: int | None = None,
        n_shared_experts: int = 1,
        n_routed_experts: int = 256,
        routed_scaling_factor: float = 2.5,
        kv_lora_rank: int = 512,
        q_lora_rank: int | None = 1536,
        qk_rope_head_dim: int = 64,
        v_head_dim: int = 128,
        qk_nope_head_dim: int = 128,
        topk_method: str = "noaux_tc",
        n_group: int = 8,
        topk_group: int = 4,
        num_experts_per_tok: int = 8,
        moe_layer_freq: int = 1,
        first_k_dense_replace: int = 3,
        norm_topk_prob: bool = True,
        scoring_func: str = "sigmoid",
        hidden_act: str = "silu",
        max_position_embeddings: int = 4096,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 0,
        eos_token_id: int | list[int] | None = 1,
        tie_word_embeddings: bool = False,
        rope_theta: float | None = None,
        rope_scaling: dict | None = None,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        quantization_config: dict | None = None,
        routing_bias_update_speed: float = 0.001,
        seq_balance_loss_alpha: float = 0.0001,
        mtp_loss_weight: float = 0.3,
        use_mtp_modules: bool = True,
        use_routing_bias: bool = True,
        routing_bias_auto_update: bool = True,
        mla_attention_path: str = "auto",
        output_router_logits: bool = False,
        **kwargs: Any,
    ) -> None:
        # transformers >= 5 writes RoPE settings as `rope_parameters`; configs it saved come back that way.
        rope_parameters = kwargs.pop("rope_parameters", None)
        if rope_parameters is not None and rope_scaling is None:
            rope_theta = rope_parameters.get("rope_theta", rope_theta)
            rope_scaling = _official_rope_scaling(rope_parameters)
        kwargs.pop("qk_head_dim", None)  # derived, recomputed below

        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_nextn_predict_layers = num_nextn_predict_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.n_shared_experts = n_shared_experts
        self.n_routed_experts = n_routed_experts
        self.routed_scaling_factor = routed_scaling_factor
        self.kv_lora_rank = kv_lora_rank
        self.q_lora_rank = q_lora_rank
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.topk_method = topk_method
        self.n_group = n_group
        self.topk_group = topk_group
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_layer_freq = moe_layer_freq
        self.first_k_dense_replace = first_k_dense_replace
        self.norm_topk_prob = norm_topk_prob
        self.scoring_func = scoring_func
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.fp8_quantization_config = copy.deepcopy(quantization_config)
        self.routing_bias_update_speed = routing_bias_update_speed
        self.seq_balance_loss_alpha = seq_balance_loss_alpha
        self.mtp_loss_weight = mtp_loss_weight
        self.use_mtp_modules = use_mtp_modules
        self.use_routing_bias = use_routing_bias
        self.routing_bias_auto_update = routing_bias_auto_update
        self.mla_attention_path = mla_attention_path
        self.output_router_logits = output_router_logits
        # The one source of the RoPE settings, in transformers' `rope_parameters` form (its RoPE and MTP utilities
        # read it); `rope_theta` and `rope_scaling` are views of it in the official form.
        self.rope_parameters = _rope_parameters(rope_theta, rope_scaling)  # validated by the setter
        self._validate_sizes()
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate_fields()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> DeepseekV3Config:
        """transformers' construction from a `config.json` dict, giving a checkpoint of another member of the
        family the config class of its own `model_type` (a `kimi_k2` folder loaded through `DeepseekV3Config` stays
        `kimi_k2` when saved)."""
        member = CONFIG_CLASSES.get(config_dict.get("model_type"))
        if member is not None and member is not cls and issubclass(member, cls):
            return member.from_dict(config_dict, **kwargs)
        return super().from_dict(config_dict, **kwargs)

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs) -> tuple[dict[str, Any], dict[str, Any]]:
        """transformers' reading of `config.json`, refusing a file that holds no JSON object (a list, a number), on
        which the config's construction would fail with a bare `TypeError`."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if not isinstance(config_dict, dict):
            kind = {list: "an array", str: "a string"}.get(type(config_dict), type(config_dict).__name__)
            raise ValueError(f"{pretrained_model_name_or_path}: config.json must hold a JSON object of settings, "
                             f"not {kind}")
        return config_dict, kwargs

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer `layer_idx` has a MoE FFN (else a dense MLP); the MTP modules' blocks
        (`layer_idx >= num_hidden_layers`) always do."""
        if layer_idx >= self.num_hidden_layers:
            return True
        return layer_idx >= self.first_k_dense_replace and layer_idx % self.moe_layer_freq == 0

    @property
    def base_model_tp_plan(self) -> dict[str, str]:
        """Tensor-parallel plan of `DeepseekV3Model` for transformers' distributed engine (`parallel_plans.py`)."""
        return parallel_plans.base_model_tp_plan(self)

    @property
    def base_model_ep_plan(self) -> dict[str, str]:
        """Expert-parallel plan of `DeepseekV3Model`: whole routed experts per rank (`parallel_plans.py`)."""
        return parallel_plans.base_model_ep_plan(self)

    @property
    def rope_parameters(self) -> dict:
        """RoPE settings in transformers' form: `{"rope_type", "rope_theta", **scaling}`."""
        return self._rope_parameters

    @rope_parameters.setter
    def rope_parameters(self, value: dict) -> None:
        # validated on every assignment, so a RoPE type set after construction cannot be silently ignored;
        # a dict without `rope_theta` keeps the current base
        if not isinstance(value, dict):
            _fail("rope_parameters", value, "must be a dict with a `rope_type`")
        value = dict(value)
        if "rope_type" not in value:
            value["rope_type"] = value.pop("type", "default")
        current = self.__dict__.get("_rope_parameters")
        value.setdefault("rope_theta", current["rope_theta"] if current else DEFAULT_ROPE_THETA)
        self._validate_rope(value)
        self._rope_parameters = value

    @property
    def rope_theta(self) -> float:
        return self.rope_parameters["rope_theta"]

    @rope_theta.setter
    def rope_theta(self, value: float) -> None:
        self.rope_parameters = {**self.rope_parameters, "rope_theta": value}

    @property
    def rope_scaling(self) -> dict | None:
        """The official `rope_scaling` dict (`{"type": "yarn", "factor": ...}`), or None without scaling."""
        return _official_rope_scaling(self.rope_parameters)

    @rope_scaling.setter
    def rope_scaling(self, value: dict | None) -> None:
        self.rope_parameters = _rope_parameters(self.rope_theta, value)

    def validate_fields(self) -> None:
        """Check every rule of the configuration; raise `ValueError` naming field, value and rule."""
        self._validate_sizes()
        if self.num_key_value_heads != self.num_attention_heads:
            _fail("num_key_value_heads", self.num_key_value_heads,
                  f"MLA shares one latent across heads; must equal num_attention_heads ({self.num_attention_heads})")
        if self.n_routed_experts % self.n_group:
            _fail("n_group", self.n_group, f"must divide n_routed_experts ({self.n_routed_experts})")
        if self.n_group > 1 and self.n_routed_experts // self.n_group < 2:
            _fail("n_group", self.n_group,
                  "a group's score is the sum of its top-2 experts, so every group needs at least 2 experts "
                  f"(n_routed_experts = {self.n_routed_experts})")
        if self.topk_group > self.n_group:
            _fail("topk_group", self.topk_group, f"must be <= n_group ({self.n_group})")
        reachable = self.topk_group * self.n_routed_experts // self.n_group
        if self.num_experts_per_tok > reachable:
            _fail("num_experts_per_tok", self.num_experts_per_tok,
                  f"must be <= topk_group * n_routed_experts / n_group = {reachable}")
        if self.first_k_dense_replace > self.num_hidden_layers:
            _fail("first_k_dense_replace", self.first_k_dense_replace,
                  f"must be <= num_hidden_layers ({self.num_hidden_layers})")
        if self.qk_rope_head_dim % 2:
            _fail("qk_rope_head_dim", self.qk_rope_head_dim, "RoPE rotates pairs, so it must be even")
        if self.scoring_func not in SCORING_FUNCS:
            _fail("scoring_func", self.scoring_func, f"must be one of {SCORING_FUNCS}")
        if self.topk_method not in TOPK_METHODS:
            _fail("topk_method", self.topk_method, f"must be one of {TOPK_METHODS}")
        if self.hidden_act != "silu":
            _fail("hidden_act", self.hidden_act, "DeepSeek-V3 MLPs are SwiGLU; must be 'silu'")
        if self.mla_attention_path not in MLA_PATHS:
            _fail("mla_attention_path", self.mla_attention_path, f"must be one of {MLA_PATHS}")
        for name in ("hidden_size", "moe_intermediate_size"):
            row_elements = GROUPED_GEMM_ROW_BYTES // NARROWEST_COMPUTE_BYTES
            if getattr(self, name) % row_elements:
                _fail(name, getattr(self, name),
                      f"must be a multiple of {row_elements}: the routed experts' grouped GEMM "
                      f"(torch.nn.functional.grouped_mm) needs every row of its operands to span a multiple of "
                      f"{GROUPED_GEMM_ROW_BYTES} bytes, i.e. {row_elements} elements in bf16/fp16")
        for name in ("routing_bias_update_speed", "seq_balance_loss_alpha", "mtp_loss_weight", "initializer_range"):
            value = getattr(self, name)
            if not _is_finite_number(value) or value < 0:
                _fail(name, value, "must be a finite non-negative number")
        if not _is_finite_number(self.attention_dropout) or not 0 <= self.attention_dropout <= 1:
            _fail("attention_dropout", self.attention_dropout, "must be a probability in [0, 1]")
        for name in ("routed_scaling_factor", "rms_norm_eps"):
            value = getattr(self, name)
            if not _is_finite_number(value) or value <= 0:
                _fail(name, value, "must be a finite positive number")
        for name in BOOLEAN_FIELDS:
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "must be True or False")
        for name in OPTIONAL_BOOLEAN_FIELDS:
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "must be True, False or None")
        self._validate_rope(self.rope_parameters)
        self._validate_quantization()

    def _validate_sizes(self) -> None:
        """The sizes and counts: integers in range. Checked before transformers' own config validation too, so that
        a wrong type is named here, and before any module is built, so that a count no machine can build is refused
        at once instead of running out of memory building the module tree."""
        positive = (
            "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
            "num_attention_heads", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
            "n_routed_experts", "n_group", "topk_group", "num_experts_per_tok", "moe_layer_freq",
            "max_position_embeddings",
        )  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                _fail(name, value, "must be a positive integer")
        for name in ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                _fail(name, value, "must be a non-negative integer")
        q_rank = self.q_lora_rank
        if q_rank is not None and (isinstance(q_rank, bool) or not isinstance(q_rank, int) or q_rank <= 0):
            _fail("q_lora_rank", self.q_lora_rank, "must be a positive integer, or None for no query compression")
        for name, bound in SIZE_BOUNDS.items():
            if getattr(self, name) > bound:
                _fail(name, getattr(self, name), f"must be <= {bound}, far above any released DeepSeek-V3-family "
                      "model; larger counts would exhaust memory while the modules are built")

    def _validate_rope(self, params: dict) -> None:
        _validate_rope_parameters(params)
        rope_dim = self.qk_rope_head_dim  # its own rule (a positive even integer) is checked by validate_fields
        if params["rope_type"] == "dynamic" and isinstance(rope_dim, int) and rope_dim <= 2:
            _fail("qk_rope_head_dim", rope_dim,
                  "dynamic RoPE raises the base to the power r / (r - 2), so it needs more than 2 rope dims")

    def _validate_quantization(self) -> None:
        qc = self.fp8_quantization_config
        if qc is None:
            return
        if not isinstance(qc, dict):
            _fail("quantization_config", qc, "must be a dict or None")
        if qc.get("quant_method") != "fp8":
            # refused here, when the config is read, before any weight file is opened
            _fail("quantization_config.quant_method", qc.get("quant_method"),
                  "this weight format is not implemented (e.g. Kimi-K2-Thinking's INT4 'compressed-tensors'); "
                  "supported are FP8 e4m3 with block scales (quant_method 'fp8', as DeepSeek-V3 and Kimi-K2 ship) "
                  "and unquantised bf16/fp32 weights (no quantization_config)")
        if qc.get("fmt", "e4m3") != "e4m3":
            _fail("quantization_config.fmt", qc.get("fmt"), "only 'e4m3' is supported")
        block = qc.get("weight_block_size", [128, 128])
        if (
            not isinstance(block, (list, tuple))
            or len(block) != 2
            or any(isinstance(b, bool) or not isinstance(b, int) or b <= 0 for b in block)
        ):
            _fail("quantization_config.weight_block_size", block, "must be two positive integers")
        if qc.get("scale_fmt") not in (None, "ue8m0"):
            _fail("quantization_config.scale_fmt", qc["scale_fmt"], "must be absent, null or 'ue8m0'")
        if qc.get("modules_to_not_convert"):
            _fail("quantization_config.modules_to_not_convert", qc["modules_to_not_convert"],
                  "is not supported: FP8 checkpoints must quantise every decoder projection, as the official ones do")
        if qc.get("activation_scheme", "dynamic") != "dynamic":
            _fail("quantization_config.activation_scheme", qc.get("activation_scheme"), "only 'dynamic' is supported")

    def to_dict(self) -> dict[str, Any]:
        """Serialise with the official key names (`rope_theta`, `rope_scaling`, `quantization_config`).

        With RoPE scaling, `rope_theta` is written inside `rope_scaling` (as transformers >= 5 writes it in
        `rope_parameters`) rather than beside it: transformers' generic `PreTrainedConfig`, which `Trainer` reads when
        it resumes from a checkpoint, fails on a top-level `rope_theta` next to a YaRN `rope_scaling`
        (`standardize_rope_params` reads `max_position_embeddings` before the config has it). The built-in
        DeepSeek-V3 config class reads both forms alike.
        """
        out = super().to_dict()
        for key in ("_rope_parameters", "rope_parameters", "fp8_quantization_config", "qk_head_dim"):
            out.pop(key, None)
        out.pop("rope_theta", None)
        if self.rope_scaling is None:
            out["rope_theta"] = self.rope_theta
            out["rope_scaling"] = None
        else:
            out["rope_scaling"] = {**self.rope_scaling, "rope_theta": self.rope_theta}
        if self.fp8_quantization_config is not None:
            out["quantization_config"] = copy.deepcopy(self.fp8_quantization_config)
        return out


class KimiK2Config(DeepseekV3Config):
    """The configuration of Kimi-K2 checkpoints: the DeepSeek-V3 architecture (`architectures` names
    `DeepseekV3ForCausalLM`) under its own `model_type = "kimi_k2"`, which `save_pretrained` keeps. Every field and
    rule is `DeepseekV3Config`'s; the release sets 384 routed experts in one group, one dense layer, no MTP module.
    """

    model_type = "kimi_k2"

    # defined so that transformers keeps `DeepseekV3Config.__init__` (it gives a config subclass without an
    # `__init__` of its own a generated dataclass one)
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)


# DeepSeek's index kernel scores a key with one FP8 scale per query head and one per key: one 1x128 tile per vector
INDEX_TILE = 128
# how a training forward trains the lightning indexer (None: training is refused); the DeepSeek-V3.2 report's stages
INDEXER_TRAINING_STAGES = (None, "dense_warmup", "sparse")


class DeepseekV32Config(DeepseekV3Config):
    r"""The configuration of DeepSeek-V3.2 checkpoints (`model_type = "deepseek_v32"`): DeepSeek-V3 plus DeepSeek
    Sparse Attention, whose lightning indexer picks, per query, the `index_topk` past tokens MLA attends to
    (docs/v32.md). Every DeepSeek-V3 field and rule applies; the indexer adds:

    Args:
        index_n_heads (`int`, defaults to 64): the indexer's query heads.
        index_head_dim (`int`, defaults to 128): the width of its query heads and of its one key; a power of two
            (the Hadamard rotation) of at most 128 (one FP8 tile per vector, as DeepSeek's index kernel scores it),
            at least `qk_rope_head_dim` (its first `qk_rope_head_dim` dims are rotated).
        index_topk (`int`, defaults to 2048): how many keys each query attends to.
        indexer_training_stage (`str`, *optional*): how a training forward (train mode, gradients enabled) trains
            the indexer (docs/v32.md#training): "dense_warmup" (the main attention dense over every causal key, only
            the indexer trained, by its KL loss against the main attention), "sparse" (the main attention over the
            indexer's choice, trained by the language-model loss; the indexer by its KL loss over the chosen keys),
            or None, which refuses training forwards. Evaluation forwards ignore it.
        indexer_loss_weight (`float`, defaults to 1.0): the weight of the indexer's KL loss in `loss`.

    The indexer reads the query latent, so `q_lora_rank` must be set.
    """

    model_type = "deepseek_v32"

    def __init__(self, index_n_heads: int = 64, index_head_dim: int = 128, index_topk: int = 2048,
                 indexer_training_stage: str | None = None, indexer_loss_weight: float = 1.0,
                 **kwargs: Any) -> None:
        self.index_n_heads = index_n_heads
        self.index_head_dim = index_head_dim
        self.index_topk = index_topk
        self.indexer_training_stage = indexer_training_stage
        self.indexer_loss_weight = indexer_loss_weight
        super().__init__(**kwargs)

    def validate_fields(self) -> None:
        """`DeepseekV3Config`'s rules, then the indexer's; raise `ValueError` naming field, value and rule."""
        super().validate_fields()
        for name in ("index_n_heads", "index_head_dim", "index_topk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                _fail(name, value, "must be a positive integer")
        dim = self.index_head_dim
        if dim & (dim - 1) or dim > INDEX_TILE:
            _fail("index_head_dim", dim, f"must be a power of two (the indexer's Hadamard rotation) of at most "
                  f"{INDEX_TILE} (one FP8 tile per query head and key, as DeepSeek's index kernel scores them)")
        if dim < self.qk_rope_head_dim:
            _fail("index_head_dim", dim, f"must be >= qk_rope_head_dim ({self.qk_rope_head_dim}): the indexer rotates "
                  "that many of its dims")
        if self.q_lora_rank is None:
            _fail("q_lora_rank", None, "DeepSeek-V3.2's indexer reads the query latent, so it must be set")
        if self.indexer_training_stage not in INDEXER_TRAINING_STAGES:
            _fail("indexer_training_stage", self.indexer_training_stage,
                  f"must be one of {INDEXER_TRAINING_STAGES} (docs/v32.md#training)")
        if not _is_finite_number(self.indexer_loss_weight) or self.indexer_loss_weight < 0:
            _fail("indexer_loss_weight", self.indexer_loss_weight, "must be a finite non-negative number")

    def to_dict(self) -> dict[str, Any]:
        """`DeepseekV3Config.to_dict`, with the release's class names in `architectures` (`DeepseekV32ForCausalLM`,
        by which serving engines pick their implementation) where `save_pretrained` wrote this package's."""
        out = super().to_dict()
        if out.get("architectures"):
            out["architectures"] = [name.replace("DeepseekV3For", "DeepseekV32For") for name in out["architectures"]]
        return out


# the config class of each model_type of the DeepSeek-V3 architecture that this package loads and saves
CONFIG_CLASSES: dict[str, type[DeepseekV3Config]] = {"deepseek_v3": DeepseekV3Config, "kimi_k2": KimiK2Config,
                                                     "deepseek_v32": DeepseekV32Config}
