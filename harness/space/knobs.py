"""A knob: one vLLM (or harness) setting the tuner may vary, with its type and range.

The knob's *name* is the setting's key (vLLM's `dest` name, or a harness key such as `replicas`); whether vLLM
accepts it is checked against the installed vLLM's parser elsewhere, so this module only knows types and ranges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import optuna

from harness.errors import UserError

KNOB_TYPES = ("int", "float", "categorical", "bool")


@dataclass(frozen=True)
class Knob:
    name: str
    type: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = field(default_factory=tuple)

    def distribution(self) -> optuna.distributions.BaseDistribution:
        """The Optuna distribution; also what a resumed study is checked against."""
        if self.type == "int":
            return optuna.distributions.IntDistribution(
                int(self.low), int(self.high), log=self.log, step=int(self.step or 1)  # type: ignore[arg-type]
            )
        if self.type == "float":
            return optuna.distributions.FloatDistribution(
                float(self.low), float(self.high), log=self.log, step=self.step  # type: ignore[arg-type]
            )
        if self.type == "bool":
            return optuna.distributions.CategoricalDistribution((False, True))
        return optuna.distributions.CategoricalDistribution(self.choices)

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)  # type: ignore[arg-type]
        if self.type == "float":
            value = trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)  # type: ignore[arg-type]
            return round(value, 6)
        if self.type == "bool":
            return trial.suggest_categorical(self.name, (False, True))
        return trial.suggest_categorical(self.name, self.choices)

    def values(self) -> list[Any]:
        """Every value, for grid search and feasibility counts; continuous floats need a step."""
        if self.type == "bool":
            return [False, True]
        if self.type == "categorical":
            return list(self.choices)
        low, high = self.low, self.high
        if self.type == "int":
            if self.log and not self.step:
                # powers of two between the bounds, plus the bounds: the values people actually try
                vals = {int(low), int(high)}  # type: ignore[arg-type]
                v = 1
                while v <= high:  # type: ignore[operator]
                    if v >= low:  # type: ignore[operator]
                        vals.add(v)
                    v *= 2
                return sorted(vals)
            return list(range(int(low), int(high) + 1, int(self.step or 1)))  # type: ignore[arg-type]
        if not self.step:
            raise UserError(f"knob '{self.name}' is a continuous float; give it a step to enumerate it")
        n = int(math.floor((high - low) / self.step + 1e-9))  # type: ignore[operator]
        return [round(low + i * self.step, 6) for i in range(n + 1)]  # type: ignore[operator]


def parse_knob(name: str, spec: Any, source: str) -> Knob:
    """Read one knob from YAML, with one-line errors that name the file, key and allowed values."""
    key = f"knobs.{name}"
    if isinstance(spec, list):  # shorthand: a list of choices
        spec = {"type": "categorical", "choices": spec}
    if not isinstance(spec, dict):
        raise UserError("must be a mapping with 'type' (one of int, float, categorical, bool) or a list of choices",
                        source=source, key=key)
    allowed = {"type", "low", "high", "step", "log", "choices"}
    unknown = set(spec) - allowed
    if unknown:
        raise UserError(f"unknown field(s) {sorted(unknown)}; allowed: {sorted(allowed)}", source=source, key=key)
    ktype = spec.get("type")
    if ktype is None and "choices" in spec:
        ktype = "categorical"
    if ktype not in KNOB_TYPES:
        raise UserError(f"type {ktype!r} is not one of {list(KNOB_TYPES)}", source=source, key=f"{key}.type")
    if ktype in ("int", "float"):
        for bound in ("low", "high"):
            if not isinstance(spec.get(bound), (int, float)) or isinstance(spec.get(bound), bool):
                raise UserError(f"{ktype} knob needs a numeric '{bound}'", source=source, key=f"{key}.{bound}")
        low, high = spec["low"], spec["high"]
        if ktype == "int" and (int(low) != low or int(high) != high):
            raise UserError("int knob bounds must be whole numbers", source=source, key=key)
        if low > high:
            raise UserError(f"low ({low}) is greater than high ({high})", source=source, key=key)
        step = spec.get("step")
        if step is not None and (not isinstance(step, (int, float)) or step <= 0):
            raise UserError(f"step must be a positive number, got {step!r}", source=source, key=f"{key}.step")
        log = bool(spec.get("log", False))
        if log and low <= 0:
            raise UserError("log scale needs low > 0", source=source, key=f"{key}.low")
        if log and step not in (None, 1) and ktype == "int":
            raise UserError("log scale cannot be combined with a step other than 1", source=source, key=key)
        if log and step is not None and ktype == "float":
            raise UserError("log scale cannot be combined with a step", source=source, key=key)
        return Knob(name, ktype, low=low, high=high, step=step, log=log)
    if ktype == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise UserError("categorical knob needs a non-empty list 'choices'", source=source, key=f"{key}.choices")
        if len(set(map(repr, choices))) != len(choices):
            raise UserError(f"choices repeat a value: {choices}", source=source, key=f"{key}.choices")
        for c in choices:
            if not (c is None or isinstance(c, (bool, int, float, str))):
                raise UserError(f"choice {c!r} must be null, a bool, a number or a string", source=source,
                                key=f"{key}.choices")
        return Knob(name, "categorical", choices=tuple(choices))
    return Knob(name, "bool")
