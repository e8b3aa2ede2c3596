"""A search space file: knobs, fixed settings and conditions (see search_spaces/*.yaml)."""

from __future__ import annotations

import dataclasses
import itertools
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import optuna

from harness.errors import UserError
from harness.settings import COUNT_KEYS, check_harness_values
from harness.yamlfile import read_yaml
from harness.space.conditions import Condition, parse_condition
from harness.space.knobs import Knob, parse_knob

SPACE_KEYS = ("name", "description", "fixed", "knobs", "conditions")
SPACES_DIR = Path(__file__).resolve().parents[2] / "search_spaces"
# A max_model_len value that stands for the model's longest context, so one space fits models of any context.
# It stays the literal string in the Optuna distribution (the same for every model and every rerun); only the
# settings a trial launches carry the number (`SearchSpace.for_model`).
MODEL_MAX = "model_max"
MODEL_MAX_KEY = "max_model_len"


@dataclass
class SearchSpace:
    name: str
    source: str
    knobs: dict[str, Knob]
    fixed: dict[str, Any] = field(default_factory=dict)
    conditions: list[Condition] = field(default_factory=list)
    description: str = ""
    model_max_len: int | None = None  # what `model_max` stands for, once the space is for one model

    def for_model(self, max_context: int, fixed: dict[str, Any] | None = None) -> SearchSpace:
        """This space for one model: `model_max` becomes its longest context, and the model's own fixed settings
        (a sweep's `models[].fixed`) replace the knobs of the same keys, so one space file serves every model."""
        fixed = dict(fixed or {})
        if DEPLOYMENT_KEY in fixed:
            refuse_replicas(self.source, f"models[].fixed.{DEPLOYMENT_KEY}")
        check_harness_values(fixed, self.source, "models[].fixed")
        space = dataclasses.replace(self, knobs={n: k for n, k in self.knobs.items() if n not in fixed},
                                    fixed={**self.fixed, **fixed}, model_max_len=int(max_context))
        space.fixed = space.resolve(space.fixed)
        return space

    def resolve(self, settings: dict[str, Any]) -> dict[str, Any]:
        """Settings with `model_max` replaced by the model's longest context."""
        if settings.get(MODEL_MAX_KEY) != MODEL_MAX:
            return settings
        if self.model_max_len is None:
            raise UserError(f"'{MODEL_MAX}' needs a model: plan the space with --model", source=self.source,
                            key=MODEL_MAX_KEY)
        return {**settings, MODEL_MAX_KEY: self.model_max_len}

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Settings for one trial: the fixed ones plus one value per knob."""
        settings = dict(self.fixed)
        for knob in self.knobs.values():
            settings[knob.name] = knob.suggest(trial)
        return self.resolve(settings)

    def sample(self, rng: random.Random) -> dict[str, Any]:
        """One candidate drawn uniformly from the grid (for feasibility counts of a large space)."""
        return self.resolve({**self.fixed, **{n: rng.choice(k.values()) for n, k in self.knobs.items()}})

    def violations(self, settings: dict[str, Any]) -> list[str]:
        """The conditions this candidate breaks, as the text the user wrote."""
        return [c.text for c in self.conditions if not c.holds(settings)]

    def grid(self) -> Iterator[dict[str, Any]]:
        """Every combination of knob values (fixed settings included), conditions not applied."""
        names = list(self.knobs)
        for combo in itertools.product(*(self.knobs[n].values() for n in names)):
            yield self.resolve({**self.fixed, **dict(zip(names, combo))})

    def grid_size(self) -> int:
        size = 1
        for knob in self.knobs.values():
            size *= len(knob.values())
        return size

    def search_space_for_grid(self) -> dict[str, list[Any]]:
        return {n: k.values() for n, k in self.knobs.items()}

    def to_dict(self) -> dict[str, Any]:
        """What the space is (a study's identity): not where its file was read from, which differs between a
        relative and an absolute path to the same file, or between two hosts."""
        return {"name": self.name, "fixed": self.fixed,
                "knobs": {n: {k: v for k, v in vars(kn).items() if v not in (None, (), False) and k != "name"}
                          for n, kn in self.knobs.items()},
                "conditions": [c.text for c in self.conditions]}


def resolve_space_path(name_or_path: str | Path) -> Path:
    """A path, or the name of a shipped space in search_spaces/ (with or without .yaml)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    for candidate in (SPACES_DIR / f"{name_or_path}.yaml", SPACES_DIR / str(name_or_path)):
        if candidate.exists():
            return candidate
    shipped = sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))
    raise UserError(f"no such search space file; shipped spaces: {shipped}", source=str(name_or_path))


DEPLOYMENT_KEY = "replicas"


def refuse_replicas(source: str | None, key: str) -> None:
    """Replicas are a deployment decision, not a search dimension: a UserError saying so and what happens instead."""
    raise UserError("replicas are a deployment decision, not a search dimension: the study measures one server of "
                    "each (tensor_parallel_size, pipeline_parallel_size) candidate, ranks it per GPU, and the "
                    "emitted config fills the node's GPUs with replicas of the winner; remove this key",
                    source=source, key=key)


def load_space(name_or_path: str | Path) -> SearchSpace:
    path = resolve_space_path(name_or_path)
    return parse_space(read_yaml(path, "search space"), str(path), default_name=path.stem)


def parse_space(data: Any, source: str, default_name: str = "space") -> SearchSpace:
    if not isinstance(data, dict):
        raise UserError(f"a search space is a mapping with keys {list(SPACE_KEYS)}", source=source)
    unknown = set(data) - set(SPACE_KEYS)
    if unknown:
        raise UserError(f"unknown key(s) {sorted(unknown)}; allowed: {list(SPACE_KEYS)}", source=source)
    knobs_data = data.get("knobs") or {}
    if not isinstance(knobs_data, dict):
        raise UserError("must be a mapping of setting name -> knob", source=source, key="knobs")
    fixed = data.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise UserError("must be a mapping of setting name -> value", source=source, key="fixed")
    for section, keys in (("knobs", knobs_data), ("fixed", fixed)):
        if DEPLOYMENT_KEY in keys:
            refuse_replicas(source, f"{section}.{DEPLOYMENT_KEY}")
    both = set(fixed) & set(knobs_data)
    if both:
        raise UserError(f"{sorted(both)} are both fixed and knobs; keep one", source=source, key="fixed")
    knobs = {str(name): parse_knob(str(name), spec, source) for name, spec in knobs_data.items()}
    conds = data.get("conditions") or []
    if not isinstance(conds, list):
        raise UserError("must be a list of expressions", source=source, key="conditions")
    conditions = [parse_condition(text, source, i) for i, text in enumerate(conds)]
    for name, knob in knobs.items():
        if name != MODEL_MAX_KEY and MODEL_MAX in knob.choices:
            raise UserError(f"'{MODEL_MAX}' is a value of {MODEL_MAX_KEY} only", source=source, key=f"knobs.{name}")
    for name, value in fixed.items():
        if name != MODEL_MAX_KEY and value == MODEL_MAX:
            raise UserError(f"'{MODEL_MAX}' is a value of {MODEL_MAX_KEY} only", source=source, key=f"fixed.{name}")
    check_harness_values(fixed, source, "fixed")
    for name, knob in knobs.items():
        if name in COUNT_KEYS:
            if knob.type not in ("int", "categorical"):
                raise UserError(f"a count takes type int or categorical, got {knob.type}", source=source,
                                key=f"knobs.{name}")
            for value in knob.values():
                check_harness_values({name: value}, source, "knobs")
    return SearchSpace(name=str(data.get("name") or default_name), source=source, knobs=knobs, fixed=dict(fixed),
                       conditions=conditions, description=str(data.get("description") or ""))
