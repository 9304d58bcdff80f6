"""The Llama-family transformer, its weights, and what else is read from a checkpoint directory.

Idea: one plain-torch model covers Llama 2/3, Mistral, Qwen2 and Qwen3; they differ only in a few
switches (Qwen2's q/k/v bias, Qwen3's per-head q/k RMSNorm, Llama 3's RoPE frequency scaling,
tied embeddings). The forward takes one flat batch of tokens from many requests (prefill chunks
and decodes mixed) and leaves attention to attention.py, which reads the paged KV cache through
the AttentionMetadata it is given. Q/K/V and gate/up are each one fused matmul; the forward has no
host syncs or data-dependent branches on the Triton path, so the engine can capture it in a CUDA
graph. Two small Triton kernels, residual add + RMSNorm and SiLU(gate) * up, sit beside the torch
functions they replace: a graphed decode step of a small model is launch-bound, and with
attention.py's fused RoPE + KV write a layer runs 9 kernels instead of 21 (Qwen3-0.6B).

The tokenizer (its own section) turns an HF byte-level BPE tokenizer.json into a tiktoken.Encoding
and renders chat templates.

fp8 weights (W8A8): the norm and the SiLU kernels can write their output as e4m3 with a scale per token for the
next linear, which runs a Triton GEMM of ours for a few tokens (fp8_matmul) or torch._scaled_mm for more.

Owns: ModelConfig (from HF config.json), the forward, fp8 weights (Fp8Linear: online or an fp8 checkpoint's),
loading *.safetensors, random init, the tokenizer; under tensor parallelism, one rank's shard of each (shard_config)
and its two all-reduces a layer. Never touches: scheduling, which blocks a request owns, sampling.
"""
import codecs
import functools
import json
import math
import os
import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime

import tiktoken
import torch
import torch.distributed as dist
import torch.nn.functional as F
import triton
import triton.language as tl
from jinja2 import TemplateError, nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from safetensors import SafetensorError, safe_open
from torch import nn

import attention
from attention import FP8, FP8_MAX, AttentionMetadata

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


# ----------------------------------------------------------------------------------- config

@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1's RoPE rescaling: long wavelengths slowed by `factor`, short ones kept, a smooth
    blend between (https://arxiv.org/abs/2407.21783, section 3.3)."""
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    """The shape and switches of one model; field names are ours, read from HF's config.json."""
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Llama3RopeScaling | None
    tie_word_embeddings: bool
    eos_token_ids: list[int] = field(default_factory=list)
    dtype: torch.dtype = torch.float32  # the dtype the model runs in; load_model/random_model set it
    sampling_defaults: dict = field(default_factory=dict)  # generation_config.json's, as SamplingParams fields
    quantization: str | None = None  # "fp8": the checkpoint's linear weights are e4m3 (its quantization_config)
    static_input_scales: bool = False  # with "fp8": the checkpoint's activation scales (input_scale), else per token
    # Tensor parallelism (shard_config): the heads, MLP columns and vocabulary rows above are rank tp_rank's;
    # kv_replicas ranks hold the same KV heads (more ranks than KV heads).
    tp_rank: int = 0
    tp_size: int = 1
    kv_replicas: int = 1

    @property
    def vocab_rows(self) -> int:  # the embedding and lm_head rows of one rank (the last one's padded)
        return -(-self.vocab_size // self.tp_size)

    @property
    def layer_weights(self) -> int:
        """A layer's linear weights (q/k/v, o, gate/up, down): each costs 2 FLOPs a token."""
        q, kv = self.num_q_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return self.hidden_size * (2 * q + 2 * kv + 3 * self.intermediate_size)

    @property
    def attention_parity_context(self) -> int:
        """The context at which a token's attention FLOPs (4 x q heads x head_dim a context token and layer) equal
        its linear layers' (2 a weight): the unit of EngineConfig.budget_counts_attention."""
        return max(1, self.layer_weights // (2 * self.num_q_heads * self.head_dim))


SHAPES = {
    "qwen3-0.6b": ModelConfig(
        architecture="Qwen3ForCausalLM", vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_layers=28,
        num_q_heads=16, num_kv_heads=8, head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1e6,
        rope_scaling=None, tie_word_embeddings=True, eos_token_ids=[151645, 151643]),
    "llama3-8b": ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_q_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=5e5,
        rope_scaling=Llama3RopeScaling(8.0, 1.0, 4.0, 8192), tie_word_embeddings=False,
        eos_token_ids=[128001, 128008, 128009]),
    "tiny": ModelConfig(  # Qwen3-style, for CPU tests
        architecture="Qwen3ForCausalLM", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
        num_q_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1e4,
        rope_scaling=None, tie_word_embeddings=True, eos_token_ids=[511]),
}


def shard_config(config: ModelConfig, rank: int, size: int) -> ModelConfig:
    """One rank's share of the model (Megatron's split): its query heads, KV heads (one head shared by
    size / num_kv_heads ranks when there are fewer KV heads than ranks, as vLLM does) and MLP columns."""
    q, kv, inter = config.num_q_heads, config.num_kv_heads, config.intermediate_size
    if q % size or inter % size or (kv % size if size <= kv else size % kv):
        raise ValueError(f"tensor_parallel_size={size} must divide the model's num_attention_heads={q} and "
                         f"intermediate_size={inter}, and divide its num_key_value_heads={kv} or be a multiple of it")
    return replace(config, num_q_heads=q // size, num_kv_heads=max(1, kv // size), intermediate_size=inter // size,
                   tp_rank=rank, tp_size=size, kv_replicas=max(1, size // kv))


def _read_json(path: str, required: bool = False) -> dict:
    if not os.path.exists(path):
        if required:
            raise FileNotFoundError(f"{path} not found")
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, OSError) as e:  # invalid JSON, not UTF-8 text, a directory: the message names no file
        raise ValueError(f"{path}: not a readable JSON file ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


def _check_fields(where: str, values: dict, rules: dict) -> None:
    """ValueError naming the file and the first field that breaks its rule (name -> (test, what it may be)), so
    that no field of the wrong type fails later with a message naming neither; an absent field is tested as None."""
    for name, (ok, allowed) in rules.items():
        if not ok(values.get(name)):
            got = repr(values[name])[:80] if name in values else "no value"
            raise ValueError(f"{where}{name} must be {allowed}, got {got}")


def _rule(types: tuple, allowed: str, above=None, null=True) -> tuple[Callable, str]:
    """A _check_fields rule: a value of one of `types` (a bool is no int) and > `above` if given, or null if `null`."""
    return (lambda v: (null and v is None) or (type(v) in types and (above is None or v > above)),
            allowed + " or null" * null)


_OBJECT, _LIST, _FLAG = _rule((dict,), "an object"), _rule((list,), "a list"), _rule((bool,), "true or false")
_SIZE, _POSITIVE = _rule((int,), "an int >= 1", above=0, null=False), _rule((int, float), "a number > 0", above=0)
_TOKEN_ID = _rule((int,), "a token id (an int >= 0)", above=-1)
ID_RULES = {"bos_token_id": _TOKEN_ID, "eos_token_id": (lambda v: all(_TOKEN_ID[0](i) for i in (
    v if type(v) is list else [v])), "a token id, a list of them, or null")}  # config.json's, generation_config.json's
# Every field read from config.json; absent or null, it takes its default.
CONFIG_RULES = {
    "architectures": (lambda v: v is None or type(v) is list and all(type(a) is str for a in v), "a list of names"),
    **dict.fromkeys(["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings"], _SIZE),
    **dict.fromkeys(["num_key_value_heads", "head_dim", "sliding_window"], _rule((int,), "an int >= 1", above=0)),
    "rms_norm_eps": _POSITIVE, "rope_theta": _POSITIVE, "rope_scaling": _OBJECT, "rope_parameters": _OBJECT,
    **dict.fromkeys(["tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window"], _FLAG),
    "layer_types": _LIST, "quantization_config": _OBJECT, **ID_RULES}


def _read_rope(raw: dict) -> tuple[float, Llama3RopeScaling | None]:
    # transformers 5.x writes `rope_parameters` (theta inside); older files rope_theta + rope_scaling.
    where = f"config.json: {'rope_parameters' if raw.get('rope_parameters') else 'rope_scaling'}."
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    _check_fields(where, params, {"rope_theta": _POSITIVE})
    theta = float(params.get("rope_theta") or raw.get("rope_theta") or 10000.0)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(f"config.json: rope scaling type {kind!r} is not supported; supported: default, llama3")
    _check_fields(where, params, {"original_max_position_embeddings": _SIZE, **dict.fromkeys(
        ["factor", "low_freq_factor", "high_freq_factor"], _rule((int, float), "a number > 0", above=0, null=False))})
    return theta, Llama3RopeScaling(float(params["factor"]), float(params["low_freq_factor"]),
                                    float(params["high_freq_factor"]), params["original_max_position_embeddings"])


def read_config(path: str) -> ModelConfig:
    """ModelConfig from an HF checkpoint directory (config.json, generation_config.json)."""
    raw = _read_json(os.path.join(path, "config.json"), required=True)
    generation = _read_json(os.path.join(path, "generation_config.json"))
    _check_fields("config.json: ", raw, CONFIG_RULES)
    _check_fields("generation_config.json: ", generation, ID_RULES)
    architecture = (raw.get("architectures") or ["(none)"])[0]
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"config.json: architecture {architecture!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act {raw['hidden_act']!r} is not supported; supported: silu")
    for flag in ("attention_bias", "mlp_bias"):
        if raw.get(flag):
            raise ValueError(f"config.json: {flag}=true is not supported for {architecture} "
                             "(only Qwen2's built-in q/k/v bias is)")
    # Mistral applies its window whenever set; Qwen only with use_sliding_window. Within the window
    # the result equals full attention, so only a window shorter than the context is a problem.
    uses_window = raw.get("use_sliding_window", architecture == "MistralForCausalLM")
    window = raw.get("sliding_window") if uses_window else None
    max_positions = raw["max_position_embeddings"]
    if (window is not None and window < max_positions) or "sliding_attention" in (raw.get("layer_types") or []):
        raise ValueError(f"config.json: sliding-window attention (sliding_window={window}, max_position_embeddings="
                         f"{max_positions}) is not supported; supported: full attention (sliding_window null)")
    rope_theta, rope_scaling = _read_rope(raw)
    num_q_heads = raw["num_attention_heads"]
    default_head_dim = 128 if architecture == "Qwen3ForCausalLM" else raw["hidden_size"] // num_q_heads
    eos = generation.get("eos_token_id", raw.get("eos_token_id"))  # an int, a list of ints, or null
    return ModelConfig(
        architecture=architecture, vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"], num_layers=raw["num_hidden_layers"],
        num_q_heads=num_q_heads, num_kv_heads=raw.get("num_key_value_heads") or num_q_heads,
        head_dim=raw.get("head_dim") or default_head_dim, max_position_embeddings=max_positions,
        rms_norm_eps=float(raw.get("rms_norm_eps") or 1e-6), rope_theta=rope_theta,
        rope_scaling=rope_scaling, tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        eos_token_ids=[] if eos is None else [eos] if isinstance(eos, int) else eos,
        sampling_defaults=_sampling_defaults(generation), **_read_quantization(raw.get("quantization_config")))


def _read_quantization(spec: dict | None) -> dict:
    """quantization_config -> ModelConfig's quantization and static_input_scales for the fp8 schemes we run ({} without
    one). Any other is refused by name (layers left in bf16 beyond lm_head too): that would be another model."""
    if spec is None:
        return {}
    method, groups, ignored = spec.get("quant_method"), spec.get("config_groups"), spec.get("ignore") or []
    schemes = {_fp8_scheme(group) for group in (groups.values() if isinstance(groups, dict) else [])}
    if method == "fp8" and not spec.get("weight_block_size"):
        return dict(quantization="fp8", static_input_scales=spec.get("activation_scheme") == "static")
    if method == "compressed-tensors" and len(schemes) == 1 and None not in schemes and set(ignored) <= {"lm_head"}:
        return dict(quantization="fp8", static_input_scales=schemes.pop() == "static")
    details = json.dumps({key: spec[key] for key in ("config_groups", "weight_block_size", "ignore") if spec.get(key)})
    raise ValueError(f"config.json: quantization_config quant_method {method!r} {details[:300]} is not supported; "
                     "supported: fp8 weights per tensor or channel with fp8 activations (llm-compressor's FP8 schemes)")


def _fp8_scheme(group) -> str | None:
    """A compressed-tensors config group we run: "dynamic" (per token or tensor: we take per token) or "static"."""
    group = group if isinstance(group, dict) else {}
    weights, inputs = group.get("weights") or {}, group.get("input_activations") or {}
    if not (all(spec.get("type") == "float" and spec.get("num_bits") == 8 for spec in (weights, inputs))
            and weights.get("strategy") in ("tensor", "channel")):
        return None
    return "dynamic" if inputs.get("dynamic") is True else "static" if inputs.get("strategy") == "tensor" else None


def _sampling_defaults(generation: dict) -> dict:
    """generation_config.json's sampling fields under SamplingParams' names, which vLLM uses when no
    SamplingParams are given; do_sample false means greedy, as in HF."""
    names = dict(temperature="temperature", top_p="top_p", top_k="top_k", min_p="min_p",
                 repetition_penalty="repetition_penalty", max_new_tokens="max_tokens")
    defaults = {ours: generation[theirs] for theirs, ours in names.items() if generation.get(theirs) is not None}
    if generation.get("do_sample") is False:
        defaults["temperature"] = 0.0
    return defaults


def resolve_device_and_dtype(device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """Defaults: CUDA if present; bf16 on CUDA, fp32 on the CPU. dtype: torch.dtype or a name."""
    try:
        device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a device, e.g. 'cuda', 'cuda:1' or 'cpu' ({e})") from None
    if device.type == "cuda" and (device.index or 0) >= (count := torch.cuda.device_count()):
        raise ValueError(f"device='{device}': " + (f"this machine has {count} CUDA device(s)" if count else
                                                   "CUDA is not available on this machine"))
    if dtype is None or dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype {dtype!r} is not supported; supported: {', '.join(DTYPES)} (or their torch.dtype)")
    return device, dtype


# ----------------------------------------------------------------------------------- forward

def rope_tables(config: ModelConfig, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_position_embeddings, head_dim], computed in fp32 and stored in the model's
    dtype as HF does. Each angle appears twice (at i and i + head_dim/2), rotate_half's layout."""
    dim = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
    if (scaling := config.rope_scaling) is not None:
        # the three bands as one blend, smooth clamped: 0 for long wavelengths (slowed), 1 for short ones (kept)
        wavelength = 2 * math.pi / inv_freq
        smooth = ((scaling.original_max_position_embeddings / wavelength - scaling.low_freq_factor)
                  / (scaling.high_freq_factor - scaling.low_freq_factor)).clamp(0, 1)
        inv_freq = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    positions = torch.arange(config.max_position_embeddings, dtype=torch.float32, device=device)
    angles = (positions[:, None] * inv_freq[None, :]).repeat(1, 2)
    return angles.cos().to(config.dtype), angles.sin().to(config.dtype)


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                           quantize_for=None):
    """residual += x (in place: the residual stream), then HF's RMSNorm of it: normalised in fp32,
    rounded to the input dtype, then scaled by the weight. (quantize_for: the kernel's; linear_reference
    quantizes its own input.)"""
    total = residual.add_(x).float()
    return weight * (total * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def silu_and_mul_reference(gate_up: torch.Tensor, quantize_for=None) -> torch.Tensor:
    """SwiGLU's activation: [T, 2 * intermediate] (gate, up side by side) -> silu(gate) * up. (quantize_for: as
    add_rms_norm_reference's.)"""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# The kernels compute in fp32 and round to the model's dtype where the torch functions above do
# (the residual sum, the normalised row, silu's output), so in bf16 they agree with them, and with
# HF, up to the last bit of an fp32 sum or exp.

@triton.jit
def _add_rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, scale_ptr, eps, hidden_size, stride_x,
                         stride_residual, stride_out, BLOCK: tl.constexpr, QUANT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden_size
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    residual = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0).to(tl.float32)
    total = (residual + x).to(residual_ptr.dtype.element_ty)
    tl.store(residual_ptr + row * stride_residual + cols, total, mask=mask)
    total = total.to(tl.float32)
    normed = total * tl.rsqrt(tl.sum(total * total, 0) / hidden_size + eps)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    out = (normed.to(x_ptr.dtype.element_ty).to(tl.float32) * weight).to(x_ptr.dtype.element_ty)
    if QUANT:  # the next linear's fp8 input, from the registers: the bf16 row is never written
        scale = _dynamic_scale(tl.max(tl.abs(out.to(tl.float32)), 0))
        _store_e4m3(out.to(tl.float32), scale, out_ptr + row * stride_out + cols, scale_ptr + row, mask)
    else:
        tl.store(out_ptr + row * stride_out + cols, out, mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, quantize_for=None):
    """Triton version of add_rms_norm_reference (same arguments and result): one program per row. When the row's
    consumer `quantize_for` runs on fp8 tensor cores, the result comes quantized for it: (e4m3, scales)."""
    if (x.dim() != 2 or x.shape != residual.shape or weight.shape != x.shape[1:] or x.dtype != residual.dtype
            or x.stride(1) != 1 or residual.stride(1) != 1):
        raise ValueError(f"x and residual must be [num_tokens, hidden] of one dtype with contiguous rows, weight "
                         f"[hidden]; got {tuple(x.shape)} {x.dtype}, {tuple(residual.shape)} {residual.dtype}, "
                         f"{tuple(weight.shape)}")
    out, scale = _output_for(x.shape, x, quantize_for)
    if x.shape[0] > 0:
        block = triton.next_power_of_2(x.shape[1])
        _add_rms_norm_kernel[(x.shape[0],)](x, residual, weight, out, scale, eps, x.shape[1], x.stride(0),
                                            residual.stride(0), out.stride(0), BLOCK=block, QUANT=scale is not None,
                                            num_warps=min(8, max(1, block // 256)))
    return out if scale is None else (out, scale)


SILU_BLOCK = 1024  # elements of one row per program


@triton.jit
def _silu_times_up(gate_up_ptr, cols, mask, intermediate_size):
    dtype = gate_up_ptr.dtype.element_ty  # rounded where silu_and_mul_reference rounds
    gate = tl.load(gate_up_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + intermediate_size + cols, mask=mask, other=0.0).to(tl.float32)
    return ((gate * tl.sigmoid(gate)).to(dtype).to(tl.float32) * up).to(dtype).to(tl.float32)


@triton.jit
def _silu_and_mul_kernel(gate_up_ptr, out_ptr, scale_ptr, intermediate_size, stride_gate_up, stride_out,
                         BLOCK: tl.constexpr, QUANT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    gate_up_ptr += row * stride_gate_up
    out_ptr += row * stride_out
    if QUANT:  # one program per row: its amax first (the product recomputed, not stored), then its e4m3
        amax = 0.0
        for start in range(0, intermediate_size, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            product = _silu_times_up(gate_up_ptr, cols, cols < intermediate_size, intermediate_size)
            amax = tl.maximum(amax, tl.max(tl.abs(product), 0))
        scale = _dynamic_scale(amax)
        for start in range(0, intermediate_size, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            product = _silu_times_up(gate_up_ptr, cols, cols < intermediate_size, intermediate_size)
            _store_e4m3(product, scale, out_ptr + cols, scale_ptr + row, cols < intermediate_size)
    else:
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        product = _silu_times_up(gate_up_ptr, cols, cols < intermediate_size, intermediate_size)
        tl.store(out_ptr + cols, product.to(out_ptr.dtype.element_ty), mask=cols < intermediate_size)


def silu_and_mul(gate_up: torch.Tensor, quantize_for=None) -> torch.Tensor:
    """Triton version of silu_and_mul_reference (same arguments and result); quantize_for as add_rms_norm's."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(1) != 1:
        raise ValueError(f"gate_up must be [num_tokens, 2 * intermediate] with contiguous rows, got "
                         f"{tuple(gate_up.shape)} {gate_up.stride()}")
    num_tokens, intermediate_size = gate_up.shape[0], gate_up.shape[1] // 2
    out, scale = _output_for((num_tokens, intermediate_size), gate_up, quantize_for)
    if num_tokens > 0:
        grid = (num_tokens,) if scale is not None else (num_tokens, triton.cdiv(intermediate_size, SILU_BLOCK))
        _silu_and_mul_kernel[grid](gate_up, out, scale, intermediate_size, gate_up.stride(0), out.stride(0),
                                   BLOCK=SILU_BLOCK, QUANT=scale is not None)
    return out if scale is None else (out, scale)


# ---- fp8 weights (W8A8): e4m3 weights, a scale (amax / FP8_MAX) per output channel; activations e4m3 per token.

class Fp8Linear(nn.Module):
    """A linear weight [out, in] as e4m3 `weight` and fp32 `scale` [out, 1] (weight ~= weight * scale), quantized here
    from a float one; input_scale: a checkpoint's static activation scale [1], or None (each token's own)."""

    def __init__(self, weight: torch.Tensor, static_input_scale: bool = False):
        super().__init__()
        self.weight, self.scale = (nn.Parameter(t, requires_grad=False) for t in quantize_rows_reference(weight))
        self.input_scale = nn.Parameter(torch.zeros(1, device=weight.device), False) if static_input_scale else None


def quantize_rows_reference(x: torch.Tensor, input_scale: torch.Tensor | None = None):
    """x -> (e4m3, fp32 scales [rows, 1]), x ~= e4m3 * scale: each row's amax / FP8_MAX, or a static input_scale [1]."""
    x = x.float()
    scale = input_scale.expand(len(x), 1) if input_scale is not None else (x.abs().amax(1, True) / FP8_MAX).clamp(1e-12)
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


@triton.jit
def _dynamic_scale(amax):
    return tl.maximum(amax / 448.0, 1e-12)  # FP8_MAX; floored: a row of zeros quantizes to zeros, not NaN


@triton.jit
def _store_e4m3(values, scale, out_ptrs, scale_ptr, mask):
    tl.store(out_ptrs, tl.clamp(values / scale, -448.0, 448.0).to(tl.float8e4nv), mask=mask)
    tl.store(scale_ptr, scale)


@triton.jit
def _quantize_rows_kernel(x_ptr, out_ptr, scale_ptr, input_scale_ptr, width, stride_x, BLOCK: tl.constexpr,
                          STATIC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    col = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_x + col, mask=col < width, other=0.0).to(tl.float32)
    scale = tl.load(input_scale_ptr) if STATIC else _dynamic_scale(tl.max(tl.abs(x), 0))
    _store_e4m3(x, scale, out_ptr + row * width + col, scale_ptr + row, col < width)


def quantize_rows(x: torch.Tensor, input_scale: torch.Tensor | None = None):
    """Triton version of quantize_rows_reference (same arguments and result), one program per row: GPUs only."""
    out, scale = torch.empty(x.shape, dtype=FP8, device=x.device), x.new_empty(len(x), 1, dtype=torch.float32)
    if len(x) > 0:
        block = triton.next_power_of_2(x.shape[1])
        _quantize_rows_kernel[(len(x),)](x, out, scale, input_scale, x.shape[1], x.stride(0), BLOCK=block,
                                         STATIC=input_scale is not None, num_warps=max(1, min(16, block // 512)))
    return out, scale


def linear_reference(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) in x's dtype. An Fp8Linear: x rounded to e4m3 per token, the e4m3 products summed in
    fp32 and scaled by both scales, as fp8 tensor cores do (exact products, fp32 sums)."""
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight, bias)
    quantized, scale = quantize_rows_reference(x, weight.input_scale)
    out = (quantized.float() @ weight.weight.float().t()) * scale * weight.scale.t()
    return (out if bias is None else out + bias).to(x.dtype)


_has_fp8_tensor_cores = functools.cache(lambda device: torch.cuda.get_device_capability(device) >= (8, 9))


def _on_fp8_cores(weight, x: torch.Tensor) -> bool:
    """Whether x @ weight.T takes the fast path: an Fp8Linear, a bf16 input, a GPU with fp8 tensor cores."""
    return isinstance(weight, Fp8Linear) and x.dtype == torch.bfloat16 and x.is_cuda and _has_fp8_tensor_cores(x.device)


def _output_for(shape, x: torch.Tensor, quantize_for):
    """A kernel's output: (a buffer of x's dtype, None), or, when its consumer `quantize_for` takes the fast path with
    each token's own scale (a checkpoint's static input_scale is linear's to apply), (e4m3, a scale per row)."""
    if quantize_for is None or not _on_fp8_cores(quantize_for, x) or quantize_for.input_scale is not None:
        return torch.empty(shape, dtype=x.dtype, device=x.device), None
    return (torch.empty(shape, dtype=FP8, device=x.device),
            torch.empty(shape[0], 1, dtype=torch.float32, device=x.device))


@triton.jit
def _fp8_matmul_kernel(x_ptr, weight_ptr, x_scale_ptr, weight_scale_ptr, bias_ptr, out_ptr, num_tokens, out_features,
                       in_features, stride_x, stride_weight, stride_out, HAS_BIAS: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    # out.T = weight @ x.T: the weight's rows fill the tensor cores' long side, the few tokens their short one
    # (a GEMM tiled for large M pads 16 tokens to its 64 or 128 rows; _scaled_mm read the weights at about half the
    # bf16 GEMV's rate there: BENCHMARKS.md).
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    tokens = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    k = tl.arange(0, BLOCK_K)
    weight_ptrs = weight_ptr + rows[:, None].to(tl.int64) * stride_weight + k[None, :]
    x_ptrs = x_ptr + tokens[None, :].to(tl.int64) * stride_x + k[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_T), tl.float32)
    for start in range(0, in_features, BLOCK_K):
        w = tl.load(weight_ptrs + start, mask=(rows[:, None] < out_features) & (k[None, :] + start < in_features),
                    other=0.0)
        x = tl.load(x_ptrs + start, mask=(tokens[None, :] < num_tokens) & (k[:, None] + start < in_features), other=0.0)
        acc += tl.dot(w, x)  # a tile's sum, then added in fp32: the fp8 cores' own accumulator is narrower
    acc *= tl.load(weight_scale_ptr + rows, mask=rows < out_features, other=0.0)[:, None]
    acc *= tl.load(x_scale_ptr + tokens, mask=tokens < num_tokens, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=rows < out_features, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + tokens[None, :].to(tl.int64) * stride_out + rows[:, None], acc.to(out_ptr.dtype.element_ty),
             mask=(rows[:, None] < out_features) & (tokens[None, :] < num_tokens))


FP8_MATMUL_MAX_TOKENS = 64  # above it torch._scaled_mm is as fast (BENCHMARKS.md, H100, Llama-3-8B's linears)


def fp8_matmul(quantized: torch.Tensor, scale: torch.Tensor, weight: Fp8Linear, bias: torch.Tensor | None = None):
    """quantized * scale @ (weight's e4m3 * its scale).T (+ bias), in bf16: linear_reference's numbers from one Triton
    kernel, the fastest up to FP8_MATMUL_MAX_TOKENS rows (tiles of at most 64 tokens: a tile's K slices stay in
    shared memory)."""
    (num_tokens, in_features), out_features = quantized.shape, weight.weight.shape[0]
    out = torch.empty(num_tokens, out_features, dtype=torch.bfloat16, device=quantized.device)
    block_t = min(64, max(16, triton.next_power_of_2(num_tokens)))  # more tokens: more programs
    _fp8_matmul_kernel[(triton.cdiv(out_features, 64), triton.cdiv(num_tokens, block_t))](
        quantized, weight.weight, scale, weight.scale, bias, out, num_tokens, out_features, in_features,
        quantized.stride(0), weight.weight.stride(0), out.stride(0), HAS_BIAS=bias is not None, BLOCK_N=64,
        BLOCK_T=block_t, BLOCK_K=256, num_warps=4, num_stages=4)
    return out


def linear(x, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """linear_reference; an Fp8Linear on the fast path runs on fp8 tensor cores: fp8_matmul for a few tokens,
    torch._scaled_mm (row-wise scales) for more. x may come quantized already: (e4m3, scales) from the kernel that
    made it (add_rms_norm's or silu_and_mul's quantize_for)."""
    if not isinstance(x, tuple) and not _on_fp8_cores(weight, x):
        return linear_reference(x, weight, bias)
    quantized, scale = x if isinstance(x, tuple) else quantize_rows(x, weight.input_scale)
    if len(quantized) <= FP8_MATMUL_MAX_TOKENS or weight.weight.shape[0] % 16 or weight.weight.shape[1] % 16:
        return fp8_matmul(quantized, scale, weight, bias)  # (torch._scaled_mm takes multiples of 16 only)
    return torch._scaled_mm(quantized, weight.weight.t(), scale, weight.scale.t(), bias=bias, out_dtype=torch.bfloat16)


def quantize_fp8(model: "Transformer", static_input_scales: bool = False) -> None:
    """Online fp8 (vLLM's quantization="fp8"): each layer's four linear weights yet in float become Fp8Linears."""
    for layer in model.layers:
        for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            if isinstance(weight := getattr(layer, name), torch.Tensor):
                delattr(layer, name)  # nn.Module lets a parameter's name hold only a parameter
                setattr(layer, name, Fp8Linear(weight, static_input_scales))


@dataclass(frozen=True)
class LayerKernels:
    """A layer's fused Triton kernels, or (the default) their plain-torch references: same signatures."""
    add_rms_norm: Callable = add_rms_norm_reference
    rope_and_write_kv: Callable = attention.rope_and_write_kv_reference
    paged_attention: Callable = attention.paged_attention_reference
    silu_and_mul: Callable = silu_and_mul_reference
    linear: Callable = linear_reference


TRITON_KERNELS = LayerKernels(add_rms_norm, attention.rope_and_write_kv, attention.paged_attention, silu_and_mul,
                              linear)


def _empty(*shape, config: ModelConfig) -> nn.Parameter:
    # Uninitialised, in the target dtype, on the current default device (Transformer.__init__
    # runs under `with device:`): weights are then filled in place, never built twice.
    return nn.Parameter(torch.empty(*shape, dtype=config.dtype), requires_grad=False)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        q_size, kv_size = config.num_q_heads * config.head_dim, config.num_kv_heads * config.head_dim
        self.qkv_sizes = [q_size, kv_size, kv_size]
        self.input_layernorm = _empty(config.hidden_size, config=config)
        self.qkv_proj = _empty(q_size + 2 * kv_size, config.hidden_size, config=config)
        qwen2, qwen3 = config.architecture == "Qwen2ForCausalLM", config.architecture == "Qwen3ForCausalLM"
        self.qkv_bias = _empty(q_size + 2 * kv_size, config=config) if qwen2 else None  # Qwen2's q/k/v bias
        self.q_norm = _empty(config.head_dim, config=config) if qwen3 else None  # Qwen3's per-head q/k RMSNorm
        self.k_norm = _empty(config.head_dim, config=config) if qwen3 else None
        self.o_proj = _empty(config.hidden_size, q_size, config=config)
        self.post_attention_layernorm = _empty(config.hidden_size, config=config)
        self.gate_up_proj = _empty(2 * config.intermediate_size, config.hidden_size, config=config)
        self.down_proj = _empty(config.hidden_size, config.intermediate_size, config=config)
        # fp8 caches hold K / kv_scale[0], V / kv_scale[1]: 1.0, a checkpoint's, or the first batch's (calibrate)
        self.register_buffer("kv_scale", torch.ones(2), persistent=False)
        self.calibrate_kv_scale = False

    def forward(self, hidden, residual, positions, rope_cos, rope_sin, k_cache, v_cache, meta, kernels):
        """hidden: the previous layer's output, not yet added to the residual stream: the add is
        fused into this layer's first norm (the last layer's into the final norm). Updates
        `residual` in place and returns this layer's output."""
        c = self.config
        # Each norm and the activation quantize their output for the next linear when it takes fp8 (x is then a pair)
        x = kernels.add_rms_norm(hidden, residual, self.input_layernorm, c.rms_norm_eps, self.qkv_proj)
        qkv = kernels.linear(x, self.qkv_proj, self.qkv_bias)
        if self.calibrate_kv_scale:  # calculate_kv_scales: amax / FP8_MAX of this first batch's K and V, then frozen
            _, k, v = attention.rotated_qkv(qkv, positions, rope_cos, rope_sin, self.q_norm, self.k_norm,
                                            c.rms_norm_eps, c.num_kv_heads, c.head_dim)
            self.kv_scale.copy_(torch.stack([k.abs().amax(), v.abs().amax()]).float().clamp(min=1e-6) / FP8_MAX)
            self.calibrate_kv_scale = False
        # Qwen3's q/k RMSNorm, RoPE, and this step's K/V into the cache (its keys must be visible to
        # itself); q comes back contiguous for attention.
        q = kernels.rope_and_write_kv(qkv, positions, rope_cos, rope_sin, self.q_norm, self.k_norm,
                                      c.rms_norm_eps, k_cache, v_cache, meta.slot_mapping, self.kv_scale)
        out = kernels.paged_attention(q, k_cache, v_cache, meta, c.head_dim ** -0.5, self.kv_scale)
        x = _all_reduce(kernels.linear(out.reshape(len(positions), -1), self.o_proj), c)
        x = kernels.add_rms_norm(x, residual, self.post_attention_layernorm, c.rms_norm_eps, self.gate_up_proj)
        x = kernels.silu_and_mul(kernels.linear(x, self.gate_up_proj), self.down_proj)
        return _all_reduce(kernels.linear(x, self.down_proj), c)


def _all_reduce(x: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Row-parallel o_proj and down_proj: each rank's partial sum (over its heads, its MLP columns) made whole."""
    if config.tp_size > 1:
        dist.all_reduce(x)
    return x


def _embed(input_ids: torch.Tensor, weight: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Vocab-parallel embedding: each rank looks up the ids of its rows, zeros for the others, then one sum."""
    if config.tp_size == 1:
        return F.embedding(input_ids, weight)
    local = input_ids - config.tp_rank * config.vocab_rows
    hidden = F.embedding(local.clamp(0, weight.shape[0] - 1), weight)
    return _all_reduce(hidden.masked_fill_(((local < 0) | (local >= weight.shape[0]))[:, None], 0), config)


def _gather_vocab(logits: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Vocab-parallel lm_head: every rank's columns of the logits, side by side, without the padding."""
    if config.tp_size == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(config.tp_size)]
    dist.all_gather(parts, logits)
    return torch.cat(parts, dim=1)[:, :config.vocab_size].contiguous()


class Transformer(nn.Module):
    """Parameters are allocated uninitialised on `device`; load_model or random_model fill them."""

    def __init__(self, config: ModelConfig, device):
        super().__init__()
        self.config = config
        with torch.device(device):
            self.embed_tokens = _empty(config.vocab_rows, config.hidden_size, config=config)
            self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
            self.norm = _empty(config.hidden_size, config=config)
            self.lm_head = (self.embed_tokens if config.tie_word_embeddings
                            else _empty(config.vocab_rows, config.hidden_size, config=config))
        cos, sin = rope_tables(config, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.use_triton = torch.device(device).type == "cuda"

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: torch.Tensor,
                meta: AttentionMetadata, logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions [T] int64 (flat batch) -> logits [S, vocab] in the model's dtype, as HF's (an fp32
        copy costs more than the lm_head), for the rows in logits_indices [S] (None: every row). kv_caches:
        [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]; this step's K/V are written at slot_mapping."""
        c = self.config
        if (kv_caches.dim() != 6 or kv_caches.dtype not in (c.dtype, attention.FP8)
                or kv_caches.shape[:2] != (c.num_layers, 2) or kv_caches.shape[4:] != (c.num_kv_heads, c.head_dim)):
            raise ValueError(f"kv_caches: shape {tuple(kv_caches.shape)} {kv_caches.dtype}; expected "
                             f"[{c.num_layers}, 2, num_blocks, block_size, {c.num_kv_heads}, {c.head_dim}] {c.dtype} "
                             "(or float8_e4m3fn)")
        kernels = TRITON_KERNELS if self.use_triton else LayerKernels()
        hidden = _embed(input_ids, self.embed_tokens, c)
        # The residual stream starts at zero and the embedding is the first output added to it, so
        # every layer starts the same way (add + norm), the first one included.
        residual = torch.zeros_like(hidden)
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            hidden = layer(hidden, residual, positions, self.rope_cos, self.rope_sin, k_cache, v_cache, meta, kernels)
        if logits_indices is not None:  # the final norm and lm_head only for rows that sample
            hidden, residual = hidden[logits_indices], residual[logits_indices]
        hidden = kernels.add_rms_norm(hidden, residual, self.norm, c.rms_norm_eps)
        return _gather_vocab(F.linear(hidden, self.lm_head), c)


# ----------------------------------------------------------------------------------- weights

def _checkpoint_targets(model: Transformer) -> dict[str, torch.Tensor]:
    """HF tensor name -> the slice of our (fused) parameter it is copied into; an Fp8Linear's parts also name their
    scales' rows and its input scale."""
    c = model.config
    targets = {"model.embed_tokens.weight": model.embed_tokens, "model.norm.weight": model.norm}
    if not c.tie_word_embeddings:
        targets["lm_head.weight"] = model.lm_head
    for i, layer in enumerate(model.layers):
        attn, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        qkv = [attn + "q_proj", attn + "k_proj", attn + "v_proj"]
        linears = [(qkv, layer.qkv_proj, layer.qkv_sizes), ([attn + "o_proj"], layer.o_proj, c.hidden_size),
                   ([mlp + "gate_proj", mlp + "up_proj"], layer.gate_up_proj, c.intermediate_size),
                   ([mlp + "down_proj"], layer.down_proj, c.hidden_size)]
        for names, weight, sizes in linears:
            if isinstance(weight, torch.Tensor):
                targets.update({name + ".weight": rows for name, rows in zip(names, weight.split(sizes))})
                continue
            for name, rows, scale in zip(names, weight.weight.split(sizes), weight.scale.split(sizes)):
                targets.update({name + ".weight": rows, name + ".weight_scale": scale})
                if weight.input_scale is not None:
                    targets[name + ".input_scale"] = weight.input_scale
        if layer.qkv_bias is not None:
            targets.update({name + ".bias": part for name, part in zip(qkv, layer.qkv_bias.split(layer.qkv_sizes))})
        norms = {"input_layernorm": layer.input_layernorm, "post_attention_layernorm": layer.post_attention_layernorm,
                 "self_attn.q_norm": layer.q_norm, "self_attn.k_norm": layer.k_norm}
        targets.update({f"model.layers.{i}.{name}.weight": norm for name, norm in norms.items() if norm is not None})
        # optional: the fp8 KV scales of llm-compressor checkpoints
        targets.update({attn + "k_scale": layer.kv_scale[:1], attn + "v_scale": layer.kv_scale[1:]})
    return targets


def _safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        if not isinstance(weight_map := _read_json(index).get("weight_map"), dict):
            raise ValueError(f"{index}: expected a \"weight_map\" object (tensor name -> shard file)")
        files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
        if missing := [file for file in files if not os.path.exists(file)]:
            raise FileNotFoundError(f"{missing[0]} not found (named in the weight_map of {index})")
        return files
    if os.path.exists(single := os.path.join(path, "model.safetensors")):
        return [single]
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _shard_of(name: str, c: ModelConfig, shape: tuple) -> tuple[int, int, int, int] | None:
    """Under tensor parallelism, which part of an HF tensor this rank holds: (dim, start, length, the full length),
    Megatron's split: QKV and gate/up by output rows, o_proj and down_proj by input columns, the vocabulary by
    rows; a column-parallel layer's per-channel weight_scale like its rows. None: every rank holds it whole (norms,
    per-tensor scales, a row-parallel layer's per-channel scale: its output rows are whole), as without it."""
    if c.tp_size == 1:
        return None
    q, kv, inter, vocab = c.num_q_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size, c.vocab_rows
    heads, mlp = (c.tp_rank * q, q, q * c.tp_size), (c.tp_rank * inter, inter, inter * c.tp_size)
    kv_heads = (c.tp_rank // c.kv_replicas * kv, kv, kv * c.tp_size // c.kv_replicas)
    rows = (c.tp_rank * vocab, min(vocab, c.vocab_size - c.tp_rank * vocab), c.vocab_size)
    dim, part = {"q_proj": (0, heads), "k_proj": (0, kv_heads), "v_proj": (0, kv_heads), "o_proj": (1, heads),
                 "gate_proj": (0, mlp), "up_proj": (0, mlp), "down_proj": (1, mlp), "embed_tokens": (0, rows),
                 "lm_head": (0, rows)}.get(name.split(".")[-2], (None, None))
    if dim is None or name.endswith("_scale") and (dim == 1 or math.prod(shape) == 1):
        return None
    return dim, *part


def load_tensors(model: Transformer, tensors, source: str) -> set[str]:
    """Copy HF-named tensors (a dict, or (name, tensor) pairs) straight into their places (slices of the fused
    weights); returns the names loaded. `source` names where they come from, for the errors."""
    targets, loaded = _checkpoint_targets(model), set()
    for pair in tensors.items() if isinstance(tensors, Mapping) else tensors:
        if not (isinstance(pair, tuple | list) and len(pair) == 2):
            raise ValueError(f"{source}: expected a dict of tensors or (name, tensor) pairs, got an item {pair!r:.40}")
        name, tensor = pair
        lazy = hasattr(tensor, "get_shape")  # a safetensors slice: only what this rank holds is read from the file
        if not (lazy or isinstance(tensor, torch.Tensor) and tensor.is_floating_point()):  # copy_ would cast ints
            raise ValueError(f"tensor {name!r} in {source}: expected a floating-point torch.Tensor, got "
                             f"{tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__}")
        if name not in targets:  # a tied checkpoint may still carry lm_head; an old one, RoPE's inv_freq buffer
            if name == "lm_head.weight" or name.endswith("rotary_emb.inv_freq"):
                continue
            raise ValueError(f"unexpected tensor {name!r} in {source} for {model.config.architecture}")
        target, index = targets[name], ...
        expected, shape = tuple(target.shape), tuple(tensor.get_shape() if lazy else tensor.shape)
        if shard := _shard_of(name, model.config, shape):  # this rank's rows (or columns) of the HF tensor
            dim, start, length, full = shard
            target, index = target.narrow(dim, 0, length), (slice(None),) * dim + (slice(start, start + length),)
            expected = expected[:dim] + (full,) + expected[dim + 1:]
        if shape != expected and not (name.endswith("_scale") and math.prod(shape) in (1, math.prod(expected))):
            raise ValueError(f"tensor {name!r} in {source}: shape {shape}, expected {expected} from config.json")
        tensor = tensor[index]
        if not tensor.is_floating_point():
            raise ValueError(f"tensor {name!r} in {source}: expected a floating-point torch.Tensor, got {tensor.dtype}")
        if tensor.dtype.itemsize == 1 and (tensor.dtype, target.dtype) != (FP8, FP8):
            raise ValueError(f"tensor {name!r} in {source}: {tensor.dtype} fits only fp8 checkpoints' linear weights")
        if name.endswith("_scale") and not (torch.isfinite(tensor).all() and (tensor > 0).all()):
            raise ValueError(f"tensor {name!r} in {source}: a scale must be finite and > 0, got {tensor}")
        with torch.no_grad():
            if target.dtype == FP8 and tensor.dtype != FP8:  # quantized per row: slice by slice is exact
                tensor, targets[name + "_scale"][:] = quantize_rows_reference(tensor.to(target.device))
            if name.endswith("input_scale"):  # q/k/v (gate/up) read one input: the largest of their scales, as vLLM
                tensor = torch.maximum(target, tensor.reshape(1).to(target.device))
            target.copy_(tensor.reshape(-1, 1) if name.endswith("weight_scale") else tensor.reshape(target.shape))
        loaded.add(name)
    return loaded


def _read_safetensors(file: str):
    """A file's (name, tensor) pairs; host memory holds one tensor at a time."""
    try:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_slice(name)
    except (SafetensorError, OSError) as e:  # e.g. a truncated download; safetensors names no file
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from e


def load_model(path: str, dtype=None, device=None, rank: int = 0, size: int = 1) -> Transformer:
    """An HF checkpoint directory -> Transformer on `device` in `dtype` (see resolve_device_and_dtype); with
    tensor parallelism, rank `rank`'s shard of `size` (shard_config), reading only its part of each tensor."""
    device, dtype = resolve_device_and_dtype(device, dtype)
    model = Transformer(replace(shard_config(read_config(path), rank, size), dtype=dtype), device)
    if model.config.quantization == "fp8":  # the checkpoint's e4m3 weights and scales load into Fp8Linears
        quantize_fp8(model, model.config.static_input_scales)
    files = _safetensors_files(path)  # they must hold every weight; the fp8 KV scales are optional
    loaded = set().union(*(load_tensors(model, _read_safetensors(file), file) for file in files))
    if missing := sorted(n for n in {*_checkpoint_targets(model)} - loaded if not n.endswith(("k_scale", "v_scale"))):
        raise ValueError(f"missing tensor(s) {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} "
                         f"in {', '.join(files)}")
    return model


@torch.no_grad()
def random_model(name: str | ModelConfig, dtype=None, device=None, seed: int = 0, rank: int = 0, size: int = 1
                 ) -> Transformer:
    """A named shape (or a ModelConfig) with random weights drawn on the device: std 1/sqrt(fan_in),
    and 1/sqrt(2 * num_layers) more for the two projections writing into the residual stream, whose
    variance so stays O(1) at any depth (GPT-2's scaling); a tied lm_head then gives O(1) logits."""
    if isinstance(name, str) and name not in SHAPES:
        raise ValueError(f"model shape {name!r} is unknown; known: {', '.join(SHAPES)}")
    config = shard_config(SHAPES[name] if isinstance(name, str) else name, rank, size)  # (each rank draws its own)
    device, dtype = resolve_device_and_dtype(device, dtype)
    model = Transformer(replace(config, dtype=dtype), device)
    generator = torch.Generator(device).manual_seed(seed)
    residual_scale = 1 / math.sqrt(2 * config.num_layers)
    for parameter_name, parameter in model.named_parameters():
        if parameter.dim() == 1:  # norms = 1, biases = 0
            parameter.fill_(0.0 if parameter_name.endswith("bias") else 1.0)
            continue
        scale = residual_scale if parameter_name.endswith(("o_proj", "down_proj")) else 1
        parameter.normal_(0.0, 1 / math.sqrt(parameter.shape[1]) * scale, generator=generator)
    return model


# ----------------------------------------------------------------------------------- tokenizer

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE writes each byte as a printable character: printable Latin-1 bytes
    stand for themselves, the other 68 bytes become chr(256 + n) in byte order. char -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


class TokenStream:
    """Incremental detokenization: push ids one by one, get the text that is now final. A token
    ending inside a UTF-8 character yields "" until the character completes; the pieces
    concatenated (plus finish()) equal tokenizer.decode(all ids)."""

    def __init__(self, tokenizer: "Tokenizer", skip_special_tokens: bool):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """An id with no bytes (a padded embedding row, a hole in the vocabulary) has no text: generation
        may sample one, and one request's odd token must not fail the step for the others."""
        if self.skip_special_tokens and token_id in self.tokenizer.special_token_ids:
            return ""
        try:
            return self._utf8.decode(self.tokenizer.token_bytes(token_id))
        except ValueError:
            return ""

    def finish(self) -> str:
        """Bytes of a character that never completed, as U+FFFD (as decode() would show them)."""
        return self._utf8.decode(b"", final=True)

    def restart(self) -> "TokenStream":
        return TokenStream(self.tokenizer, self.skip_special_tokens)


class Tokenizer:
    """A tiktoken.Encoding plus what generation needs: BOS/EOS ids and whether prompts start with BOS.
    Every added token written in the text is recognised, as HF does; skip_special_tokens drops only
    special_token_ids (default: all of them; HF's added tokens marked special, e.g. not Qwen3's <think>)."""

    def __init__(self, encoding: tiktoken.Encoding, bos_token_id: int | None, eos_token_ids: list[int],
                 add_bos_token: bool = False, nfc_normalize: bool = False, special_token_ids: set[int] | None = None,
                 chat_template: str | None = None, template_tokens: dict[str, str] | None = None):
        if add_bos_token and bos_token_id is None:
            raise ValueError("tokenizer: add_bos_token is set but there is no bos_token_id")
        self.encoding, self.bos_token_id, self.eos_token_ids = encoding, bos_token_id, eos_token_ids
        self.add_bos_token, self.vocab_size, self.chat_template = add_bos_token, encoding.n_vocab, chat_template
        self.nfc_normalize = nfc_normalize  # Qwen2/3's tokenizer.json normalizes text to NFC first
        self.special_token_ids = special_token_ids if special_token_ids is not None else {
            encoding.encode_single_token(t) for t in encoding.special_tokens_set}
        self.template_tokens = template_tokens or {}  # bos_token, eos_token, ... as the template sees them

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> ids; with add_special_tokens, BOS first when the tokenizer asks for it (like HF)."""
        if self.nfc_normalize:
            text = unicodedata.normalize("NFC", text)
        ids = self.encoding.encode(text, allowed_special="all")
        return [self.bos_token_id] + ids if add_special_tokens and self.add_bos_token else ids

    def token_bytes(self, token_id: int) -> bytes:
        try:
            return self.encoding.decode_single_token_bytes(token_id)
        except (KeyError, OverflowError):
            raise ValueError(f"token id {token_id} is not in the vocabulary (size {self.vocab_size})") from None

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_token_ids]
        try:
            data = self.encoding.decode_bytes(ids)
        except (KeyError, OverflowError):  # find the culprit, for the message
            data = b"".join(self.token_bytes(i) for i in ids)
        return data.decode("utf-8", errors="replace")

    def stream(self, skip_special_tokens: bool = False) -> TokenStream:
        return TokenStream(self, skip_special_tokens)

    def apply_chat_template(self, conversation: list[dict], add_generation_prompt: bool = True,
                            chat_template: str | None = None, tools: list[dict] | None = None,
                            continue_final_message: bool = False, **kwargs) -> str:
        """HF apply_chat_template(..., tokenize=False) on one conversation: the checkpoint's jinja2 template in HF's
        environment (sandboxed, trim_blocks, lstrip_blocks, loop controls, tojson, raise_exception, {% generation %})
        sees the messages (keys set to None dropped, reasoning under HF's names), tools, add_generation_prompt, the
        special tokens and kwargs (chat_template_kwargs, e.g. enable_thinking=False). OpenAI content parts become
        their text parts joined by newlines, as vLLM passes them to a template. continue_final_message: the prompt
        ends inside the last message, for the model to go on with it (HF's way: render a tag after it, cut there)."""
        if (template := chat_template or self.chat_template) is None:
            raise ValueError("chat: the checkpoint has no chat template (tokenizer_config.json's chat_template or "
                             "chat_template.jinja); pass chat_template=")
        if continue_final_message and add_generation_prompt:
            raise ValueError("chat: continue_final_message and add_generation_prompt exclude each other")
        if tools is not None and not (isinstance(tools, list) and all(isinstance(tool, dict) for tool in tools)):
            raise ValueError(f"chat: tools must be a list of dicts (JSON schemas), got {str(tools)[:40]}")
        if not isinstance(conversation, (list, tuple)) or not conversation:
            raise ValueError(f"chat: a conversation is a non-empty list of messages, got {str(conversation)[:40]}")
        messages = [_template_message(message) for message in conversation]
        if continue_final_message:
            if not isinstance(final := messages[-1].get("content"), str):
                raise ValueError("chat: continue_final_message needs a last message with text content")
            messages[-1]["content"] = final + _CONTINUE_TAG
        try:
            text = _compile_chat_template(template).render({**self.template_tokens, **kwargs, "messages": messages,
                                                            "tools": tools, "documents": None,
                                                            "add_generation_prompt": add_generation_prompt})
        except (TemplateError, TypeError) as e:  # TypeError: e.g. '+' on a message field that is not a string
            raise ValueError(f"chat: the chat template rejected the conversation: {e}") from e
        if continue_final_message:
            if final.strip() not in text or _CONTINUE_TAG.strip() not in text:
                raise ValueError("chat: continue_final_message: the template does not write the last message's text")
            at = text.rindex(_CONTINUE_TAG.strip())  # a template that strips the message also strips the tag's space
            text = text[:at] if text.startswith(_CONTINUE_TAG, at) else text[:at].rstrip()
        return text


_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # HF's


def _template_message(message) -> dict:
    """A message as the template sees it (a copy): None-valued keys dropped and reasoning under all three names
    (as HF does); OpenAI content parts joined into one string (as vLLM does; other part types are refused)."""
    if not isinstance(message, dict):
        raise ValueError(f"chat: each message must be a dict like {{'role': 'user', 'content': ...}}, got "
                         f"{type(message).__name__} {str(message)[:40]}")
    message = {key: value for key, value in message.items() if value is not None}
    if (reasoning := next((message[k] for k in ("reasoning_content", "thinking", "reasoning") if k in message),
                          None)) is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    if isinstance(parts := message.get("content"), list):
        for part in parts:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"chat: content part type {kind!r} is not supported; supported: 'text' "
                                 "({'type': 'text', 'text': '...'})")
        message["content"] = "\n".join(part["text"] for part in parts)
    return message


class _GenerationTag(Extension):
    """HF's {% generation %}...{% endgeneration %} marks the assistant's text for training masks: render its body
    (in a scope of its own, as HF's call block; a {% continue %} inside it works, where HF's fails to compile)."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        return nodes.Scope(parser.parse_statements(("name:endgeneration",), drop_needle=True), lineno=lineno)


@functools.lru_cache(maxsize=16)  # a server renders every chat request with the same template
def _compile_chat_template(template: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationTag])
    env.filters["tojson"] = lambda value, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=_raise_template_error, strftime_now=lambda f: datetime.now().strftime(f))
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise ValueError(f"chat: the chat template does not compile: {e}") from e


def _raise_template_error(message: str):
    raise TemplateError(message)


def _chat_template(path: str, config: dict) -> tuple[str | None, dict[str, str]]:
    """The chat template (chat_template.jinja, else tokenizer_config.json's: a string, or named ones
    of which "default") and the special tokens it may print, from tokenizer_config.json, which names each as a
    string or as {"content": ...}."""
    template, file = config.get("chat_template"), os.path.join(path, "chat_template.jinja")
    if os.path.exists(file):
        with open(file, encoding="utf-8") as f:
            template = f.read()
    elif isinstance(template, list):
        template = next((entry["template"] for entry in template if entry.get("name") == "default"), None)
    tokens = {name: value.get("content") if isinstance(value, dict) else value
              for name in ("bos_token", "eos_token", "unk_token", "pad_token") if (value := config.get(name))}
    return template, tokens


def _pre_tokenizer_pattern(pre_tokenizer: dict | None) -> str:
    """The one regex tiktoken splits with: a Split's regex followed by a ByteLevel without its own
    regex (Llama 3, Qwen2/3, Mistral-Nemo), or ByteLevel alone with GPT-2's regex."""
    steps = [] if pre_tokenizer is None else pre_tokenizer.get("pretokenizers", [pre_tokenizer])
    kinds = [step["type"] for step in steps]
    if "ByteLevel" not in kinds:
        raise ValueError(f"tokenizer.json: BPE without a ByteLevel pre-tokenizer (pre-tokenizer {kinds or 'none'}; "
                         "SentencePiece-style, e.g. Llama 2 / Mistral 7B) is not supported; supported: byte-level BPE")
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        byte_level, pattern = steps[0], GPT2_PATTERN
    elif kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        split, byte_level = steps
        if split.get("behavior") != "Isolated" or split.get("invert"):
            raise ValueError(f"tokenizer.json: Split behavior {split.get('behavior')!r} invert={split.get('invert')}"
                             " is not supported; supported: Isolated, invert=false")
        pattern = split["pattern"].get("Regex") or re.escape(split["pattern"]["String"])
    else:
        raise ValueError(f"tokenizer.json: pre-tokenizer {kinds} is not supported; supported: ByteLevel "
                         "(GPT-2 regex), or Split then ByteLevel(use_regex=false) (Llama 3, Qwen2/3, Mistral-Nemo)")
    if byte_level.get("add_prefix_space"):
        raise ValueError("tokenizer.json: ByteLevel add_prefix_space=true is not supported")
    return pattern


def _template_adds_bos(post_processor: dict | None, bos_token: str | None) -> bool:
    """Whether the post-processor's template for one sequence starts with BOS (Llama 3 does)."""
    steps = [] if post_processor is None else post_processor.get("processors", [post_processor])
    return any(step.get("type") == "TemplateProcessing" and step.get("single")
               and step["single"][0].get("SpecialToken", {}).get("id") == bos_token for step in steps)


TOKENIZER_RULES = {
    "model": _rule((dict,), "an object", null=False), "pre_tokenizer": _OBJECT, "normalizer": _OBJECT,
    "post_processor": _OBJECT, "added_tokens": (lambda v: v is None or type(v) is list and all(
        type(t) is dict and type(t.get("content")) is str and type(t.get("id")) is int for t in v),
        'a list of {"content": text, "id": int}')}
BPE_RULES = {"vocab": (lambda v: type(v) is dict and all(type(i) is int and i >= 0 for i in v.values()),
                       "an object of token -> id (an int >= 0)"), "merges": _LIST, "ignore_merges": _FLAG}


def _check_tiktoken_agrees(vocab: dict[str, int], added_ids: set[int], merges: list, ignore_merges: bool) -> None:
    """ValueError unless tiktoken with ids as ranks (it merges the adjacent pair whose concatenation has the lowest
    id) encodes every text as HF's BPE (it merges the pair listed first among the merges).

    Why this suffices. In both, each part is a token that its own text, encoded alone, ends as (the merges inside a
    part are those of its text alone): per token, one merge only is ever applied, the last of that encoding, its
    split. If shorter tokens split alike in both, a token's text goes through the same parts in both down to two,
    which tiktoken merges and HF only if listed: so by induction on length, all split alike if each token tiktoken
    builds has its split among the merges (found below, from lower ids, as training builds it). Merge results in id
    order then make both apply the same merges in the same order. tiktoken keeps a piece that is a token whole, as
    HF does only with ignore_merges: without it, every token must be built."""
    lefts, rights, built, previous = {}, {}, {}, -1  # a token's split (ids of its parts); (left, right) -> token
    for n, merge in enumerate(merges):
        try:
            left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
            token, l, r = vocab.get(left + right), vocab.get(left), vocab.get(right)
        except (TypeError, ValueError):
            raise ValueError(f"tokenizer.json: merge {n} {merge!r:.40}: not 'left right' or [left, right]") from None
        if None in (token, l, r) or token < previous:
            raise ValueError(f"tokenizer.json: merge {n} ({left!r}, {right!r}) " + (
                "joins or gives no vocab token" if None in (token, l, r) else f"gives id {token} out of merge order"))
        previous = token
        if token in lefts or not (l < token > r and (l in lefts or len(left) == 1) and (r in lefts or len(right) == 1)):
            continue
        # Does tiktoken's BPE of the text end at [l, r]? Undo their splits at the boundary, the later (higher id)
        # first: ids grow up a split tree, so BPE merges in id order. A pair across the boundary built before one of
        # its parts was merged away (ties: the leftmost first) would have been merged instead.
        x, y, limit = l, r, token
        while built.get((x, y), limit) >= limit:
            if x in rights and (y not in lefts or x > y):
                limit, x = x, rights[x]
            elif y in lefts:
                limit, y = y + 1, lefts[y]
            else:
                lefts[token], rights[token], built[l, r] = l, r, token
                break
    for text, token in vocab.items():
        if len(text) > 1 and token not in lefts and token not in added_ids:
            if len(parts := _bpe_parts(text, vocab)) == 2 or not ignore_merges:
                raise ValueError(f"tokenizer.json: token {text!r} (id {token}): " + (
                    f"tiktoken builds it from {parts[0]!r} + {parts[1]!r}, which the merges do not (or from higher "
                    "ids)" if len(parts) == 2 else "the merges never build it, but tiktoken encodes its text as it "
                    "(as HF does only with ignore_merges)") + ": tiktoken and HF would encode some texts differently")


def _bpe_parts(text: str, ranks: dict[str, int]) -> list[str]:
    """tiktoken's BPE of a token's text, stopped before it merges the last two parts into the token itself."""
    parts = list(text)
    while len(parts) > 2:
        rank, i = min((ranks.get(a + b, math.inf), i) for i, (a, b) in enumerate(zip(parts, parts[1:])))
        if rank == math.inf:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def load_tokenizer(path: str) -> Tokenizer:
    """A checkpoint directory's tokenizer.json (every HF Llama 3, Qwen2/3 and Mistral-Nemo repo has
    one; Meta's original/tokenizer.model is not read), of the byte-level BPE kind, as a tiktoken.Encoding."""
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        raise FileNotFoundError(f"{path}: no tokenizer.json")
    spec = _read_json(os.path.join(path, "tokenizer.json"))
    _check_fields("tokenizer.json: ", spec, TOKENIZER_RULES)
    model = spec["model"]
    kind = model.get("type", "BPE" if "merges" in model else "(unknown)")
    if kind != "BPE":
        raise ValueError(f"tokenizer.json: model type {kind!r} is not supported; supported: byte-level BPE")
    _check_fields("tokenizer.json: model.", model, BPE_RULES)
    pattern = _pre_tokenizer_pattern(spec.get("pre_tokenizer"))
    normalizer = (spec.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):
        raise ValueError(f"tokenizer.json: normalizer {normalizer!r} is not supported; supported: none, NFC")
    vocab, alphabet = model["vocab"], _byte_level_alphabet()
    added = {token["content"]: token["id"] for token in spec.get("added_tokens") or []}
    added_ids = set(added.values())
    byte_level = {token: i for token, i in vocab.items() if i not in added_ids}
    if unknown := [token for token in byte_level if not set(token) <= alphabet.keys()]:
        raise ValueError(f"tokenizer.json: vocab token {unknown[0]!r} is not in the byte-level alphabet")
    ranks = {bytes(alphabet[char] for char in token): i for token, i in byte_level.items()}
    if not all(bytes([b]) in ranks for b in range(256)):
        raise ValueError("tokenizer.json: the vocab lacks some of the 256 single-byte tokens")
    _check_tiktoken_agrees(vocab, added_ids, model.get("merges") or [], model.get("ignore_merges"))
    encoding = tiktoken.Encoding(os.path.basename(os.path.abspath(path)), pat_str=pattern,
                                 mergeable_ranks=ranks, special_tokens=added)
    # BOS and EOS ids named in tokenizer_config.json (the engine adds the model's: Llama 3 Instruct's <|eot_id|>).
    config, named = _read_json(os.path.join(path, "tokenizer_config.json")), {**vocab, **added}
    template, template_tokens = _chat_template(path, config)
    bos, eos = named.get(template_tokens.get("bos_token")), named.get(template_tokens.get("eos_token"))
    add_bos = (_template_adds_bos(spec.get("post_processor"), template_tokens.get("bos_token"))
               or bool(config.get("add_bos_token")))
    special_ids = {token["id"] for token in spec.get("added_tokens") or [] if token.get("special", True)}
    return Tokenizer(encoding, bos, [] if eos is None else [eos], add_bos and bos is not None, normalizer == "NFC",
                     special_ids, template, template_tokens)

