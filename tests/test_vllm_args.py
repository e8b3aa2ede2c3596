"""ArgSpec against the real installed vLLM: the dump, the cache, checks and argv."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from harness.errors import UserError
from harness.launch import vllm_args
from harness.launch.vllm_args import ArgSpec, argspec_cache_path, load_argspec
from harness.settings import HARNESS_KEYS, split_settings


def test_dump_has_real_parser(vllm_argspec: ArgSpec) -> None:
    spec = vllm_argspec
    assert spec.vllm_version.startswith("0.")
    args = spec.args
    assert args["max_num_seqs"].kind == "value" and args["max_num_seqs"].flag == "--max-num-seqs"
    assert args["enable_prefix_caching"].kind == "bool"
    assert args["enable_prefix_caching"].negative_flag == "--no-enable-prefix-caching"
    assert args["served_model_name"].kind == "multi"
    assert "fp8" in (args["kv_cache_dtype"].choices or [])
    assert args["tensor_parallel_size"].type == "int"
    assert "awq" in spec.quantization_methods and "fp8" in spec.quantization_methods
    assert "swap_space" not in args  # removed in vLLM 0.32: the reason this module exists


def test_cache_file_is_reused(vllm_argspec: ArgSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    path = argspec_cache_path(sys.executable, vllm_argspec.vllm_version)
    assert path.is_file() and path.name.startswith(f"argspec-{vllm_argspec.vllm_version}-")
    vllm_args._MEMO.clear()

    def no_dump(python: str) -> dict:  # a second load must not run vLLM again
        raise AssertionError("dumped again despite the cache file")

    monkeypatch.setattr(vllm_args, "_run_dump", no_dump)
    again = load_argspec()
    assert again.args.keys() == vllm_argspec.args.keys()


def test_unknown_key_names_version_and_closest(vllm_argspec: ArgSpec) -> None:
    with pytest.raises(UserError) as exc:
        vllm_argspec.check({"swap_space": 4}, source="space.yaml")
    msg = str(exc.value)
    assert msg.startswith("space.yaml: swap_space: unknown setting 'swap_space'")
    assert f"not accepted by vLLM {vllm_argspec.vllm_version}" in msg
    assert exc.value.key == "swap_space" and exc.value.source == "space.yaml"
    with pytest.raises(UserError, match="closest valid key: 'max_num_seqs'"):
        vllm_argspec.check({"max_num_seq": 4}, source="s.yaml")
    with pytest.raises(UserError, match="dest names: 'max_num_seqs'"):
        vllm_argspec.check({"max-num-seqs": 4}, source="s.yaml")


def test_value_checks(vllm_argspec: ArgSpec) -> None:
    with pytest.raises(UserError, match=r"invalid value 'fp9'.*accepts: auto"):
        vllm_argspec.check({"kv_cache_dtype": "fp9"}, source="s")
    with pytest.raises(UserError, match="invalid value 'awq2'"):
        vllm_argspec.check({"quantization": "awq2"}, source="s")  # no parser choices: QUANTIZATION_METHODS
    with pytest.raises(UserError, match="expected true or false"):
        vllm_argspec.check({"enable_prefix_caching": "yes"}, source="s")
    with pytest.raises(UserError, match="expected an integer"):
        vllm_argspec.check({"max_num_seqs": "many"}, source="s")
    with pytest.raises(UserError, match="expected a number"):
        vllm_argspec.check({"gpu_memory_utilization": "most"}, source="s")
    with pytest.raises(UserError, match="use 'model_name'"):
        vllm_argspec.check({"model": "x"}, source="s")
    with pytest.raises(UserError, match="reserved"):
        vllm_argspec.check({"port": 8000}, source="s")
    vllm_argspec.check(
        {
            "model_name": "m",
            "replicas": 2,
            "max_num_seqs": 64,
            "max_num_batched_tokens": 8192,
            "gpu_memory_utilization": 0.9,
            "kv_cache_dtype": "fp8",
            "quantization": "awq",
            "enable_prefix_caching": False,
            "enforce_eager": True,
            "max_model_len": None,
            "served_model_name": ["a", "b"],
            "compilation_config": {"mode": 0},
        },
        source="s",
    )


def test_to_argv(vllm_argspec: ArgSpec) -> None:
    argv = vllm_argspec.to_argv(
        {
            "model_name": "/models/tiny",
            "replicas": 3,
            "max_num_seqs": 64,
            "enable_prefix_caching": False,
            "enforce_eager": True,
            "max_model_len": None,
            "served_model_name": ["a", "b"],
            "compilation_config": {"mode": 0},
        }
    )
    assert argv == [
        "--model", "/models/tiny",
        "--max-num-seqs", "64",
        "--no-enable-prefix-caching",
        "--enforce-eager",
        "--served-model-name", "a", "b",
        "--compilation-config", '{"mode":0}',
    ]  # fmt: skip
    assert all(isinstance(a, str) for a in argv)


def test_split_settings() -> None:
    assert set(HARNESS_KEYS) == {"model_name", "replicas"}
    vllm, harness = split_settings({"model_name": "m", "replicas": 2, "max_num_seqs": 8})
    assert vllm == {"model": "m", "max_num_seqs": 8} and harness == {"replicas": 2}
    with pytest.raises(UserError, match="positive integer"):
        split_settings({"replicas": 0})


@pytest.mark.slow
def test_argv_round_trips_through_vllms_parser(vllm_argspec: ArgSpec) -> None:
    """The argv we build parses, in vLLM's own parser, to the settings we meant (~15 s: imports vLLM)."""
    settings = {
        "model_name": "/models/tiny",
        "max_num_seqs": 64,
        "enable_prefix_caching": False,
        "enforce_eager": True,
        "kv_cache_dtype": "fp8",
        "gpu_memory_utilization": 0.85,
        "served_model_name": ["a", "b"],
    }
    argv = vllm_argspec.to_argv(settings)
    code = (
        "import json, sys\n"
        "from harness.launch.vllm_args import _make_parser\n"
        "parser, _ = _make_parser()\n"
        "ns = parser.parse_args(sys.argv[1:])\n"
        "keys = ['model', 'max_num_seqs', 'enable_prefix_caching', 'enforce_eager', 'kv_cache_dtype',\n"
        "        'gpu_memory_utilization', 'served_model_name']\n"
        "print('RESULT' + json.dumps({k: getattr(ns, k) for k in keys}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT"))
    parsed = json.loads(line[len("RESULT") :])
    expected = dict(settings)
    expected["model"] = expected.pop("model_name")
    assert parsed == expected
