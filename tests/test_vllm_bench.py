"""`vllm bench serve` next to our client on the same requests (`harness.measure.vllm_bench`), against a fake whose
timing is known: both tools must read the fake's own first-token delay and pace."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from capacity_fake import CapacityConfig, CapacityFake
from harness.load.client import Target
from harness.load.prompts import build_requests
from harness.load.tokenizer import load_tokenizer
from harness.load.workload import parse_workload
from harness.measure.vllm_bench import ReplayArrival, vllm_schedule


def test_our_replay_of_vllms_schedule_starts_at_its_first_request() -> None:
    offsets = vllm_schedule(20, 4.0, 1.0, 0)
    assert offsets[0] > 0 and offsets[-1] == pytest.approx(20 / 4.0)  # vLLM waits its first gap, spans N / rate
    replay = ReplayArrival(offsets, 4.0).schedule(20)
    assert replay[0] == 0.0 and np.allclose(np.diff(replay), np.diff(offsets))
    assert np.array_equal(vllm_schedule(20, 4.0, 1.0, 0), offsets)  # the global numpy state is left as it was


@pytest.mark.slow
def test_both_tools_read_the_fakes_known_timing(tiny_model: Path, tmp_path: Path) -> None:
    from harness.measure.vllm_bench import cross_check

    config = CapacityConfig(slots=16, prefill_s=0.05, token_s=0.01, tokens_per_chunk=1, model=str(tiny_model))
    workload = parse_workload({"name": "x", "api": "completions", "ignore_eos": True, "input_len": 16,
                               "output_len": 8}, source="test")
    requests = build_requests(workload, load_tokenizer(str(tiny_model)), 12, seed=1)
    with CapacityFake(config) as fake:
        got = cross_check(Target(fake.url, None), str(tiny_model), str(tiny_model), requests, 4.0, tmp_path)
    for tool in ("ours", "vllm"):
        row = got[tool]
        assert row["completed"] == 12 and row["failed"] == 0, (tool, row)
        assert 50.0 <= row["ttft_p50"] <= 120.0, (tool, row)  # the fake's 50 ms to the first token, plus the way
        assert 9.0 <= row["tpot_mean"] <= 25.0, (tool, row)  # its 10 ms per token
    # the medians agree (12 requests each: one stall of either client on a loaded machine moves a mean, not them)
    assert 0.8 <= got["ours_over_vllm"]["ttft_p50"] <= 1.25, got["ours_over_vllm"]
    # the same requests: the same work, request by request, as the server counted it for each tool
    assert got["same_prompts"] and got["same_lengths"]
    # (the fake counts a prompt's words as its tokens)
    words = sum(len(q.prompt.split()) for q in requests)
    assert got["work"]["ours"] == got["work"]["vllm"] == {"prompt_tokens": words, "output_tokens": 12 * 8}


def test_the_studys_cross_check_sets_are_the_same_work_in_other_tokens(tiny_model: Path, tmp_path: Path) -> None:
    """vLLM's client gets set 1, ours set 0 (a prefix cache must not serve one tool's run from the other's): the
    same lengths request by request, other prompts. Sets drawn with other lengths made vLLM's run on the H200 3.8%
    more prompt tokens, and its TPOT read 10% higher than ours for that reason alone."""
    from harness.plan import detect_hardware
    from harness.study.sweepfile import DEMO_SWEEP, parse_sweep
    from harness.study.tune import build_context

    sweep = parse_sweep({**DEMO_SWEEP, "models": [{"name": "tiny", "model": str(tiny_model)}],
                         "workload": "chat-mix"}, "s.yaml")
    ctx, _ = build_context(sweep, sweep.models[0], str(tiny_model), detect_hardware("CPU"), 1, tmp_path)
    assert ctx.completion_requests is not None
    ours, theirs = ctx.completion_requests(40, 0), ctx.completion_requests(40, 1)
    assert [(q.prompt_tokens, q.max_tokens) for q in ours] == [(q.prompt_tokens, q.max_tokens) for q in theirs]
    assert all(a.prompt != b.prompt and a.prompt[:20] != b.prompt[:20] for a, b in zip(ours, theirs))
    assert all(q.prompt is not None and q.ignore_eos for q in ours)  # raw prompts: vLLM's tool sends completions
