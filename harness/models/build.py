"""Random-weight models built locally: a tiny Llama for CPU demos and tests, and real architectures by config.

The harness measures serving performance, which depends on a model's architecture (shapes, dtypes, KV heads),
not on its trained weights. With no model hub reachable, a directory with the real config.json, random bf16
weights of exactly the right shapes and a locally trained tokenizer of the right vocabulary size stands in for
the real model: vLLM loads it, allocates the same memory and runs the same kernels.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import UserError
from harness.models.tokenizer import save_tokenizer, special_tokens_for, train_tokenizer

# Small enough to build in seconds and to serve on 2 CPU cores, big enough to look like a Llama to vLLM.
TINY_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "vocab_size": 4096,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
    "use_cache": True,
}

# Known names -> the slug of the real config.json shipped under harness/data/models/<slug>.json (the planner's
# architecture facts; one copy of each config in the project). Hub names (`_name_or_path`) resolve too.
KNOWN_ARCHS: dict[str, str] = {
    "tiny": "tiny",
    "mistral-7b": "mistral-7b",
    "llama-2-70b": "llama-2-70b",
    "codellama-13b": "codellama-13b",
    "dialogpt-medium": "dialogpt-medium",
}

MODELS_DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "models"
MAX_SHARD_BYTES = 4 * 1024**3


@dataclass
class BuiltModel:
    """What was written: the directory vLLM and AutoTokenizer load, and the facts a record needs."""

    path: Path
    architecture: str
    num_params: int
    dtype: str
    vocab_size: int
    seconds: float
    device: str


def is_model_dir(path: str | Path) -> bool:
    """A local model directory (config.json inside); anything else is a hub name passed to vLLM as-is."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


def served_path(model: str | Path) -> str:
    """A local model's path as the sweep passes it to vLLM and records it: absolute, with symlinks kept, so a
    `models/` that links to a folder outside the project still reads `<project>/models/...` and is committed as
    `models/...` (`harness.paths.portable`); resolving it wrote the link's machine target into the study."""
    return os.path.abspath(model)


def ensure_model(model: str, build: str | None = None, *, key: str = "models[].model") -> str:
    """A local model a sweep may build when missing (`build`: "tiny" or an architecture name), as an absolute path;
    hub names pass through untouched. UserError for a local path that is not there."""
    path = Path(model)
    if build and not (path / "config.json").exists():
        print(f"building model '{build}' into {path} ...", file=sys.stderr, flush=True)
        build_in_child(build, path)
    if path.exists():
        return served_path(path)
    if model.startswith((".", "/")) or build:
        raise UserError("no such model directory", source=model, key=key)
    return model


def build_in_child(build: str, path: Path) -> None:
    """Build in a child process (`python -m harness.models`): weights are generated on the GPU, and the CUDA context
    that leaves behind must not live in the sweep's process, where it would hold GPU memory next to every server
    the sweep starts (and keep the GPU from ever looking free to the slot pool)."""
    argv = [sys.executable, "-m", "harness.models", *(["tiny"] if build == "tiny" else ["arch", build]), str(path)]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"building {build!r} failed (exit {proc.returncode}): {tail[0]}", source=str(path),
                        key="models[].build")
    print(proc.stdout.strip(), file=sys.stderr, flush=True)


def resolve_config(name_or_path: str) -> dict[str, Any]:
    """A known architecture name, a config.json path or a model directory -> the HF config dict."""
    p = Path(name_or_path)
    if p.is_dir() and (p / "config.json").is_file():
        p = p / "config.json"
    if p.is_file():
        return _hf_config_from(json.loads(p.read_text()), str(p))
    if name_or_path == "tiny":
        return dict(TINY_CONFIG)
    slug = KNOWN_ARCHS.get(name_or_path, name_or_path)
    data_file = MODELS_DATA_DIR / f"{slug}.json"
    if data_file.is_file():
        return _hf_config_from(json.loads(data_file.read_text()), str(data_file))
    for path in sorted(MODELS_DATA_DIR.glob("*.json")):  # a hub name: the shipped config's _name_or_path
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if str(data.get("_name_or_path", "")).lower() == name_or_path.lower():
            return _hf_config_from(data, str(path))
    known = ", ".join(sorted(KNOWN_ARCHS))
    raise UserError(
        f"unknown architecture '{name_or_path}': not a config.json path, and no {data_file} "
        f"(known names: {known}; or pass a path to the real model's config.json)"
    )


def _hf_config_from(data: dict[str, Any], source: str) -> dict[str, Any]:
    """Accept a raw HF config.json, or a facts file that wraps one under `config` / `hf_config`."""
    for key in ("hf_config", "config", "config_json"):
        if isinstance(data.get(key), dict) and "model_type" in data[key]:
            return dict(data[key])
    if "model_type" in data or "architectures" in data:
        return dict(data)
    raise UserError("not a Hugging Face config.json (no 'model_type' or 'architectures')", source=source)


def build_tiny(out_dir: str | Path, *, seed: int = 0, device: str | None = None) -> BuiltModel:
    """The tiny random Llama (~3M params, ~6 MB bf16) with its trained 4k tokenizer; builds in seconds on CPU."""
    return build_from_config(dict(TINY_CONFIG), out_dir, seed=seed, device=device)


def build_from_config(
    config: dict[str, Any] | str | Path,
    out_dir: str | Path,
    *,
    seed: int = 0,
    device: str | None = None,
    dtype: str = "bfloat16",
) -> BuiltModel:
    """A random-weight model of exactly `config`'s architecture, written as sharded safetensors.

    The module tree is built on the meta device (no memory), then each tensor is materialized on `device`
    (default: cuda when available) with normal(0, initializer_range) weights, ones for norm scales and zeros
    for biases, and streamed to disk shard by shard, so host memory stays at one shard (4 GB).
    """
    import torch
    from safetensors.torch import save_file

    started = time.monotonic()
    cfg = resolve_config(str(config)) if isinstance(config, (str, Path)) else dict(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)

    tensors, norm_names = _meta_state_dict(cfg)
    std = float(cfg.get("initializer_range", 0.02))
    shards: list[dict[str, Any]] = [{}]
    shard_bytes = 0
    num_params = 0
    total_bytes = 0
    weight_map: dict[str, str] = {}
    elem = torch.empty((), dtype=torch_dtype).element_size()
    for name, meta in tensors.items():
        nbytes = math.prod(meta.shape) * elem
        if shard_bytes and shard_bytes + nbytes > MAX_SHARD_BYTES:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = meta.shape
        shard_bytes += nbytes
        total_bytes += nbytes
        num_params += math.prod(meta.shape)

    n = len(shards)
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        data: dict[str, Any] = {}
        for name, shape in shard.items():
            t = torch.empty(shape, dtype=torch_dtype, device=device)
            if name in norm_names and name.endswith("weight"):
                t.fill_(1.0)
            elif name.endswith("bias"):
                t.zero_()
            else:
                t.normal_(0.0, std, generator=gen)
            data[name] = t.cpu() if device != "cpu" else t
            weight_map[name] = fname
        save_file(data, str(out / fname), metadata={"format": "pt"})
        del data
    if n > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    out_cfg = dict(cfg)
    out_cfg["torch_dtype"] = dtype
    source_name = out_cfg.pop("_name_or_path", None)
    (out / "config.json").write_text(json.dumps(out_cfg, indent=2))
    specials = special_tokens_for(cfg)
    gen_cfg = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2))
    max_len = int(cfg.get("max_position_embeddings") or cfg.get("n_positions") or cfg.get("n_ctx") or 2048)
    vocab_size = int(cfg["vocab_size"])
    tokenizer, tok_cfg = train_tokenizer(vocab_size, specials, model_max_length=max_len, seed=seed)
    save_tokenizer(tokenizer, tok_cfg, out)
    built = BuiltModel(
        path=out,
        architecture=(cfg.get("architectures") or [cfg.get("model_type", "?")])[0],
        num_params=num_params,
        dtype=dtype,
        vocab_size=vocab_size,
        seconds=time.monotonic() - started,
        device=device,
    )
    (out / "vllm_tune_model.json").write_text(
        json.dumps(
            {"random_weights": True, "architecture_of": source_name, "seed": seed, "num_params": num_params,
             "built_on": device},
            indent=2,
        )
    )
    return built


def cached_tiny(cache_root: str | Path | None = None) -> Path:
    """The tiny model built once per builder version under the vllm-tune cache (tests, demos): ~10 s the first
    time, then free. The key hashes the tiny config and this package's source, so a changed builder rebuilds."""
    import hashlib
    import os
    import shutil
    import tempfile

    from harness.cachedir import cache_dir

    src = "".join(p.read_text() for p in sorted(Path(__file__).parent.glob("*.py")))
    key = hashlib.sha256((json.dumps(TINY_CONFIG, sort_keys=True) + src).encode()).hexdigest()[:12]
    root = Path(cache_root) if cache_root is not None else cache_dir() / "models"
    final = root / f"tiny-{key}"
    if is_model_dir(final) and (final / "tokenizer.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="tiny-build-", dir=root))
    try:
        build_tiny(tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _meta_state_dict(cfg: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
    """Checkpoint tensor names and shapes for `cfg`, from transformers' model class built on the meta device.

    Tied parameters appear once (as `save_pretrained` writes them); transformers 5's load-time conversions (e.g.
    fused MoE experts) are reverted to the checkpoint layout that vLLM's loaders read.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_clean = {k: v for k, v in cfg.items() if k not in ("_name_or_path", "transformers_version")}
    model_type = cfg_clean.pop("model_type", None)
    if model_type is None:
        raise UserError("config has no 'model_type'")
    try:
        hf_cfg = AutoConfig.for_model(model_type, **cfg_clean)
    except (KeyError, ValueError) as exc:
        raise UserError(f"transformers does not know model_type '{model_type}': {exc}") from exc
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_cfg)

    norm_names: set[str] = set()
    for mod_name, module in model.named_modules():
        cls = type(module).__name__.lower()
        if "norm" in cls or isinstance(module, torch.nn.LayerNorm):
            for p_name, _ in module.named_parameters(recurse=False):
                norm_names.add(f"{mod_name}.{p_name}" if mod_name else p_name)

    seen: set[int] = set()
    state: dict[str, Any] = {}
    params = {id(p) for p in model.parameters()}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in params:  # buffers (rotary tables, masks) are recomputed by every loader
            continue
        if id(tensor) in seen:  # tied weights are stored once
            continue
        seen.add(id(tensor))
        state[name] = tensor
    try:
        from transformers.core_model_loading import revert_weight_conversion

        reverted = revert_weight_conversion(model, dict(state))
        if reverted.keys() != state.keys():
            renamed_norms = {k for k in reverted if k in norm_names or ("norm" in k and k.endswith("weight"))}
            return dict(reverted), renamed_norms
    except ImportError:  # transformers 4.x has no load-time conversions to revert
        pass
    return state, norm_names
