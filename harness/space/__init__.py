"""Search spaces: which settings the tuner varies, over what ranges, under which conditions."""

from harness.space.conditions import Condition, parse_condition
from harness.space.knobs import Knob, parse_knob
from harness.space.spec import SearchSpace, load_space, resolve_space_path

__all__ = ["Condition", "Knob", "SearchSpace", "load_space", "parse_condition", "parse_knob", "resolve_space_path"]
