"""What a model costs, from its config.json alone: parameters, weight bytes, KV-cache bytes per token, longest context.

Parameters are counted from the architecture (every matrix, bias, norm and embedding), split by how vLLM places
them on tensor-parallel GPUs: decoder matmuls are sharded and are what AWQ/GPTQ/FP8 quantize; embeddings and the LM
head are vocab-parallel (sharded, not quantized); norms, row-parallel biases and learned position embeddings are
replicated on every GPU. The KV cache stores a key and a value vector per layer, per KV head, per token.

`load_model_facts(name_or_path)` reads a local directory's config.json, else the Hugging Face cache (offline), else
the architecture facts shipped for the user's models under harness/data/models/.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness.errors import UserError

MODELS_DIR = Path(__file__).resolve().parents[1] / "data" / "models"

# vLLM pads the vocabulary of VocabParallelEmbedding / ParallelLMHead to a multiple of 64
# (DEFAULT_VOCAB_PADDING_SIZE in vllm/model_executor/layers/vocab_parallel_embedding.py).
VOCAB_PADDING = 64

DTYPE_BYTES: dict[str, float] = {
    "float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1,
    "fp8_inc": 1, "int8": 1,
}

# vLLM's `possible_keys` for the model's longest context (vllm/transformers_utils/model_arch_config_convertor.py):
# the smallest of these that the config sets wins.
MAX_LEN_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
                "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len")
# RoPE types whose max_position_embeddings is already the scaled length, so vLLM does not multiply by `factor`
# (vllm/config/model.py, _get_and_verify_max_len).
ROPE_TYPES_PRESCALED = ("su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling")

LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3"}
GPT2_LIKE = {"gpt2"}


@dataclass(frozen=True)
class QuantConfig:
    """A checkpoint's own quantization (config.json `quantization_config`)."""

    method: str  # vLLM's name: "awq", "gptq", "fp8", "compressed-tensors", ...
    bits: int | None = None  # weight bits
    group_size: int | None = None  # weights per scale (AWQ/GPTQ); None or -1: per channel


@dataclass(frozen=True)
class ModelFacts:
    """Architecture facts of one model: enough to compute memory and bandwidth without loading it."""

    name: str  # what the user called it (hub name or path)
    source: str  # where the config came from: a path, "hf-cache:<path>" or "shipped:<file>"
    architecture: str  # config.architectures[0]
    model_type: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    max_context: int  # the longest max_model_len vLLM accepts (scaling applied, smallest key)
    max_context_key: str
    rope_scaling_factor: float
    sliding_window: int | None
    config_dtype: str  # torch dtype of the checkpoint ("float32" when the config names none, as vLLM assumes)
    tie_word_embeddings: bool
    quant: QuantConfig | None
    params_linear: int  # decoder matmul weights: TP-sharded, quantizable
    params_vocab: int  # token embedding + LM head (once when tied): vocab-parallel, never quantized
    params_sharded_other: int  # column-parallel biases: TP-sharded, not quantized
    params_replicated: int  # norms, row-parallel biases, learned position embeddings: on every GPU
    exact: bool = True  # False: architecture not modelled exactly (llama-like formula used)

    # ------------------------------------------------------------------------------------------ counts

    @property
    def params_total(self) -> int:
        return self.params_linear + self.params_vocab + self.params_sharded_other + self.params_replicated

    def dtype_for(self, dtype: str | None = "auto") -> str:
        """The dtype vLLM runs in for `--dtype` (auto: the checkpoint's, with float32 downcast to bfloat16)."""
        d = (dtype or "auto").lower()
        if d == "auto":
            return "bfloat16" if self.config_dtype == "float32" else self.config_dtype
        return {"half": "float16", "float": "float32"}.get(d, d)

    def weight_bytes(self, dtype: str = "auto", quantization: str | None = None, tp: int = 1) -> float:
        """Bytes of weights on one of `tp` GPUs, as loaded by vLLM in `dtype` with `quantization` (None: checkpoint's)."""
        act = DTYPE_BYTES[self.dtype_for(dtype)]
        linear_bytes = self.params_linear * linear_bytes_per_param(self.effective_quant(quantization), act)
        padded_vocab = math.ceil(self.vocab_size / VOCAB_PADDING) * VOCAB_PADDING
        vocab_params = self.params_vocab * padded_vocab / self.vocab_size
        sharded = linear_bytes + (vocab_params + self.params_sharded_other) * act
        return sharded / tp + self.params_replicated * act

    def effective_quant(self, quantization: str | None) -> QuantConfig | None:
        """The quantization vLLM applies: the setting if given (fp8 online on a bf16 checkpoint), else the checkpoint's."""
        if quantization in (None, "", "none", "None"):
            return self.quant
        q = str(quantization).lower()
        if self.quant is not None and _same_family(self.quant.method, q):
            return self.quant
        return QuantConfig(method=q, bits=_default_bits(q))

    def kv_heads_per_shard(self, tp: int = 1) -> int:
        """KV heads on one GPU: split across TP, replicated when TP exceeds them (vLLM's get_num_kv_heads)."""
        return max(1, self.num_kv_heads // tp)

    def kv_bytes_per_token(self, tp: int = 1, cache_dtype_bytes: float = 2) -> int:
        """KV-cache bytes one token takes on one GPU: 2 (K and V) x layers x KV heads per shard x head size x bytes."""
        return int(2 * self.num_layers * self.kv_heads_per_shard(tp) * self.head_dim * cache_dtype_bytes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["params_total"] = self.params_total
        return d


# ---------------------------------------------------------------------------------------------- quantization

# Methods that quantize a bf16/fp16 checkpoint while loading it (no quantized checkpoint needed).
ONLINE_METHODS = {"fp8", "fp8_per_tensor", "fp8_per_block", "fp8_per_channel", "int8_per_channel_weight_only",
                  "mxfp8", "nvfp4_per_token", "online", "bitsandbytes", "experts_int8", "torchao"}
# Methods that need a checkpoint quantized that way (vLLM reads the scales and packed weights from it).
CHECKPOINT_METHODS = {"awq", "auto_awq", "awq_marlin", "gptq", "auto_gptq", "gptq_marlin", "compressed-tensors",
                      "modelopt", "modelopt_fp4", "modelopt_mxfp8", "modelopt_mixed", "quark", "moe_wna16",
                      "mxfp4", "gpt_oss_mxfp4", "fbgemm_fp8", "fp_quant", "squeezellm", "marlin", "aqlm", "hqq",
                      "gguf", "exl2", "humming", "inc", "deepseek_v4_fp8"}
# A checkpoint of the first family may be served with any method of the same family (vLLM upgrades awq to
# awq_marlin, gptq to gptq_marlin on capable GPUs and accepts the explicit upgrade).
_FAMILIES = ({"awq", "auto_awq", "awq_marlin"}, {"gptq", "auto_gptq", "gptq_marlin"},
             {"fp8", "fp8_per_tensor", "fp8_per_channel", "fp8_per_block"})


def _same_family(a: str, b: str) -> bool:
    a, b = a.lower(), b.lower()
    return a == b or any(a in fam and b in fam for fam in _FAMILIES)


def quant_family(method: str) -> str:
    m = method.lower()
    if m in {"awq", "auto_awq", "awq_marlin"}:
        return "awq"
    if m in {"gptq", "auto_gptq", "gptq_marlin"}:
        return "gptq"
    if m.startswith("fp8") or m in {"fbgemm_fp8", "modelopt", "deepseek_v4_fp8"}:
        return "fp8"
    return m


def _default_bits(method: str) -> int | None:
    fam = quant_family(method)
    if fam in ("awq", "gptq"):
        return 4
    if fam == "fp8" or method in ("int8_per_channel_weight_only", "experts_int8", "mxfp8"):
        return 8
    if method in ("mxfp4", "gpt_oss_mxfp4", "modelopt_fp4", "nvfp4_per_token", "bitsandbytes"):
        return 4
    return None


def linear_bytes_per_param(quant: QuantConfig | None, act_bytes: float) -> float:
    """Bytes per decoder-matmul weight: packed bits plus per-group fp16 scale and packed zero point."""
    if quant is None or quant.bits is None:
        return act_bytes
    bits = quant.bits
    per = bits / 8
    g = quant.group_size
    if quant_family(quant.method) in ("awq", "gptq") and g and g > 0:
        per += (2 + bits / 8) / g  # fp16 scale + packed zero per group of g weights
    return per


def parse_quant(cfg: dict[str, Any]) -> QuantConfig | None:
    q = cfg.get("quantization_config")
    if not isinstance(q, dict):
        return None
    method = str(q.get("quant_method") or q.get("quant_type") or "").lower()
    if not method:
        return None
    bits = q.get("bits") or q.get("w_bit")
    group = q.get("group_size") or q.get("q_group_size")
    if method == "compressed-tensors":
        for grp in (q.get("config_groups") or {}).values():
            w = (grp or {}).get("weights") or {}
            bits = bits or w.get("num_bits")
            group = group or w.get("group_size")
    if method == "fp8" and bits is None:
        bits = 8
    if method == "bitsandbytes":
        bits = 4 if q.get("load_in_4bit") else 8 if q.get("load_in_8bit") else bits
    return QuantConfig(method=method, bits=int(bits) if bits else _default_bits(method),
                       group_size=int(group) if group else None)


# ---------------------------------------------------------------------------------------------- config parsing


def facts_from_config(cfg: dict[str, Any], name: str, source: str) -> ModelFacts:
    """HF config.json (as a dict) -> ModelFacts. UserError when the config lacks what the planner needs."""
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else None
    if text:  # multimodal wrappers keep the language model's shape here
        merged = dict(cfg)
        merged.update(text)
        cfg = merged
    archs = cfg.get("architectures") or []
    arch = str(archs[0]) if archs else str(cfg.get("model_type", "unknown"))
    model_type = str(cfg.get("model_type", "")).lower()

    def need(*keys: str) -> int:
        for k in keys:
            if cfg.get(k) is not None:
                return int(cfg[k])
        raise UserError(f"config.json has none of {', '.join(keys)}; cannot plan {arch}", source=source)

    if model_type in GPT2_LIKE:
        layers = need("n_layer", "num_hidden_layers")
        hidden = need("n_embd", "hidden_size")
        heads = need("n_head", "num_attention_heads")
        kv_heads = heads
        inter = int(cfg.get("n_inner") or 4 * hidden)
    else:
        layers = need("num_hidden_layers", "n_layer", "num_layers")
        hidden = need("hidden_size", "n_embd", "d_model")
        heads = need("num_attention_heads", "n_head")
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        inter = need("intermediate_size", "ffn_dim", "n_inner")
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    vocab = need("vocab_size")

    max_pos, max_key = _max_context_raw(cfg)
    factor = _rope_factor(cfg)
    max_context = int(max_pos * factor)
    sliding = cfg.get("sliding_window")
    if cfg.get("use_sliding_window") is False:  # Qwen2 sets a window but switches it off
        sliding = None
    sliding = int(sliding) if isinstance(sliding, (int, float)) and sliding and sliding < max_context else None

    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32").replace("torch.", "")
    if dtype not in DTYPE_BYTES:
        raise UserError(f"unsupported torch_dtype {dtype!r}", source=source, key="torch_dtype")
    tied = bool(cfg.get("tie_word_embeddings", model_type in GPT2_LIKE))
    quant = parse_quant(cfg)

    exact = model_type in LLAMA_LIKE or model_type in GPT2_LIKE
    if model_type in GPT2_LIKE:
        lin = layers * (hidden * 3 * hidden + hidden * hidden + hidden * inter + inter * hidden)
        col_bias = layers * (3 * hidden + inter)  # c_attn and c_fc biases are column-parallel
        n_pos = int(cfg.get("n_positions") or max_pos)
        repl = layers * (2 * 2 * hidden + hidden + hidden) + 2 * hidden + n_pos * hidden  # LNs, row biases, ln_f, wpe
        vocab_params = vocab * hidden * (1 if tied else 2)
    else:
        q_out, kv_out = heads * head_dim, kv_heads * head_dim
        attn = hidden * q_out + 2 * hidden * kv_out + q_out * hidden
        mlp = 3 * hidden * inter
        lin = layers * (attn + mlp)
        qkv_bias = model_type == "qwen2" or bool(cfg.get("attention_bias"))
        col_bias = layers * ((q_out + 2 * kv_out) if qkv_bias else 0)
        if cfg.get("mlp_bias"):
            col_bias += layers * 2 * inter
        repl = layers * 2 * hidden + hidden  # input/post-attention RMSNorm per layer, final norm
        if cfg.get("attention_bias") and model_type != "qwen2":
            repl += layers * hidden  # o_proj bias (row-parallel)
        if cfg.get("mlp_bias"):
            repl += layers * hidden  # down_proj bias
        if model_type == "qwen3":
            repl += layers * 2 * head_dim  # q_norm, k_norm
        vocab_params = vocab * hidden * (1 if tied else 2)

    return ModelFacts(
        name=name, source=source, architecture=arch, model_type=model_type, num_layers=layers, hidden_size=hidden,
        num_attention_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, intermediate_size=inter,
        vocab_size=vocab, max_position_embeddings=max_pos, max_context=max_context, max_context_key=max_key,
        rope_scaling_factor=factor, sliding_window=sliding, config_dtype=dtype, tie_word_embeddings=tied,
        quant=quant, params_linear=lin, params_vocab=vocab_params, params_sharded_other=col_bias,
        params_replicated=repl, exact=exact,
    )


def _max_context_raw(cfg: dict[str, Any]) -> tuple[int, str]:
    best: tuple[int, str] | None = None
    for key in MAX_LEN_KEYS:
        v = cfg.get(key)
        if isinstance(v, (int, float)) and v > 0 and (best is None or v < best[0]):
            best = (int(v), key)
    if best is None:
        raise UserError("config.json names no context length (max_position_embeddings or n_positions)")
    return best


def _rope_factor(cfg: dict[str, Any]) -> float:
    """vLLM multiplies the context by the RoPE `factor` except for types whose length is already scaled."""
    params = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not isinstance(params, dict):
        return 1.0
    entries = [params] if ("rope_type" in params or "type" in params or "factor" in params) else [
        v for v in params.values() if isinstance(v, dict)]
    factor = 1.0
    for rp in entries:
        rope_type = str(rp.get("rope_type") or rp.get("type") or "default")
        if rope_type not in ROPE_TYPES_PRESCALED and rp.get("factor") is not None:
            factor = float(rp["factor"])
    return factor


# ---------------------------------------------------------------------------------------------- loading


def shipped_models() -> dict[str, Path]:
    """Hub name -> shipped config file (harness/data/models/<slug>.json)."""
    out: dict[str, Path] = {}
    for path in sorted(MODELS_DIR.glob("*.json")):
        try:
            name = json.loads(path.read_text()).get("_name_or_path")
        except (OSError, json.JSONDecodeError):
            continue
        if name:
            out[str(name)] = path
    return out


def _shipped_lookup(name: str) -> Path | None:
    """Match a hub name, a slug, or a path whose last two parts are a shipped hub name (./models/org/name)."""
    ships = shipped_models()
    key = name.strip().rstrip("/")
    lowered = {k.lower(): v for k, v in ships.items()}
    if key.lower() in lowered:
        return lowered[key.lower()]
    for path in ships.values():
        if path.stem.lower() == key.lower():
            return path
    parts = Path(key).parts
    if len(parts) >= 2:
        tail = "/".join(parts[-2:]).lower()
        if tail in lowered:
            return lowered[tail]
    return None


def load_model_facts(name_or_path: str) -> ModelFacts:
    """Model facts from a local dir (or config.json path), the HF cache (offline), or the shipped facts by hub name."""
    p = Path(name_or_path).expanduser()
    cfg_path: Path | None = None
    if p.is_dir() and (p / "config.json").is_file():
        cfg_path = p / "config.json"
    elif p.is_file() and p.name.endswith(".json"):
        cfg_path = p
    if cfg_path is not None:
        facts = facts_from_config(_read_json(cfg_path), name_or_path, str(cfg_path))
        return _with_checkpoint_dtype(facts, cfg_path.parent)
    cached = _from_hf_cache(name_or_path)
    if cached is not None:
        return facts_from_config(_read_json(cached), name_or_path, f"hf-cache:{cached}")
    shipped = _shipped_lookup(name_or_path)
    if shipped is not None:
        cfg = _read_json(shipped)
        return facts_from_config(cfg, str(cfg.get("_name_or_path") or name_or_path), f"shipped:{shipped.name}")
    names = ", ".join(sorted(shipped_models()))
    raise UserError(
        f"no config.json found: not a local model directory, not in the Hugging Face cache, and not one of the "
        f"shipped models ({names})", key="model_name", source=name_or_path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read config.json: {exc}", source=str(path)) from None
    if not isinstance(data, dict):
        raise UserError("config.json is not a JSON object", source=str(path))
    return data


def _from_hf_cache(repo_id: str) -> Path | None:
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        hit = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # malformed repo id and the like: not in the cache
        return None
    return Path(hit) if isinstance(hit, str) else None


def _with_checkpoint_dtype(facts: ModelFacts, model_dir: Path) -> ModelFacts:
    """A config without torch_dtype: vLLM reads the dtype from the safetensors headers, so do the same."""
    raw = _read_json(model_dir / "config.json") if (model_dir / "config.json").is_file() else {}
    if raw.get("torch_dtype") or raw.get("dtype"):
        return facts
    dtypes = set()
    for f in sorted(model_dir.glob("*.safetensors"))[:4]:
        dtypes |= {info.get("dtype") for k, info in _safetensors_header(f).items() if k != "__metadata__"}
    names = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
    found = {names[d] for d in dtypes if d in names}
    if len(found) == 1:
        from dataclasses import replace

        return replace(facts, config_dtype=found.pop())
    return facts


def _safetensors_header(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            return json.loads(fh.read(n))
    except (OSError, struct.error, json.JSONDecodeError):
        return {}
