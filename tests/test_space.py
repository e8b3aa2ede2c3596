"""Search-space parsing, knob enumeration and conditions."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from harness.errors import UserError
from harness.space import load_space, parse_condition
from harness.space.spec import SPACES_DIR, parse_space


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(text)
    return p


def test_shipped_spaces_parse() -> None:
    names = sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))
    assert {"cpu-demo", "l40s-4x", "h100"} <= set(names)
    for name in names:
        space = load_space(name)
        assert space.knobs, name
        assert space.grid_size() >= 1


def test_l40s_space_has_mission_knobs() -> None:
    space = load_space("l40s-4x")
    for knob in ("gpu_memory_utilization", "block_size", "max_model_len", "max_num_batched_tokens", "quantization",
                 "tensor_parallel_size", "max_num_seqs", "enable_chunked_prefill", "enable_prefix_caching",
                 "kv_cache_dtype"):
        assert knob in space.knobs, knob
    assert "replicas" not in space.knobs  # a deployment decision: the emitted config fills the node
    assert space.knobs["quantization"].choices == (None, "fp8")


def test_knob_values_and_suggest() -> None:
    space = parse_space({"knobs": {"max_num_seqs": {"type": "int", "low": 8, "high": 64, "log": True},
                                   "gpu_memory_utilization": {"type": "float", "low": 0.8, "high": 0.9, "step": 0.05},
                                   "block_size": [16, 32], "enable_prefix_caching": {"type": "bool"}},
                         "fixed": {"enforce_eager": True}}, "mem")
    assert space.knobs["max_num_seqs"].values() == [8, 16, 32, 64]
    assert space.knobs["gpu_memory_utilization"].values() == [0.8, 0.85, 0.9]
    assert space.grid_size() == 4 * 3 * 2 * 2
    grid = list(space.grid())
    assert len(grid) == space.grid_size() and all(g["enforce_eager"] is True for g in grid)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    trial = study.ask()
    settings = space.suggest(trial)
    assert settings["enforce_eager"] is True
    assert 8 <= settings["max_num_seqs"] <= 64
    assert settings["block_size"] in (16, 32)


@pytest.mark.parametrize("text, fragment", [
    ("knobs: {a: {type: int, low: 5, high: 1}}", "low (5) is greater than high (1)"),
    ("knobs: {a: {type: categorical, choices: []}}", "non-empty list 'choices'"),
    ("knobs: {a: {type: integer, low: 1, high: 2}}", "not one of ['int', 'float', 'categorical', 'bool']"),
    ("knobs: {a: {type: int, low: 1}}", "needs a numeric 'high'"),
    ("knobs: {a: {type: float, low: 0, high: 1, log: true}}", "log scale needs low > 0"),
    ("knob: {}", "unknown key(s) ['knob']"),
    ("knobs: {a: [1, 1]}", "choices repeat a value"),
    ("knobs: {a: {type: int, low: 1, high: 4, stride: 2}}", "unknown field(s) ['stride']"),
    ("conditions: ['a <<< b']", "cannot parse"),
    ("conditions: ['__import__(\"os\")']", "calls a function other than"),
    ("knobs: {a: [1]\n  b: 2", "malformed YAML"),
])
def test_bad_space_gives_one_line_error(tmp_path: Path, text: str, fragment: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(UserError) as info:
        load_space(path)
    msg = str(info.value)
    assert fragment in msg
    assert str(path) in msg
    assert "\n" not in msg


def test_missing_space_lists_shipped() -> None:
    with pytest.raises(UserError, match="shipped spaces: .*cpu-demo"):
        load_space("no-such-space")


def test_conditions() -> None:
    cond = parse_condition("enable_chunked_prefill or max_num_batched_tokens >= max_model_len", "x", 0)
    assert cond.holds({"enable_chunked_prefill": True, "max_num_batched_tokens": 10, "max_model_len": 100})
    assert not cond.holds({"enable_chunked_prefill": False, "max_num_batched_tokens": 10, "max_model_len": 100})
    assert cond.holds({"enable_chunked_prefill": False, "max_num_batched_tokens": 100, "max_model_len": 100})
    # a setting left to vLLM's default is not judged by a user condition (the planner knows the defaults)
    assert cond.holds({"max_num_batched_tokens": 10})
    c2 = parse_condition("replicas * tensor_parallel_size <= 4", "x", 1)
    assert c2.holds({"replicas": 2, "tensor_parallel_size": 2})
    assert not c2.holds({"replicas": 4, "tensor_parallel_size": 2})
    assert c2.names == {"replicas", "tensor_parallel_size"}
    c3 = parse_condition("kv_cache_dtype in ['auto', 'fp8'] and not (block_size == 8)", "x", 2)
    assert c3.holds({"kv_cache_dtype": "fp8", "block_size": 16})
    assert not c3.holds({"kv_cache_dtype": "fp8", "block_size": 8})


def test_space_violations() -> None:
    space = load_space("cpu-demo")
    assert space.violations({"max_num_batched_tokens": 256, "max_num_seqs": 200}) == [
        "max_num_batched_tokens >= 2 * max_num_seqs"]
    assert space.violations({"max_num_batched_tokens": 256, "max_num_seqs": 8}) == []


MODEL_MAX_SPACE = """
name: mm
fixed: {enforce_eager: true}
knobs:
  max_model_len: {type: categorical, choices: [2048, model_max]}
  max_num_seqs: [8, 16]
"""


def test_model_max_resolves_per_model_and_keeps_the_distribution(tmp_path: Path) -> None:
    """`model_max` is the literal in Optuna's distribution (equal for every model and rerun); the settings a trial
    launches carry the model's own context."""
    space = load_space(write(tmp_path, MODEL_MAX_SPACE))
    assert space.knobs["max_model_len"].distribution() == optuna.distributions.CategoricalDistribution(
        (2048, "model_max"))
    short = space.for_model(1024)
    assert sorted(g["max_model_len"] for g in short.grid()) == [1024, 1024, 2048, 2048]
    assert space.for_model(4096).knobs["max_model_len"].distribution() == short.knobs["max_model_len"].distribution()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        settings = short.suggest(trial)
        assert settings["max_model_len"] == (1024 if trial.params["max_model_len"] == "model_max" else 2048)
        seen.add(trial.params["max_model_len"])
        study.tell(trial, 1.0)
    assert seen == {2048, "model_max"}
    with pytest.raises(UserError, match="'model_max' needs a model"):
        list(space.grid())  # not yet for a model: no number to launch


def test_model_fixed_replaces_the_knob_and_model_max_elsewhere_is_refused(tmp_path: Path) -> None:
    space = load_space(write(tmp_path, MODEL_MAX_SPACE)).for_model(1024, {"max_model_len": "model_max"})
    assert "max_model_len" not in space.knobs and space.fixed == {"enforce_eager": True, "max_model_len": 1024}
    assert {g["max_model_len"] for g in space.grid()} == {1024} and space.grid_size() == 2
    with pytest.raises(UserError, match=r"knobs.max_num_seqs: 'model_max' is a value of max_model_len only"):
        parse_space({"knobs": {"max_num_seqs": [8, "model_max"]}}, "s.yaml")
    with pytest.raises(UserError, match=r"fixed.block_size: 'model_max' is a value of max_model_len only"):
        parse_space({"fixed": {"block_size": "model_max"}, "knobs": {"max_num_seqs": [8]}}, "s.yaml")
