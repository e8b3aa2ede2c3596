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
    with pytest.raises(UserError, match=r"s: api_server_count: got 2; allowed here: 1 \(only `vllm serve`"):
        vllm_argspec.check({"api_server_count": 2}, source="s")  # the api_server entry point would ignore it
    with pytest.raises(UserError, match="headless: got True"):
        vllm_argspec.check({"headless": True}, source="s")
    vllm_argspec.check({"api_server_count": 1, "headless": False}, source="s")  # what the entry point does anyway
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
        "--model=/models/tiny",
        "--max-num-seqs=64",
        "--no-enable-prefix-caching",
        "--enforce-eager",
        "--served-model-name", "a", "b",
        "--compilation-config={\"mode\":0}",
    ]  # fmt: skip
    assert all(isinstance(a, str) for a in argv)


# Values that begin with `-`, one per kind of argument that carries a value (a random API key can be one of them).
DASHED = {
    "model_name": "-models/tiny",
    "tokenizer": "--tok.v2",  # `.` too: vLLM's parser reads `-x.y` items as dotted config keys
    "served_model_name": ["-tiny"],
    "middleware": ["-a.b", "-c"],
    "compilation_config": {"mode": 0, "debug_dump_path": "-x"},
}


def test_values_beginning_with_dash_stay_values(vllm_argspec: ArgSpec) -> None:
    vllm_argspec.check(DASHED, source="s")
    assert vllm_argspec.to_argv(DASHED) == [
        "--model=-models/tiny", "--tokenizer=--tok.v2", "--served-model-name=-tiny", "--middleware=-a.b",
        "--middleware=-c", '--compilation-config={"mode":0,"debug_dump_path":"-x"}',
    ]  # fmt: skip


def test_several_list_items_cannot_begin_with_dash(vllm_argspec: ArgSpec) -> None:
    """argparse has no form for several values of one flag where one begins with `-`: refused, not misparsed."""
    with pytest.raises(UserError, match=r"s: served_model_name: list item '-b' begins with '-'"):
        vllm_argspec.check({"served_model_name": ["a", "-b"]}, source="s")
    with pytest.raises(UserError, match="begins with '-'"):
        vllm_argspec.to_argv({"served_model_name": ["a", "-b"]})


def test_split_settings() -> None:
    assert set(HARNESS_KEYS) == {"model_name", "replicas", "servers_per_gpu"}
    vllm, harness = split_settings({"model_name": "m", "replicas": 2, "servers_per_gpu": 2, "max_num_seqs": 8})
    assert vllm == {"model": "m", "max_num_seqs": 8} and harness == {"replicas": 2, "servers_per_gpu": 2}
    with pytest.raises(UserError, match="positive integer"):
        split_settings({"replicas": 0})
    for bad in (0, 1.5, "2", True):
        with pytest.raises(UserError, match="servers_per_gpu: must be a positive integer"):
            split_settings({"servers_per_gpu": bad})


def test_servers_per_gpu_is_never_in_argv_and_each_server_gets_its_share(vllm_argspec: ArgSpec) -> None:
    """The launcher owns servers_per_gpu: no flag of it reaches vLLM, and every server's argv carries its share
    of the configuration's gpu_memory_utilization (vLLM's default split when the configuration leaves it out)."""
    from harness.launch.server import Server, ServerSpec

    def argv(settings: dict) -> list[str]:
        return Server(ServerSpec(model="m", settings=settings, port=8000), vllm_argspec).build_argv()

    two = argv({"servers_per_gpu": 2, "gpu_memory_utilization": 0.9, "max_num_seqs": 64})
    assert not [a for a in two if "servers" in a and "per" in a]
    assert "--gpu-memory-utilization=0.45" in two and "--max-num-seqs=64" in two
    default = vllm_argspec.args["gpu_memory_utilization"].default
    three = argv({"servers_per_gpu": 3})
    share = [a for a in three if a.startswith("--gpu-memory-utilization=")]
    assert share == [f"--gpu-memory-utilization={int(default / 3 * 1e4) / 1e4:g}"]
    assert "--gpu-memory-utilization=0.9" in argv({"servers_per_gpu": 1, "gpu_memory_utilization": 0.9})
    assert vllm_argspec.to_argv({"servers_per_gpu": 2}) == []  # the split is server_settings', not to_argv's
    with pytest.raises(UserError, match=r"sweep.yaml: servers_per_gpu: must be a positive integer"):
        vllm_argspec.check({"servers_per_gpu": 0}, source="sweep.yaml")


def test_server_utilization_is_split_evenly_and_never_over_the_configuration() -> None:
    from harness.settings import Topology, server_settings

    assert Topology(servers_per_gpu=2).server_utilization(0.9) == 0.45
    assert Topology(servers_per_gpu=2).server_utilization(0.58) == 0.29
    assert Topology(servers_per_gpu=3).server_utilization(0.92) == 0.3066
    assert Topology(servers_per_gpu=1).server_utilization(0.92) == 0.92
    for n in range(1, 9):
        for util in (0.3, 0.45, 0.58, 0.9, 0.92, 0.95):
            share = Topology(servers_per_gpu=n).server_utilization(util)
            assert n * share <= util + 1e-12 and util - n * share < n * 1e-4
    topo = Topology.of({"servers_per_gpu": 2, "replicas": 3})
    assert topo.servers == 6 and topo.gpus == 3  # servers sharing a GPU count it once
    assert server_settings({"servers_per_gpu": 2}, 0.92) == {"servers_per_gpu": 2, "gpu_memory_utilization": 0.46}
    assert server_settings({"max_num_seqs": 8}, 0.92) == {"max_num_seqs": 8}


@pytest.mark.slow
def test_dashed_values_round_trip_through_vllms_parser(vllm_argspec: ArgSpec) -> None:
    """The server's whole argv (API key, host, model, every kind of value) parses in vLLM's own parser to the
    values meant, when each begins with `-` (~15 s: imports vLLM)."""
    from harness.launch.server import API_SERVER_MODULE, Server, ServerSpec

    server = Server(ServerSpec(model="-models/tiny", settings={k: v for k, v in DASHED.items() if k != "model_name"},
                               port=8123), vllm_argspec)  # fmt: skip
    server.api_key = "-Xk.y_z"
    argv = server.build_argv()
    assert argv[1:3] == ["-m", API_SERVER_MODULE]
    code = (
        "import json, sys\n"
        "from harness.launch.vllm_args import _make_parser\n"
        "parser, _ = _make_parser()\n"
        "ns = parser.parse_args(sys.argv[1:])\n"
        "keys = ['model', 'api_key', 'port', 'tokenizer', 'served_model_name', 'middleware', 'compilation_config']\n"
        "print('RESULT' + json.dumps({k: getattr(ns, k) for k in keys}, default=str))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, *argv[3:]], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    parsed = json.loads(next(x for x in out.stdout.splitlines() if x.startswith("RESULT"))[len("RESULT"):])
    assert parsed["model"] == "-models/tiny" and parsed["api_key"] == ["-Xk.y_z"] and parsed["port"] == 8123
    assert parsed["tokenizer"] == "--tok.v2" and parsed["served_model_name"] == ["-tiny"]
    assert parsed["middleware"] == ["-a.b", "-c"]
    assert '"-x"' in parsed["compilation_config"] or "'-x'" in parsed["compilation_config"]


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
