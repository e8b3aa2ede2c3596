"""Shared test fixtures. `tiny_tokenizer`: a real Hugging Face fast tokenizer trained in a second, no downloads."""

from __future__ import annotations

import random

import pytest

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def make_tiny_tokenizer(kind: str = "bytelevel", *, chat_template: bool = True, vocab_size: int = 2000):  # type: ignore[no-untyped-def]
    """Train a small BPE tokenizer on generated text and wrap it as transformers' PreTrainedTokenizerFast.

    kind "bytelevel" is GPT-2 / Llama-3 / Qwen style (Ġ word marker, no unk), "metaspace" is Llama-2 / Mistral
    style (▁ marker), "nosplit" is metaspace without word splitting (multi-word tokens). All add a BOS token like
    real causal-LM tokenizers do.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rnd = random.Random(1234)
    syllables = [c + v for c in "bcdfghklmnprstvwz" for v in "aeiou"] + ["th", "st", "er", "an", "on"]
    words = ["".join(rnd.choice(syllables) for _ in range(rnd.randint(1, 4))) for _ in range(1500)]
    words += [w.capitalize() for w in words[:300]]
    lines = [" ".join(rnd.choice(words) for _ in range(rnd.randint(5, 25))) + rnd.choice([".", "?", "!", ","])
             for _ in range(1500)]
    specials = ["<s>", "</s>", "<pad>", "<unk>"]
    if kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    elif kind in ("metaspace", "nosplit"):
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        # nosplit: BPE over whole lines, so it learns tokens that span words (like some recent vocabularies)
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first",
                                                     split=kind == "metaspace")
        tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    else:
        raise ValueError(kind)
    tok.train_from_iterator(lines, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                      unk_token="<unk>")
    if chat_template:
        wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


@pytest.fixture(scope="session")
def tiny_tokenizer():  # type: ignore[no-untyped-def]
    """Byte-level BPE with BOS and a chat template."""
    return make_tiny_tokenizer("bytelevel")


@pytest.fixture(scope="session")
def tiny_tokenizer_metaspace():  # type: ignore[no-untyped-def]
    """Sentencepiece-style (▁) BPE with BOS and a chat template."""
    return make_tiny_tokenizer("metaspace")


# ---------------------------------------------------------------------------------------------- launch / models
# Tests that start a real vLLM server are marked `@pytest.mark.slow` (each start costs ~40 s of CPU here).


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):  # type: ignore[no-untyped-def]
    """Path of the tiny random Llama (harness.models), built once and cached across sessions by builder version.

    VLLM_TUNE_TEST_FRESH_MODEL=1 builds it into this session's tmp dir instead.
    """
    import os

    from harness.models import build_tiny, cached_tiny

    if os.environ.get("VLLM_TUNE_TEST_FRESH_MODEL"):
        out = tmp_path_factory.mktemp("tiny-model")
        build_tiny(out)
        return out
    return cached_tiny()


@pytest.fixture(scope="session")
def vllm_argspec():  # type: ignore[no-untyped-def]
    """The installed vLLM's ArgSpec (dumped once per vLLM version into ~/.cache/vllm-tune, ~15 s the first time)."""
    from harness.launch.vllm_args import load_argspec

    return load_argspec()


# ---------------------------------------------------------------------------------------------- a real sweep
# One real 3-trial sweep per test session (vLLM defaults, a committed config that cannot start, one sampled
# candidate; confirmation with 2 repeats), shared by the sweep, report and notebook tests.

import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import yaml  # noqa: E402


def write_sweep(root: Path, model: Path, *, trials: int, confirm: int = 0, cross_check: bool = False,
                space_name: str = "e2e",
                fixed: dict[str, Any] | None = None, choices: list[int] | None = None, max_steps: int = 2,
                seed: int = 3, dirs: bool = True, start_timeout_s: int = 400, step_s: float = 4) -> Path:
    """The tiny CPU sweep the end-to-end tests share: one max_num_seqs knob, a loose SLO, `trials` trials.

    `fixed` replaces the default gpu_memory_utilization sizing (e.g. an explicit kv_cache_memory_bytes, the cheapest
    CPU start); `dirs=False` leaves results/configs dirs to the command line (workers of a shared storage).
    """
    space = {
        "name": space_name,
        "fixed": {"enforce_eager": True, "max_model_len": 512, **(fixed or {"gpu_memory_utilization": 0.2})},
        "knobs": {"max_num_seqs": {"type": "categorical", "choices": choices or [4, 8]}},
    }
    (root / "space.yaml").write_text(yaml.safe_dump(space))
    sweep: dict[str, Any] = {
        "models": [{"name": "tiny", "model": str(model)}],
        "space": str(root / "space.yaml"),
        "workload": "tiny-cpu",
        "objective": {"kind": "capacity", "slo": {"ttft_ms": 8000, "tpot_ms": 1000, "percentile": 90},
                      "step_s": step_s, "warmup_s": 1, "start_rate": 2.0, "max_steps": max_steps},
        "trials": trials,
        "confirm": {"repeats": confirm, "cross_check": cross_check},
        "sampler": "random",
        "seed": seed,
        "start_timeout_s": start_timeout_s,
    }
    if dirs:
        sweep.update(results_dir=str(root / "results"), configs_dir=str(root / "configs"))
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def run_sweep(sweep: Path, cwd: Path, *extra: str, timeout: float = 1500) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harness.sweep", str(sweep), *extra], cwd=cwd, text=True,
                          capture_output=True, timeout=timeout)


def cpu_kv_sizing(log: str) -> tuple[float, float, float]:
    """vLLM's CPU build's KV sizing line in a server log: (KV cache, node total, requested for the worker) in GiB."""
    import re

    # "Auto set (1.58/23.59) GiB for KV cache on node 0, with 2.36 GiB requested memory for the worker"
    got = re.search(r"Auto set \(([\d.]+)/([\d.]+)\) GiB .* with ([\d.]+) GiB requested", log)
    assert got is not None, log[-2000:]
    return float(got.group(1)), float(got.group(2)), float(got.group(3))


def cpu_kv_plan_error(model: str, settings: dict[str, Any], log: str) -> tuple[float, float]:
    """How far vLLM's CPU KV cache (from its server log) is from the planner's, in GiB, with the node total vLLM
    read. The planner is given that total: a VM's NUMA node can grow between planning and vLLM's start-up. What is
    left is the CPU worker's RSS that vLLM subtracts (the planner's 0.63 GiB was measured on one host), an error in
    GiB: a bound in GiB holds on any host, where a bound in percent depends on the node's size."""
    import dataclasses

    from harness.measure.vllm_metrics import kv_capacity_from_log
    from harness.plan import detect_hardware, load_model_facts, plan_candidate
    from harness.plan.hardware import GIB

    _, total, _ = cpu_kv_sizing(log)
    plan = plan_candidate(load_model_facts(model), dataclasses.replace(detect_hardware("CPU"), memory_gib=total),
                          settings)
    assert plan.kv_cache_tokens and plan.kv_bytes_per_token, plan.reason()
    logged = kv_capacity_from_log(log).kv_cache_tokens
    return abs(logged - plan.kv_cache_tokens) * plan.kv_bytes_per_token / GIB, total


@pytest.fixture(scope="session")
def sweep_run(tiny_model, tmp_path_factory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("sweep-e2e")
    # The user's committed config is a baseline. This one names a tokenizer folder that holds no tokenizer: the
    # planner cannot know, vLLM refuses at start-up, and the sweep must record that and carry on.
    not_a_tokenizer = root / "empty-dir"
    not_a_tokenizer.mkdir()
    (root / "configs").mkdir()
    (root / "configs" / "tiny.yaml").write_text(yaml.safe_dump(
        {"vllm": {"model_name": str(tiny_model), "max_num_seqs": 8, "tokenizer": str(not_a_tokenizer)}}))
    sweep = write_sweep(root, tiny_model, trials=3, confirm=2, cross_check=True)
    t0 = time.monotonic()
    proc = run_sweep(sweep, root)
    elapsed = time.monotonic() - t0
    print(proc.stderr[-4000:])
    return root, sweep, proc, elapsed


@pytest.fixture(scope="session")
def sweep_results(sweep_run):  # type: ignore[no-untyped-def]
    """The results folder of the session's real sweep (for the report and notebook tests)."""
    root, _, proc, _ = sweep_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "results"


def fake_study(monkeypatch: Any, tmp_path: Path, space: Any, slots: Any, fake_plan: Any, fake_deploy: Any,
               hold_s: float = 0.0) -> Any:
    """A StudyContext whose trials plan with `fake_plan(ctx, settings)`, deploy with `fake_deploy` and 'measure'
    capacity 1 after `hold_s` seconds of load: `run_trials` without any server."""
    import time as _time
    from types import SimpleNamespace

    from harness.study import evaluate as evaluate_mod
    from harness.study import objectives as objectives_mod
    from harness.study.evaluate import StudyContext
    from harness.study.objectives import CapacityObjective

    def fake_search(measure: Any, **_: Any) -> Any:
        _time.sleep(hold_s)
        return SimpleNamespace(capacity_lo=1.0, curve=lambda: [], best=None,
                               steps=[SimpleNamespace(record=None, client_limited=False)],
                               summary=lambda: {"capacity_lo": 1.0})

    monkeypatch.setattr(evaluate_mod, "_plan", fake_plan)
    monkeypatch.setattr(evaluate_mod, "deploy", fake_deploy)
    monkeypatch.setattr(objectives_mod, "search_capacity", fake_search)
    return StudyContext(model="m", model_name="m", slug="m", facts=None, hardware=None, space=space, workload=None,
                        objective=CapacityObjective(), requests_for=lambda step, n: [], study_dir=tmp_path,
                        start_timeout_s=10, slots=slots)
