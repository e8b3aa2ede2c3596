"""Workload YAML (presets, errors), exact-length prompts with real tokenizers, and arrival schedules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harness.errors import UserError
from harness.load.arrival import Arrival
from harness.load.prompts import build_requests, word_token_ids
from harness.load.workload import PRESET_DIR, list_presets, load_workload, parse_workload

# ---------------------------------------------------------------------------------------------- YAML


def test_presets_load() -> None:
    names = list_presets()
    for required in ("chat-short", "chat-mix", "chat-long", "summarize", "prefix-heavy", "tiny-cpu"):
        assert required in names
    for name in names:
        w = load_workload(name)
        assert w.name == name and w.api in ("completions", "chat")
        assert w.max_total_tokens() is not None
        d = w.to_dict()
        assert json.loads(json.dumps(d)) == d
    tiny = load_workload("tiny-cpu")
    assert tiny.max_total_tokens() is not None and tiny.max_total_tokens() <= 256  # type: ignore[operator]
    assert load_workload("prefix-heavy").shared_prefix_len > 0
    assert load_workload(PRESET_DIR / "chat-short.yaml").name == "chat-short"


def write(tmp_path: Path, text: str, name: str = "w.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


BASE = "api: completions\ninput_len: {dist: uniform, min: 10, max: 20}\noutput_len: {dist: fixed, value: 8}\n"


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("api: [unclosed\n", ["malformed YAML", "line"]),
        (BASE + "colour: red\n", ["colour", "unknown key", "allowed keys", "shared_prefix_len"]),
        (BASE.replace("completions", "embeddings"), ["api", "embeddings", "completions, chat"]),
        (BASE.replace("min: 10", "min: -5"), ["input_len.min", ">= 1"]),
        (BASE.replace("value: 8", "value: 0"), ["output_len.value", ">= 1"]),
        (BASE.replace("min: 10, max: 20", "min: 30, max: 20"), ["input_len.min", "greater than max"]),
        (BASE.replace("dist: uniform", "dist: zipf"), ["input_len.dist", "zipf", "fixed, uniform, normal, dataset"]),
        (BASE.replace("dist: uniform, min: 10", "dist: uniform, mean: 3, min: 10"),
         ["input_len.mean", "allowed keys", "min"]),
        (BASE.replace("{dist: fixed, value: 8}", "{dist: normal, mean: 8, std: 2, min: 1}"), ["output_len.max"]),
        ("input_len: 5\noutput_len: 5\n", ["api", "required"]),
        (BASE + "shared_prefix_len: 10\n", ["shared_prefix_len", "shortest prompt"]),
        (BASE + "ignore_eos: maybe\n", ["ignore_eos", "true, false"]),
        ("- a\n- b\n", ["mapping"]),
    ],
)
def test_yaml_errors_are_one_line(tmp_path: Path, text: str, fragments: list[str]) -> None:
    p = write(tmp_path, text)
    with pytest.raises(UserError) as info:
        load_workload(p)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(str(p))
    for f in fragments:
        assert f in msg, msg


def test_unknown_preset_lists_presets() -> None:
    with pytest.raises(UserError, match="presets: .*chat-short"):
        load_workload("no-such-workload")


def test_distributions_sample_in_bounds() -> None:
    w = parse_workload(
        {"api": "completions", "input_len": {"dist": "normal", "mean": 100, "std": 50, "min": 60, "max": 120},
         "output_len": 7, "seed": 3}
    )
    rng = np.random.default_rng(0)
    _, ins, outs = w.sample_lengths(rng, 2000)
    assert min(ins) == 60 and max(ins) == 120  # clipped to [min, max]
    assert set(outs) == {7}
    narrow = parse_workload(
        {"api": "completions", "input_len": {"dist": "normal", "mean": 100, "std": 10, "min": 1, "max": 1000},
         "output_len": 7}
    )
    _, ins, _ = narrow.sample_lengths(rng, 4000)
    assert float(np.mean(ins)) == pytest.approx(100, abs=0.6)
    assert float(np.std(ins)) == pytest.approx(10, rel=0.05)
    u = parse_workload({"api": "chat", "input_len": {"dist": "uniform", "min": 5, "max": 7}, "output_len": 3})
    _, ins, _ = u.sample_lengths(np.random.default_rng(0), 600)
    assert set(ins) == {5, 6, 7}  # both ends included


def test_dataset_distribution(tmp_path: Path, tiny_tokenizer: Any) -> None:
    rows = [{"prompt": "Summarize the following: zaba kelo muti", "output_len": 5},
            {"prompt": "Translate: pano reke", "output_len": 9}]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    p = write(tmp_path, "api: completions\ninput_len: {dist: dataset, path: data.jsonl}\n"
                        "output_len: {dist: dataset, path: data.jsonl}\n")
    w = load_workload(p)
    assert w.input_len.field == "prompt" and w.max_input_tokens() is None and w.verbatim_prompts
    reqs = build_requests(w, tiny_tokenizer, 6)
    by_prompt = {r["prompt"]: r["output_len"] for r in rows}
    for r in reqs:
        assert r.prompt in by_prompt and r.max_tokens == by_prompt[r.prompt]  # pairs stay paired
        assert r.prompt_tokens == len(tiny_tokenizer(r.prompt).input_ids)
    assert {r.prompt for r in reqs[:2]} == set(by_prompt)  # each line once before any repeats

    (tmp_path / "lens.jsonl").write_text('{"input_len": 40, "output_len": 4}\n{"input_len": 50, "output_len": 6}\n')
    w2 = load_workload(write(tmp_path, "api: completions\ninput_len: {dist: dataset, path: lens.jsonl}\n"
                                       "output_len: {dist: dataset, path: lens.jsonl}\n", "w2.yaml"))
    assert w2.max_total_tokens() == 56 and not w2.verbatim_prompts
    for r in build_requests(w2, tiny_tokenizer, 4):
        assert (r.prompt_tokens, r.max_tokens) in ((40, 4), (50, 6))
        assert len(tiny_tokenizer(r.prompt).input_ids) == r.prompt_tokens

    (tmp_path / "bad.jsonl").write_text('{"input_len": 40}\n{"input_len": -1}\n')
    with pytest.raises(UserError, match="bad.jsonl: input_len: line 2"):
        load_workload(write(tmp_path, "api: completions\ninput_len: {dist: dataset, path: bad.jsonl}\n"
                                      "output_len: 4\n", "w3.yaml"))
    with pytest.raises(UserError, match="input_len.path: dataset file not found"):
        load_workload(write(tmp_path, "api: completions\ninput_len: {dist: dataset, path: none.jsonl}\n"
                                      "output_len: 4\n", "w4.yaml"))


# ---------------------------------------------------------------------------------------------- prompts


def _server_ids(tok: Any, spec: Any) -> list[int]:
    """What vLLM tokenizes: the prompt with special tokens, or the rendered chat template without."""
    if spec.messages is not None:
        text = tok.apply_chat_template(spec.messages, tokenize=False, add_generation_prompt=True)
        return list(tok(text, add_special_tokens=False).input_ids)
    return list(tok(spec.prompt).input_ids)


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
@pytest.mark.parametrize("api", ["completions", "chat"])
def test_prompt_lengths_exact(kind: str, api: str, tiny_tokenizer: Any, tiny_tokenizer_metaspace: Any) -> None:
    tok = tiny_tokenizer if kind == "bytelevel" else tiny_tokenizer_metaspace
    w = parse_workload({"api": api, "input_len": {"dist": "uniform", "min": 40, "max": 700},
                        "output_len": {"dist": "uniform", "min": 1, "max": 50}, "seed": 5})
    reqs = build_requests(w, tok, 400)
    _, want, outs = w.sample_lengths(np.random.default_rng(5), 400)
    for spec, n, out in zip(reqs, want, outs):
        assert spec.prompt_tokens == n
        assert len(_server_ids(tok, spec)) == n  # verified with the tokenizer itself, every prompt
        assert spec.max_tokens == out and spec.ignore_eos
        assert (spec.prompt is None) == (api == "chat")


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
@pytest.mark.parametrize("api", ["completions", "chat"])
def test_shared_prefix_tokens_identical(kind: str, api: str, tiny_tokenizer: Any,
                                        tiny_tokenizer_metaspace: Any) -> None:
    tok = tiny_tokenizer if kind == "bytelevel" else tiny_tokenizer_metaspace
    k = 64
    w = parse_workload({"api": api, "input_len": {"dist": "uniform", "min": 100, "max": 300}, "output_len": 4,
                        "shared_prefix_len": k})
    reqs = build_requests(w, tok, 50)
    ids = [_server_ids(tok, r) for r in reqs]
    if api == "chat":  # tokens before the content: the template's head
        rendered = tok.apply_chat_template([{"role": "user", "content": "X"}], tokenize=False,
                                           add_generation_prompt=True)
        head = len(tok(rendered.split("X")[0], add_special_tokens=False).input_ids)
    else:  # BOS
        head = len(tok("").input_ids)
    common = min(next((i for i, (a, b) in enumerate(zip(ids[0], x)) if a != b), len(x)) for x in ids[1:])
    assert common >= head + k  # the first k content tokens are the same in every prompt
    assert common < head + k + 4  # and the rest is not (chance matches of a word or two aside)
    for spec, x in zip(reqs, ids):
        assert len(x) == spec.prompt_tokens


@pytest.fixture(scope="module")
def nosplit_tokenizer() -> Any:
    from conftest import make_tiny_tokenizer

    return make_tiny_tokenizer("nosplit")


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_prompt_lengths_exact_with_multiword_tokens(api: str, nosplit_tokenizer: Any) -> None:
    """A vocabulary with tokens spanning words: the fast path's proof does not hold, every prompt is counted."""
    from harness.load.prompts import _vocab

    tok = nosplit_tokenizer
    assert not _vocab(tok).additive
    w = parse_workload({"api": api, "input_len": {"dist": "uniform", "min": 60, "max": 300}, "output_len": 4,
                        "shared_prefix_len": 16, "seed": 2})
    reqs = build_requests(w, tok, 40)
    _, want, _ = w.sample_lengths(np.random.default_rng(2), 40)
    ids = [_server_ids(tok, r) for r in reqs]
    for spec, n, x in zip(reqs, want, ids):
        assert spec.prompt_tokens == n == len(x)
    common = min(next((i for i, (a, b) in enumerate(zip(ids[0], x)) if a != b), len(x)) for x in ids[1:])
    assert common >= 16


def test_the_fast_paths_proof_stays_within_the_tokenizers_maximum_length(capfd: pytest.CaptureFixture[str]) -> None:
    """GPT-2's tokenizer says 1024 tokens at most: the additivity proof encodes no longer text (transformers warns
    of "indexing errors" on one, in every DialoGPT sweep's log), and still proves the fast path."""
    from conftest import make_tiny_tokenizer
    from harness.load.prompts import _vocab

    tok = make_tiny_tokenizer("bytelevel")
    tok.model_max_length = 1024
    capfd.readouterr()
    assert _vocab(tok).additive
    # transformers flags the tokenizer when it warns (its log handler may write to a stream pytest captured
    # earlier, so the flag is the check that holds in a full run; the output, when this test runs alone)
    assert not getattr(tok, "deprecation_warnings", {}).get("sequence-length-is-longer-than-the-specified-maximum")
    assert "longer than the specified maximum" not in "".join(capfd.readouterr())
    reqs = build_requests(load_workload("tiny-cpu"), tok, 5)
    assert all(r.prompt_tokens == len(_server_ids(tok, r)) for r in reqs)


def test_prompts_deterministic(tiny_tokenizer: Any) -> None:
    w = load_workload("tiny-cpu")
    a = build_requests(w, tiny_tokenizer, 20)
    b = build_requests(w, tiny_tokenizer, 20)
    c = build_requests(w, tiny_tokenizer, 20, seed=99)
    assert [x.prompt for x in a] == [x.prompt for x in b]
    assert [x.prompt for x in a] != [x.prompt for x in c]
    assert len({x.prompt for x in a}) == 20


def test_chat_without_template_is_a_user_error() -> None:
    from conftest import make_tiny_tokenizer

    tok = make_tiny_tokenizer("metaspace", chat_template=False)
    w = load_workload("chat-short")
    with pytest.raises(UserError, match="no chat template; use api: completions"):
        build_requests(w, tok, 2)
    assert build_requests(load_workload("tiny-cpu"), tok, 2)[0].prompt


def test_prompt_too_short_for_template(tiny_tokenizer: Any) -> None:
    w = parse_workload({"api": "chat", "input_len": 5, "output_len": 4})
    with pytest.raises(UserError, match="input_len: a prompt of 5 tokens leaves no room"):
        build_requests(w, tiny_tokenizer, 1)


def test_word_tokens_are_ordinary(tiny_tokenizer: Any) -> None:
    ids = word_token_ids(tiny_tokenizer)
    assert len(ids) >= 64
    assert not set(ids.tolist()) & set(tiny_tokenizer.all_special_ids)


# ---------------------------------------------------------------------------------------------- arrival


def test_poisson_schedule_rate_and_variance() -> None:
    a = Arrival(mode="poisson", rate=20.0, seed=7)
    off = a.schedule(5001)
    assert off[0] == 0.0
    assert off[-1] == pytest.approx(5000 / 20.0)  # rescaled to the exact rate, as vllm bench serve does
    gaps = np.diff(off)
    assert gaps.mean() == pytest.approx(1 / 20.0)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)  # exponential: CV 1
    # unscaled (duration mode) the mean rate is right too
    d = Arrival(mode="poisson", rate=20.0, duration_s=200.0, seed=8).schedule(10_000)
    assert len(d) / 200.0 == pytest.approx(20.0, rel=0.05)
    assert d[-1] < 200.0


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_burstiness(burstiness: float) -> None:
    a = Arrival(mode="gamma", rate=10.0, burstiness=burstiness, seed=1)
    gaps = np.diff(a.schedule(20_001))
    assert gaps.mean() == pytest.approx(0.1)
    # gamma(shape=b, scale=1/(rate*b)): variance 1/(b * rate^2), CV = 1/sqrt(b)
    assert gaps.var() == pytest.approx(1 / (burstiness * 10.0**2), rel=0.08)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / np.sqrt(burstiness), rel=0.05)


def test_closed_loop_schedule_and_dict() -> None:
    a = Arrival(mode="concurrency", max_concurrency=8, num_requests=100)
    assert not a.open_loop and (a.schedule(5) == 0).all()
    assert Arrival.from_dict(a.to_dict()) == a
    assert Arrival(mode="poisson", rate=5, duration_s=10).requests_needed() == 63


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"mode": "poisson", "rate": 0}, "rate"),
        ({"mode": "poisson", "rate": -3}, "rate"),
        ({"mode": "gamma"}, "rate"),
        ({"mode": "gamma", "rate": 2, "burstiness": 0}, "burstiness"),
        ({"mode": "poisson", "rate": 2, "burstiness": 2}, "burstiness"),
        ({"mode": "concurrency"}, "max_concurrency"),
        ({"mode": "concurrency", "max_concurrency": 0}, "max_concurrency"),
        ({"mode": "concurrency", "max_concurrency": 2, "rate": 3}, "rate"),
        ({"mode": "burst", "rate": 2}, "mode"),
        ({"mode": "poisson", "rate": 2, "duration_s": -1}, "duration_s"),
    ],
)
def test_arrival_errors(kwargs: dict[str, Any], key: str) -> None:
    with pytest.raises(UserError) as info:
        Arrival(**kwargs)
    assert info.value.key == key
    with pytest.raises(UserError, match="sweep.yaml"):
        Arrival.from_dict(kwargs, source="sweep.yaml")


def test_another_prompt_set_keeps_the_lengths_and_changes_every_prompt(tiny_tokenizer: Any) -> None:
    # a second client's set: the same work (lengths), nothing a prefix cache could serve from the first set's run
    w = load_workload("chat-mix")
    a = build_requests(w, tiny_tokenizer, 12, seed=5)
    b = build_requests(w, tiny_tokenizer, 12, seed=5, prompt_set=1)
    assert [(x.prompt_tokens, x.max_tokens) for x in a] == [(x.prompt_tokens, x.max_tokens) for x in b]
    for x, y in zip(a, b):
        ids_x, ids_y = _server_ids(tiny_tokenizer, x), _server_ids(tiny_tokenizer, y)
        assert len(ids_y) == y.prompt_tokens
        common = next((i for i, (p, q) in enumerate(zip(ids_x, ids_y)) if p != q), len(ids_x))
        assert common < 16, common  # not one 16-token block of the prompt is shared past the template
    assert build_requests(w, tiny_tokenizer, 12, seed=5, prompt_set=1)[0].messages == b[0].messages
    assert build_requests(w, tiny_tokenizer, 12, seed=5, prompt_set=2)[0].messages != b[0].messages
    assert not w.verbatim_prompts
