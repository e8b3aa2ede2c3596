"""Local random-weight models: the tiny Llama, real architectures' shapes, tokenizers of the right size."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from harness.errors import UserError
from harness.models import TINY_CONFIG, is_model_dir, resolve_config


def test_tiny_model_files_and_tokenizer(tiny_model: Path) -> None:
    from safetensors import safe_open
    from transformers import AutoTokenizer

    assert is_model_dir(tiny_model) and not is_model_dir("meta-llama/Llama-2-7b-hf")
    cfg = json.loads((tiny_model / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["torch_dtype"] == "bfloat16"
    with safe_open(str(tiny_model / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        emb = f.get_tensor("model.embed_tokens.weight")
        norm = f.get_tensor("model.norm.weight")
        k_proj = f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape()
    assert len(keys) == 2 + 4 * 9 + 1  # embed, lm_head, 4 layers x 9 tensors, final norm
    assert tuple(emb.shape) == (4096, 256) and str(emb.dtype) == "torch.bfloat16"
    assert 0.01 < float(emb.float().std()) < 0.03 and float(norm.float().min()) == 1.0
    assert k_proj == [2 * 64, 256]  # 2 KV heads x head_dim 64

    tok = AutoTokenizer.from_pretrained(str(tiny_model))  # offline, from the files only
    assert len(tok) == cfg["vocab_size"] == TINY_CONFIG["vocab_size"]
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    ids = tok("The server answers every request quickly.")["input_ids"]
    assert ids[0] == 1 and tok.decode(ids[1:]) == "The server answers every request quickly."
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<|user|>\nhi</s>\n<|assistant|>\n"


def test_real_architecture_shapes() -> None:
    """The shipped Mistral-7B config gives exactly Mistral's 7.24B parameters (meta device: no memory)."""
    from harness.models.build import _meta_state_dict

    cfg = resolve_config("mistral-7b")
    assert cfg["model_type"] == "mistral" and cfg["vocab_size"] == 32000
    assert resolve_config("mistralai/Mistral-7B-Instruct-v0.2")["hidden_size"] == 4096  # by hub name
    state, norms = _meta_state_dict(cfg)
    assert sum(math.prod(t.shape) for t in state.values()) == 7_241_732_096
    assert "lm_head.weight" in state and "model.norm.weight" in norms
    with pytest.raises(UserError, match="unknown architecture 'gpt-5'"):
        resolve_config("gpt-5")


def test_arch_cli_with_config_path(tmp_path: Path) -> None:
    """`python -m harness.models arch CONFIG DIR` for a shrunk GPT-2 (DialoGPT's family): tied embeddings stored
    once, LayerNorm/bias initialization, one <|endoftext|> token at the config's id."""
    cfg = resolve_config("dialogpt-medium")
    cfg.update(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, bos_token_id=999, eos_token_id=999, n_positions=256)
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(json.dumps(cfg))
    out = tmp_path / "gpt2-small"
    run = subprocess.run(
        [sys.executable, "-m", "harness.models", "arch", str(cfg_path), str(out), "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "GPT2LMHeadModel" in run.stdout

    from safetensors import safe_open
    from transformers import AutoTokenizer

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        ln_bias = f.get_tensor("transformer.h.0.ln_1.bias")
    assert "lm_head.weight" not in keys and "transformer.wte.weight" in keys  # tied: stored once
    assert float(ln_bias.float().abs().max()) == 0.0
    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == 1000 and tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 999
    assert tok("hello there")["input_ids"][0] != 999  # GPT-2 style: no BOS added


def test_ensure_model_builds_in_a_child_process_and_names_a_failed_build(tmp_path, monkeypatch):
    """The sweep's process never generates weights itself (on a GPU that would leave a CUDA context holding memory
    next to every server it starts)."""
    import harness.models.build as build
    from harness.errors import UserError
    from harness.models import ensure_model

    def in_process(*args, **kwargs):
        raise AssertionError("built in the sweep's process")

    monkeypatch.setattr(build, "build_tiny", in_process)
    monkeypatch.setattr(build, "build_from_config", in_process)
    path = ensure_model(str(tmp_path / "tiny"), "tiny")
    assert (tmp_path / "tiny" / "config.json").is_file() and path == str((tmp_path / "tiny").resolve())
    with pytest.raises(UserError, match=r"models\[\]\.build: building 'no-such-arch' failed \(exit 2\): error: "
                                        r"unknown architecture 'no-such-arch'") as info:
        ensure_model(str(tmp_path / "bad"), "no-such-arch")
    assert "\n" not in str(info.value)


def test_ensure_model_passes_hub_names_and_refuses_a_missing_directory(tmp_path):
    from harness.errors import UserError
    from harness.models import ensure_model

    assert ensure_model("org/some-model") == "org/some-model"
    with pytest.raises(UserError, match="no such model directory"):
        ensure_model(str(tmp_path / "absent"))
    (tmp_path / "m").mkdir()
    assert ensure_model(str(tmp_path / "m")) == str((tmp_path / "m").resolve())


def test_ensure_model_keeps_a_linked_models_folder_inside_the_project(tmp_path, monkeypatch):
    """A copy of the tree whose models/ links to a folder elsewhere (the GPU stretch's layout): the path vLLM gets
    and the study records stays under the project, so `portable` commits it as models/..., not the link's
    machine target."""
    from harness.models import ensure_model
    from harness.paths import portable

    outside = tmp_path / "elsewhere" / "models"
    (outside / "m").mkdir(parents=True)
    (outside / "m" / "config.json").write_text("{}")
    project = tmp_path / "tree"
    project.mkdir()
    (project / "models").symlink_to(outside)
    monkeypatch.chdir(project)
    monkeypatch.setattr("harness.paths.PROJECT_ROOT", project)
    served = ensure_model("models/m")
    assert served == str(project / "models" / "m")
    assert portable(f"--model={served}") == "--model=models/m"
