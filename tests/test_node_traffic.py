"""The sweep file's `traffic:` block: targets per model, and one-line errors naming the file and key."""

from __future__ import annotations

import pytest

from harness.errors import UserError
from harness.node.traffic import parse_traffic
from harness.records import SLO

MODELS = [("small", "org/Small"), ("big", "org/Big")]
SLO_ = SLO(ttft_ms=1000, tpot_ms=50)


def parse(raw):
    return parse_traffic(raw, MODELS, SLO_, "chat-mix", "sweep.yaml")


def test_rates_shares_slo_priority_workload():
    out = parse({"total_rps": 10, "models": {
        "small": {"share": 0.25, "priority": 2, "workload": "chat-short"},
        "org/Big": {"share": 0.75, "slo": {"tpot_ms": 100, "percentile": 90}}}})
    small, big = out
    assert (small.name, small.target_rps, small.priority, small.workload, small.share) == ("small", 2.5, 2,
                                                                                           "chat-short", 0.25)
    assert big.name == "big" and big.target_rps == 7.5 and big.slo == SLO(tpot_ms=100, percentile=90)
    assert small.slo == SLO_ and big.workload == "chat-mix"
    out = parse({"models": {"small": {"rps": 3}, "big": {"rps": 0}}})
    assert [t.target_rps for t in out] == [3.0, 0.0]


@pytest.mark.parametrize("raw, key, words", [
    (None, "traffic", "needs the expected traffic"),
    ({"models": {"nope": {"rps": 1}, "small": {"rps": 1}, "big": {"rps": 1}}}, "traffic.models.nope",
     "not a model of this sweep"),
    ({"models": {"small": {"rps": -1}, "big": {"rps": 1}}}, "traffic.models.small.rps", ">= 0"),
    ({"models": {"small": {"rps": 1}}}, "traffic.models", "no traffic for big"),
    ({"models": {"small": {"rps": 1, "share": 0.5}, "big": {"rps": 1}}}, "traffic.models.small", "exactly one"),
    ({"models": {"small": {"share": 0.5}, "big": {"rps": 1}}}, "traffic.models.small.share", "total_rps"),
    ({"total_rps": 10, "models": {"small": {"share": 0.5}, "big": {"share": 0.3}}}, "traffic.models", "add up to 0.8"),
    ({"total_rps": 10, "models": {"small": {"share": 1.5}, "big": {"rps": 1}}}, "traffic.models.small.share",
     "between 0 and 1"),
    ({"total_rps": 10, "models": {"small": {"share": 0.9}, "big": {"rps": 5}}}, "traffic.models", "exceed"),
    ({"total_rps": 10, "models": {"small": {"rps": 2}, "big": {"rps": 3}}}, "traffic.total_rps", "add up to 5"),
    ({"models": {"small": {"rps": 1, "priority": "high"}, "big": {"rps": 1}}}, "traffic.models.small.priority",
     "integer"),
    ({"models": {"small": {"rps": 1, "slo": {"tpot_ms": -5}}, "big": {"rps": 1}}}, "traffic.models.small.slo.tpot_ms",
     "positive"),
    ({"models": {"small": {"rps": 1, "burst": 2}, "big": {"rps": 1}}}, "traffic.models.small", "unknown key"),
    ({"models": {"small": {"rps": 0}, "big": {"rps": 0}}}, "traffic.models", "nothing to plan"),
    ({"models": {"small": {"rps": 1}, "org/Small": {"rps": 2}, "big": {"rps": 1}}}, "traffic.models.org/Small",
     "twice"),
    ({"total_rps": -3, "models": {}}, "traffic.total_rps", "positive"),
])
def test_bad_traffic_is_one_line_naming_file_and_key(raw, key, words):
    with pytest.raises(UserError) as exc:
        parse(raw)
    msg = str(exc.value)
    assert msg.startswith(f"sweep.yaml: {key}: ") and words in msg and "\n" not in msg


def test_the_sweep_file_accepts_traffic(tmp_path):
    from harness.node.inputs import load_inputs
    from harness.study.sweepfile import load_sweep

    path = tmp_path / "s.yaml"
    path.write_text("models: [org/Small]\nspace: l40s-4x\nworkload: chat-mix\n"
                    "objective: {kind: capacity, slo: {tpot_ms: 50}}\ntraffic: {models: {small: {rps: 2}}}\n")
    assert load_sweep(path).models[0].name == "small"  # harness.sweep reads the same file
    inputs = load_inputs(path)
    assert inputs.traffic[0].target_rps == 2 and inputs.traffic[0].slo.tpot_ms == 50
