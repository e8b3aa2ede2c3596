"""Workload YAML: what the prompts look like (lengths, API, shared prefix), independent of how fast they arrive.

A workload is a file, or a preset name looked up in `harness/data/workloads/NAME.yaml`:

```yaml
name: chat-short
api: chat                  # completions | chat
input_len:  {dist: uniform, min: 128, max: 512}      # prompt tokens as the server counts them
output_len: {dist: uniform, min: 64, max: 256}       # max_tokens (exact when ignore_eos is true)
shared_prefix_len: 0       # tokens every prompt starts with (exercises prefix caching)
ignore_eos: true
seed: 0
warmup_requests: 8
num_requests: 200          # optional default
duration_s: null           # optional default
```

Length distributions: `{dist: fixed, value: N}`, `{dist: uniform, min, max}` (integers, both ends included),
`{dist: normal, mean, std, min, max}` (rounded and clipped to [min, max]) and `{dist: dataset, path, field}`.

A dataset is a JSONL file (path relative to the YAML file) whose lines are objects such as
`{"prompt": "Summarize ...", "output_len": 128}` or `{"input_len": 900, "output_len": 64}`. `field` names the key
to read; by default `input_len` reads `prompt` (the text itself, sent verbatim) when the line has it, else
`input_len` (a token count for a synthetic prompt), and `output_len` reads `output_len`. When both lengths come
from the same file they come from the same line, so real (prompt, answer length) pairs stay paired.

`input_len` is the prompt length the server sees: it includes the BOS token and, for the chat API, the chat
template's tokens, the same convention as `vllm bench serve --dataset-name random`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any

import numpy as np

from harness.errors import UserError
from harness.paths import portable_path
from harness.yamlfile import read_yaml

PRESET_DIR = Path(__file__).resolve().parent.parent / "data" / "workloads"

APIS = ("completions", "chat")
DISTS = ("fixed", "uniform", "normal", "dataset")
_DIST_KEYS = {
    "fixed": ({"value"}, set()),
    "uniform": ({"min", "max"}, set()),
    "normal": ({"mean", "std", "min", "max"}, set()),
    "dataset": ({"path"}, {"field"}),
}
_TOP_KEYS = {
    "name": False,
    "description": False,
    "api": True,
    "input_len": True,
    "output_len": True,
    "shared_prefix_len": False,
    "ignore_eos": False,
    "seed": False,
    "warmup_requests": False,
    "num_requests": False,
    "duration_s": False,
}


@dataclass(frozen=True)
class DatasetRow:
    """One JSONL line: a prompt text or a prompt length, and optionally an output length."""

    prompt: str | None
    input_len: int | None
    output_len: int | None


@dataclass
class LengthDist:
    """A token-length distribution; `sample` draws integers, `bounds` gives the smallest and largest possible."""

    dist: str
    value: int | None = None
    min: int | None = None
    max: int | None = None
    mean: float | None = None
    std: float | None = None
    path: str | None = None
    field: str | None = None
    rows: list[DatasetRow] = dc_field(default_factory=list, repr=False, compare=False)

    def bounds(self) -> tuple[int, int] | None:
        """Smallest and largest value this distribution can produce.

        None for a dataset of prompt texts without `input_len` on every line: their token counts are only known
        once a tokenizer has read them (`build_requests` reports them exactly).
        """
        if self.dist == "fixed":
            assert self.value is not None
            return self.value, self.value
        if self.dist in ("uniform", "normal"):
            assert self.min is not None and self.max is not None
            return self.min, self.max
        values = [self._row_value(r) for r in self.rows]
        if not values or any(v is None for v in values):
            return None
        return min(values), max(values)  # type: ignore[type-var]

    def mean_value(self) -> float | None:
        """Expected value (for planning: tokens per request); None where `bounds` is None."""
        if self.dist == "fixed":
            return float(self.value or 0)
        if self.dist == "uniform":
            return ((self.min or 0) + (self.max or 0)) / 2
        if self.dist == "normal":
            return float(np.clip(self.mean or 0.0, self.min, self.max))
        if self.bounds() is None:
            return None
        return float(np.mean([self._row_value(r) for r in self.rows]))

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Draw `n` integer lengths (not for `dataset`, whose rows are drawn by the workload)."""
        if self.dist == "fixed":
            return np.full(n, self.value, dtype=np.int64)
        if self.dist == "uniform":
            return rng.integers(self.min, self.max, size=n, endpoint=True).astype(np.int64)
        if self.dist == "normal":
            raw = rng.normal(self.mean, self.std, size=n)
            return np.clip(np.rint(raw), self.min, self.max).astype(np.int64)
        raise ValueError("dataset lengths are drawn row by row with Workload.sample_rows")

    def _row_value(self, row: DatasetRow) -> int | None:
        if self.field == "output_len":
            return row.output_len
        return row.input_len

    def to_dict(self) -> dict[str, Any]:
        keys = {"fixed": ("value",), "uniform": ("min", "max"), "normal": ("mean", "std", "min", "max")}
        if self.dist == "dataset":
            return {"dist": "dataset", "path": portable_path(self.path), "field": self.field}
        return {"dist": self.dist, **{k: getattr(self, k) for k in keys[self.dist]}}


@dataclass
class Workload:
    """What to send: API, length distributions, shared prefix, seed. Arrival (how fast) is separate."""

    name: str
    api: str
    input_len: LengthDist
    output_len: LengthDist
    shared_prefix_len: int = 0
    ignore_eos: bool = True
    seed: int = 0
    warmup_requests: int = 8
    num_requests: int | None = None
    duration_s: float | None = None
    description: str = ""
    source: str = ""  # the file it was read from

    def max_input_tokens(self) -> int | None:
        """Longest prompt in tokens (None for a dataset of prompt texts: known only after tokenizing)."""
        b = self.input_len.bounds()
        return None if b is None else b[1]

    def max_output_tokens(self) -> int | None:
        b = self.output_len.bounds()
        return None if b is None else b[1]

    def max_total_tokens(self) -> int | None:
        """Longest prompt + longest output: must fit the server's max_model_len."""
        i, o = self.max_input_tokens(), self.max_output_tokens()
        return None if i is None or o is None else i + o

    def to_dict(self) -> dict[str, Any]:
        """Plain form for the run record (dataset rows are not copied, only the path)."""
        return {
            "name": self.name,
            "api": self.api,
            "input_len": self.input_len.to_dict(),
            "output_len": self.output_len.to_dict(),
            "shared_prefix_len": self.shared_prefix_len,
            "ignore_eos": self.ignore_eos,
            "seed": self.seed,
            "warmup_requests": self.warmup_requests,
            "num_requests": self.num_requests,
            "duration_s": self.duration_s,
            "description": self.description,
            "source": portable_path(self.source, presets=PRESET_DIR),  # committed with the record: no machine path
        }

    def dataset_rows(self) -> list[DatasetRow] | None:
        """The dataset rows when any length comes from a dataset (input's rows win when both do)."""
        if self.input_len.dist == "dataset":
            return self.input_len.rows
        if self.output_len.dist == "dataset":
            return self.output_len.rows
        return None

    @property
    def verbatim_prompts(self) -> bool:
        """Prompts are a dataset's text as it is (no generated tokens to vary for another prompt set)."""
        return self.input_len.dist == "dataset" and self.input_len.field == "prompt"

    def sample_lengths(self, rng: np.random.Generator, n: int) -> tuple[list[DatasetRow | None], list[int | None], list[int]]:
        """Draw per-request (dataset row, input length, output length).

        Input length is None when the row's prompt text is used verbatim. Rows are drawn by a seeded shuffle,
        cycled when `n` exceeds the file, so a run uses each line once before repeating any.
        """
        rows = self.dataset_rows()
        picked: list[DatasetRow | None] = [None] * n
        if rows:
            order: list[int] = []
            while len(order) < n:
                order.extend(rng.permutation(len(rows)).tolist())
            picked = [rows[i] for i in order[:n]]
        if self.input_len.dist == "dataset":
            inputs: list[int | None] = []
            for row in picked:
                assert row is not None
                inputs.append(None if self.verbatim_prompts else row.input_len)
        else:
            inputs = [int(v) for v in self.input_len.sample(rng, n)]
        if self.output_len.dist == "dataset":
            outputs = []
            for row in picked:
                assert row is not None and row.output_len is not None
                outputs.append(row.output_len)
        else:
            outputs = [int(v) for v in self.output_len.sample(rng, n)]
        return picked, inputs, outputs


# ---------------------------------------------------------------------------------------------- loading


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_workload(name_or_path: str | Path) -> Workload:
    """Read a workload from a preset name (`chat-short`) or a YAML file path; bad input raises UserError."""
    text = str(name_or_path)
    path = Path(text)
    if not path.suffix and not path.exists():
        preset = PRESET_DIR / f"{text}.yaml"
        if not preset.exists():
            raise UserError(
                f"no workload preset or file named {text!r}; presets: {', '.join(list_presets())}",
                source=text,
            )
        path = preset
    data = read_yaml(path, "workload")
    return parse_workload(data, source=str(path), default_name=path.stem)


def parse_workload(data: Any, *, source: str = "<workload>", default_name: str = "workload") -> Workload:
    """Validate a mapping (already parsed YAML) into a Workload; every error names the file and key."""
    if not isinstance(data, dict):
        raise UserError("a workload must be a mapping of keys to values", source=source)
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        raise UserError(f"unknown key; allowed keys: {', '.join(_TOP_KEYS)}", source=source, key=str(unknown[0]))
    missing = [k for k, required in _TOP_KEYS.items() if required and k not in data]
    if missing:
        raise UserError("required key is missing", source=source, key=missing[0])

    api = data["api"]
    if api not in APIS:
        raise UserError(f"got {api!r}; allowed values: {', '.join(APIS)}", source=source, key="api")
    base = Path(source).parent
    input_len = _parse_dist(data["input_len"], source, "input_len", base)
    output_len = _parse_dist(data["output_len"], source, "output_len", base)
    if input_len.dist == "dataset" and output_len.dist == "dataset" and input_len.path != output_len.path:
        raise UserError(
            "input_len and output_len must read the same dataset file (lines are pairs)", source=source, key="output_len.path"
        )

    shared = _int(data.get("shared_prefix_len", 0), source, "shared_prefix_len", minimum=0)
    in_bounds = input_len.bounds()
    if shared and in_bounds is not None and shared >= in_bounds[0]:
        lo_in = in_bounds[0]
        raise UserError(
            f"{shared} must be smaller than the shortest prompt ({lo_in} tokens from input_len)",
            source=source,
            key="shared_prefix_len",
        )
    ignore_eos = data.get("ignore_eos", True)
    if not isinstance(ignore_eos, bool):
        raise UserError(f"got {ignore_eos!r}; allowed values: true, false", source=source, key="ignore_eos")
    seed = _int(data.get("seed", 0), source, "seed", minimum=0)
    warmup = _int(data.get("warmup_requests", 8), source, "warmup_requests", minimum=0)
    num = data.get("num_requests")
    num_requests = None if num is None else _int(num, source, "num_requests", minimum=1)
    dur = data.get("duration_s")
    duration_s = None if dur is None else _positive_float(dur, source, "duration_s")
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name:
        raise UserError(f"got {name!r}; expected a non-empty string", source=source, key="name")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise UserError("expected a string", source=source, key="description")
    return Workload(
        name=name,
        api=api,
        input_len=input_len,
        output_len=output_len,
        shared_prefix_len=shared,
        ignore_eos=ignore_eos,
        seed=seed,
        warmup_requests=warmup,
        num_requests=num_requests,
        duration_s=duration_s,
        description=description,
        source=source,
    )


def _parse_dist(spec: Any, source: str, key: str, base: Path) -> LengthDist:
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = {"dist": "fixed", "value": spec}
    if not isinstance(spec, dict):
        raise UserError(
            f"got {spec!r}; expected a mapping with dist: one of {', '.join(DISTS)}", source=source, key=key
        )
    dist = spec.get("dist")
    if dist not in _DIST_KEYS:
        raise UserError(f"got {dist!r}; allowed values: {', '.join(DISTS)}", source=source, key=f"{key}.dist")
    required, optional = _DIST_KEYS[dist]
    allowed = required | optional | {"dist"}
    extra = sorted(set(spec) - allowed)
    if extra:
        raise UserError(
            f"unknown key for dist {dist}; allowed keys: {', '.join(sorted(allowed))}",
            source=source,
            key=f"{key}.{extra[0]}",
        )
    missing = sorted(required - set(spec))
    if missing:
        raise UserError(f"required for dist {dist}", source=source, key=f"{key}.{missing[0]}")

    if dist == "fixed":
        return LengthDist("fixed", value=_int(spec["value"], source, f"{key}.value", minimum=1))
    if dist == "uniform":
        lo = _int(spec["min"], source, f"{key}.min", minimum=1)
        hi = _int(spec["max"], source, f"{key}.max", minimum=1)
        if lo > hi:
            raise UserError(f"min {lo} is greater than max {hi}", source=source, key=f"{key}.min")
        return LengthDist("uniform", min=lo, max=hi)
    if dist == "normal":
        lo = _int(spec["min"], source, f"{key}.min", minimum=1)
        hi = _int(spec["max"], source, f"{key}.max", minimum=1)
        if lo > hi:
            raise UserError(f"min {lo} is greater than max {hi}", source=source, key=f"{key}.min")
        mean = _positive_float(spec["mean"], source, f"{key}.mean")
        std = _float(spec["std"], source, f"{key}.std")
        if std < 0:
            raise UserError(f"got {std}; must be >= 0", source=source, key=f"{key}.std")
        return LengthDist("normal", mean=mean, std=std, min=lo, max=hi)

    # dataset
    path_value = spec["path"]
    if not isinstance(path_value, str) or not path_value:
        raise UserError("expected a file path", source=source, key=f"{key}.path")
    path = Path(path_value)
    if not path.is_absolute():
        path = base / path
    allowed_fields = ("prompt", "input_len") if key == "input_len" else ("output_len",)
    fld = spec.get("field")
    if fld is not None and fld not in allowed_fields:
        raise UserError(
            f"got {fld!r}; allowed values: {', '.join(allowed_fields)}", source=source, key=f"{key}.field"
        )
    rows = _read_dataset(path, source, f"{key}.path")
    if fld is None:
        fld = allowed_fields[0] if key == "output_len" else ("prompt" if rows[0].prompt is not None else "input_len")
    for i, row in enumerate(rows, 1):
        value = row.prompt if fld == "prompt" else getattr(row, fld)
        if value is None:
            raise UserError(f"line {i} has no {fld!r}", source=str(path), key=fld)
    return LengthDist("dataset", path=str(path), field=fld, rows=rows)


def _read_dataset(path: Path, source: str, key: str) -> list[DatasetRow]:
    if not path.is_file():
        raise UserError(f"dataset file not found: {path}", source=source, key=key)
    rows: list[DatasetRow] = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"line {i} is not JSON: {exc.msg}", source=str(path)) from None
        if not isinstance(obj, dict):
            raise UserError(f"line {i} must be a JSON object", source=str(path))
        prompt = obj.get("prompt")
        if prompt is not None and (not isinstance(prompt, str) or not prompt):
            raise UserError(f"line {i}: expected a non-empty string", source=str(path), key="prompt")
        in_len = obj.get("input_len")
        out_len = obj.get("output_len")
        for name, value in (("input_len", in_len), ("output_len", out_len)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise UserError(f"line {i}: got {value!r}; must be an integer >= 1", source=str(path), key=name)
        rows.append(DatasetRow(prompt=prompt, input_len=in_len, output_len=out_len))
    if not rows:
        raise UserError("dataset file has no lines", source=str(path))
    return rows


def _int(value: Any, source: str, key: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise UserError(f"got {value!r}; must be an integer >= {minimum}", source=source, key=key)
    if value < minimum:
        raise UserError(f"got {value}; must be an integer >= {minimum}", source=source, key=key)
    return value


def _float(value: Any, source: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"got {value!r}; must be a number", source=source, key=key)
    return float(value)


def _positive_float(value: Any, source: str, key: str) -> float:
    out = _float(value, source, key)
    if out <= 0:
        raise UserError(f"got {value!r}; must be > 0", source=source, key=key)
    return out
