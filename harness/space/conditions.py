"""Conditions between knobs, written once in the space file and enforced before any launch.

A condition is a small Python-like boolean expression over setting names, e.g.
`max_num_seqs <= max_num_batched_tokens` or `enable_chunked_prefill or max_num_batched_tokens >= max_model_len`.
It is parsed with `ast` and evaluated by a whitelist walker: config values never reach `eval`.
"""

from __future__ import annotations

import ast
import operator
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from harness.errors import UserError

_BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_CMPOPS: dict[type, Callable[[Any, Any], bool]] = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
    ast.Is: operator.is_, ast.IsNot: operator.is_not,
}
_FUNCS: dict[str, Callable[..., Any]] = {"min": min, "max": max, "abs": abs}


class Undefined(Exception):
    """A condition names a setting the candidate does not set: vLLM's default decides, so the condition is skipped."""


@dataclass(frozen=True)
class Condition:
    text: str
    tree: ast.Expression

    @property
    def names(self) -> set[str]:
        return {n.id for n in ast.walk(self.tree) if isinstance(n, ast.Name) and n.id not in _FUNCS
                and n.id not in ("true", "false", "null", "None", "True", "False")}

    def holds(self, settings: Mapping[str, Any]) -> bool:
        """True when satisfied, or when it names a setting this candidate leaves to vLLM's default."""
        try:
            return bool(_eval(self.tree.body, settings))
        except Undefined:
            return True


def parse_condition(text: str, source: str, index: int) -> Condition:
    key = f"conditions[{index}]"
    if not isinstance(text, str) or not text.strip():
        raise UserError("a condition must be a non-empty expression string", source=source, key=key)
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise UserError(f"cannot parse {text!r}: {exc.msg}", source=source, key=key) from None
    for node in ast.walk(tree):
        allowed = (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.USub, ast.BinOp,
                   ast.Compare, ast.Name, ast.Load, ast.Constant, ast.Call, ast.Tuple, ast.List,
                   *_BINOPS, *_CMPOPS)
        if not isinstance(node, allowed):
            raise UserError(f"{text!r} uses {type(node).__name__}; allowed: comparisons, and/or/not, arithmetic, "
                            f"min/max/abs, literals and setting names", source=source, key=key)
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in _FUNCS):
            raise UserError(f"{text!r} calls a function other than {sorted(_FUNCS)}", source=source, key=key)
    return Condition(text, tree)


def _eval(node: ast.AST, env: Mapping[str, Any]) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id in ("true", "True"):
            return True
        if node.id in ("false", "False"):
            return False
        if node.id in ("null", "None"):
            return None
        if node.id not in env or env[node.id] is None:
            raise Undefined(node.id)
        return env[node.id]
    if isinstance(node, ast.BoolOp):
        if isinstance(node.op, ast.And):
            return all(_eval(v, env) for v in node.values)
        # `a or b`: one defined true operand is enough
        undefined = False
        for v in node.values:
            try:
                if _eval(v, env):
                    return True
            except Undefined:
                undefined = True
        if undefined:
            raise Undefined("or")
        return False
    if isinstance(node, ast.UnaryOp):
        value = _eval(node.operand, env)
        return (not value) if isinstance(node.op, ast.Not) else -value
    if isinstance(node, ast.BinOp):
        return _BINOPS[type(node.op)](_eval(node.left, env), _eval(node.right, env))
    if isinstance(node, ast.Compare):
        left = _eval(node.left, env)
        for op, comp in zip(node.ops, node.comparators):
            right = _eval(comp, env)
            if not _CMPOPS[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.Call):
        return _FUNCS[node.func.id](*(_eval(a, env) for a in node.args))  # type: ignore[attr-defined]
    if isinstance(node, (ast.Tuple, ast.List)):
        return [_eval(e, env) for e in node.elts]
    raise AssertionError(f"unexpected node {node!r}")  # parse_condition rejects everything else
