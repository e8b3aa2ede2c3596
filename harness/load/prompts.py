"""Exact-length prompts from the model's own tokenizer.

A latency number is only comparable across configurations if every run sends the same token counts, so prompts are
built to an exact length as the *server* counts it: for the completions API `len(tokenizer(prompt).input_ids)`
(special tokens such as BOS included, as vLLM adds them), for the chat API the rendered chat template tokenized
without special tokens (what vLLM's chat endpoint does). The template's tokens are part of the length, the same
convention as `vllm bench serve --dataset-name random` (which subtracts the special tokens from its input length).

Method: draw random ids from the tokenizer's ordinary word tokens (a word-start marker `Ġ`/`▁` followed by ASCII
letters, each checked to decode -> encode back to itself next to itself), turn them into text, count the tokens of
the exact request form with the tokenizer and add or drop words until the count matches.

Counting every prompt in full costs a full tokenization of every token (seconds for thousands of long prompts), so
when it is provably unnecessary it is not done: if no vocabulary entry contains a letter followed by a word marker,
no token can span two words, and the tokenization of a run of such words is the concatenation of the words' own
tokens (true for BPE, which can only merge within a word, and for Unigram's best segmentation alike). Then only the
two ends of a prompt can differ from one token per word (the template or BOS next to the first word, the last word
next to the template's tail), so the tokenizer counts a window of the first and last three words in the request
form, and the middle adds exactly one token per word. A sample of prompts is still counted in full as a check; a
mismatch (or a tokenizer that fails the vocabulary test, e.g. one with multi-word tokens) falls back to counting
every prompt in full. Tokenizers without word-marker tokens fall back to unmarked letter tokens, and vocabularies
whose tokens span words to any letter tokens, always on the counted-in-full path.

Shared prefix: the same `shared_prefix_len` words start every prompt's content, chosen so that they are exactly
that many tokens in the request form, so the server's prefix cache sees identical token blocks.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from harness.errors import UserError
from harness.load.workload import Workload

_MAX_FIX_PASSES = 12
_CANDIDATE_SAMPLE = 8192
_WINDOW = 3  # words counted at each end of a prompt on the fast path
_CHECK_SAMPLE = 16  # prompts counted in full after the fast path (the first and the longest)
_PLACEHOLDER = "PROMPTPLACEHOLDERXQZ"


@dataclass
class RequestSpec:
    """One request to send: completions `prompt` or chat `messages`, its exact token count and `max_tokens`."""

    prompt: str | None
    messages: list[dict[str, str]] | None
    prompt_tokens: int  # as the server will count it (special / template tokens included)
    max_tokens: int
    ignore_eos: bool = True

    @property
    def api(self) -> str:
        return "chat" if self.messages is not None else "completions"


# ---------------------------------------------------------------------------------------------- vocabulary


@dataclass
class _Vocab:
    """Word tokens usable in prompts, with the text each adds at the start of a text and after another word."""

    ids: np.ndarray  # token ids
    first: np.ndarray  # object array of str: decode([id])
    mid: np.ndarray  # object array of str: what decode([x, id]) adds after decode([x])
    additive: bool  # no vocabulary entry can span a word boundary (see module docstring)


_VOCAB_CACHE: weakref.WeakKeyDictionary[Any, _Vocab] = weakref.WeakKeyDictionary()


def _decode_batch(tokenizer: Any, seqs: list[list[int]]) -> list[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return list(backend.decode_batch(seqs, skip_special_tokens=False))
    return [tokenizer.decode(s) for s in seqs]


def word_token_ids(tokenizer: Any) -> np.ndarray:
    """Ids of ordinary word tokens that re-encode to themselves next to each other (cached per tokenizer)."""
    return _vocab(tokenizer).ids


def _vocab(tokenizer: Any) -> _Vocab:
    try:
        cached = _VOCAB_CACHE.get(tokenizer)
    except TypeError:  # not weak-referenceable
        cached = None
    if cached is not None:
        return cached
    vocab: dict[str, int] = tokenizer.get_vocab()
    excluded = set(getattr(tokenizer, "all_special_ids", []) or [])
    try:
        excluded |= set(tokenizer.get_added_vocab().values())
    except (AttributeError, NotImplementedError):
        pass

    def pick(marked: bool | None) -> list[int]:
        out = []
        for tok, idx in vocab.items():
            if idx in excluded:
                continue
            if marked is None:  # loose: letters with word markers anywhere (vocabularies with multi-word tokens)
                core = tok.replace("\u0120", "").replace("\u2581", "")
                if core and core.isascii() and core.isalpha():
                    out.append(idx)
            elif marked:
                if len(tok) >= 3 and tok[0] in "\u0120\u2581" and tok[1:].isascii() and tok[1:].isalpha():
                    out.append(idx)
            elif len(tok) >= 2 and tok.isascii() and tok.isalpha():
                out.append(idx)
        return sorted(out)

    # Best: word-marker tokens that survive decode -> encode next to themselves; then unmarked letter tokens;
    # last (vocabularies whose tokens span words): any of them that survives decode -> encode alone. Only the
    # first kind can take the fast path; the others are fitted by counting every prompt in full.
    kept: list[int] = []
    marked_words = False
    tiers: list[tuple[bool | None, bool | None]] = [(True, True), (False, True), (True, False), (False, False),
                                                    (None, None)]
    for marked, paired in tiers:
        cand = pick(marked)
        if len(cand) > _CANDIDATE_SAMPLE:
            cand = sorted(np.random.default_rng(0).choice(cand, _CANDIDATE_SAMPLE, replace=False).tolist())
        if not cand:
            continue
        if paired is None:
            ok = cand  # unverified: every prompt is counted in full anyway
        else:
            probe = [[c, c] for c in cand] if paired else [[c] for c in cand]
            enc = tokenizer(_decode_batch(tokenizer, probe), add_special_tokens=False)["input_ids"]
            ok = [c for c, p, e in zip(cand, probe, enc) if list(e) == p]
        if len(ok) > len(kept):
            kept, marked_words = ok, bool(marked and paired)
        if len(ok) >= 64:
            break
    if len(kept) < 16:
        name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        raise UserError(f"tokenizer {name!r} has too few plain word tokens to build exact-length prompts")

    ids = np.array(kept, dtype=np.int64)
    first = _decode_batch(tokenizer, [[c] for c in kept])
    pairs = _decode_batch(tokenizer, [[c, c] for c in kept])
    mid = [p[len(f) :] if p.startswith(f) else p[len(p) // 2 :] for f, p in zip(first, pairs)]
    voc = _Vocab(ids=ids, first=np.array(first, dtype=object), mid=np.array(mid, dtype=object), additive=False)

    # Additivity: a token can only span two words if it contains a letter followed by a word-start marker.
    if marked_words:
        id_to_tok = {idx: tok for tok, idx in vocab.items()}
        markers = {id_to_tok[c][0] for c in kept}
        if not any(_spans_words(tok, m) for tok in vocab for m in markers):
            # The texts must also join: decode(seq) == first piece + following mid pieces, and round-trip. ~2048
            # random words, in sequences no longer than the tokenizer's own maximum: transformers warns of
            # "indexing errors" when it encodes a longer text (GPT-2's is 1024), which no prompt here is.
            length = max(16, min(512, int(getattr(tokenizer, "model_max_length", 512))))
            seqs = np.random.default_rng(1).integers(0, len(ids), size=(2048 // length, length))
            joined = [_join(voc.first, voc.mid, seq) for seq in seqs]
            ids_seqs = [ids[seq].tolist() for seq in seqs]
            voc.additive = (
                _decode_batch(tokenizer, ids_seqs) == joined
                and [list(e) for e in tokenizer(joined, add_special_tokens=False)["input_ids"]] == ids_seqs
            )
    try:
        _VOCAB_CACHE[tokenizer] = voc
    except TypeError:
        pass
    return voc


def _spans_words(token: str, marker: str) -> bool:
    """True when `token` holds a letter followed by a word marker, i.e. could cover the end of one word and the
    start of the next."""
    j = token.find(marker, 1)
    while j > 0:
        prev = token[j - 1]
        if prev.isascii() and prev.isalpha():
            return True
        j = token.find(marker, j + 1)
    return False


def _join(start: np.ndarray, mid: np.ndarray, seq: np.ndarray) -> str:
    """Text of a word sequence (indices into the vocabulary arrays)."""
    if len(seq) == 0:
        return ""
    return start[seq[0]] + "".join(mid[seq[1:]].tolist())


# ---------------------------------------------------------------------------------------------- request form


class _Form:
    """The exact request form of one API: how content becomes the token ids the server sees."""

    def __init__(self, tokenizer: Any, api: str) -> None:
        self.tok = tokenizer
        self.api = api
        self.head = ""
        self.tail = ""
        self.templated = False  # render the template per prompt (the placeholder split is not faithful)
        if api == "chat":
            if not getattr(tokenizer, "chat_template", None):
                name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
                raise UserError(
                    f"tokenizer {name!r} has no chat template; use api: completions for this model", key="api"
                )
            rendered = self.render(_PLACEHOLDER)
            if rendered.count(_PLACEHOLDER) == 1:
                self.head, self.tail = rendered.split(_PLACEHOLDER)
            else:
                self.templated = True

    def render(self, content: str) -> str:
        try:
            out = self.tok.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # jinja errors, raise_exception() in templates
            raise UserError(f"the tokenizer's chat template failed: {exc}", key="api") from None
        return str(out)

    def check_split(self, contents: list[str]) -> None:
        """Placeholder split must render exactly as the template does, else every prompt is rendered."""
        if self.api != "chat" or self.templated:
            return
        for c in contents:
            if self.render(c) != self.head + c + self.tail:
                self.templated = True
                return

    def texts(self, contents: list[str]) -> list[str]:
        if self.api != "chat":
            return contents
        if self.templated:
            return [self.render(c) for c in contents]
        return [self.head + c + self.tail for c in contents]

    def encode(self, contents: list[str]) -> list[list[int]]:
        if not contents:
            return []
        ids = self.tok(self.texts(contents), add_special_tokens=self.api != "chat")["input_ids"]
        return [list(x) for x in ids]

    def count(self, contents: list[str]) -> list[int]:
        return [len(x) for x in self.encode(contents)]


# ---------------------------------------------------------------------------------------------- building


def build_requests(workload: Workload, tokenizer: Any, n: int, seed: int | None = None,
                   prompt_set: int = 0) -> list[RequestSpec]:
    """Build `n` requests for `workload` with prompts of exact token length; deterministic for a seed.

    `tokenizer` is the served model's Hugging Face tokenizer (AutoTokenizer); `seed` defaults to the workload's.
    `prompt_set` k > 0: set 0's lengths (and dataset rows) in other prompt tokens, drawn from numpy's seed
    sequence [seed, k], a stream no plain seed draws: the same work, which a server's prefix cache cannot serve
    from a run of another set. Verbatim dataset prompts (`Workload.verbatim_prompts`) have no tokens to vary: their
    set k is other rows, so other lengths (a file of fewer than about twice n rows repeats some of set 0's).
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    if n == 0:
        return []
    where = workload.source or workload.name
    base = workload.seed if seed is None else seed
    other = [base, prompt_set] if prompt_set else None
    rng = np.random.default_rng(other if other and workload.verbatim_prompts else base)
    form = _Form(tokenizer, workload.api)
    rows, in_lens, out_lens = workload.sample_lengths(rng, n)
    if other and not workload.verbatim_prompts:
        rng = np.random.default_rng(other)
    voc = _vocab(tokenizer)
    probe_rng = np.random.default_rng(0)
    form.check_split([_join(voc.first, voc.mid, probe_rng.integers(0, len(voc.ids), 4)) for _ in range(2)]
                     + [_join(voc.mid, voc.mid, probe_rng.integers(0, len(voc.ids), 4))])
    overhead = form.count([""])[0]
    start = _choose_start(form, voc, overhead, probe_rng)
    k = workload.shared_prefix_len
    prefix = _choose_prefix(form, voc, start, overhead, k, rng)

    seqs: dict[int, np.ndarray] = {}
    targets: dict[int, int] = {}
    contents: list[str | None] = [None] * n
    for i in range(n):
        target = in_lens[i]
        if target is None:  # a dataset prompt text, sent verbatim after the shared prefix
            row = rows[i]
            assert row is not None and row.prompt is not None
            contents[i] = (_join(start, voc.mid, prefix) + " " + row.prompt) if k else row.prompt
            continue
        body = target - overhead - k
        if body < 1:
            what = "the chat template" if workload.api == "chat" else "special tokens"
            raise UserError(
                f"a prompt of {target} tokens leaves no room for content: {what} use {overhead} tokens"
                + (f" and the shared prefix {k}" if k else ""),
                source=where,
                key="input_len",
            )
        seqs[i] = np.concatenate([prefix, rng.integers(0, len(voc.ids), size=body)])
        targets[i] = target

    fit = _Fitter(form, voc, start, rng, prefix, where)
    texts: dict[int, str] = {}
    if seqs:
        fast = voc.additive and not form.templated
        if fast:
            texts = fit.run({i: s.copy() for i, s in seqs.items()}, targets, fit.window_count)
            by_len = sorted(texts, key=lambda i: targets[i])
            sample = sorted(set(sorted(texts)[: _CHECK_SAMPLE // 2] + by_len[-(_CHECK_SAMPLE // 2) :]))
            full = form.count([texts[i] for i in sample])
            if any(c != targets[i] for i, c in zip(sample, full)):
                fast = False
        if not fast:
            texts = fit.run(seqs, targets, fit.full_count, check_prefix=bool(k) and not form.templated)
    for i, text in texts.items():
        contents[i] = text

    verbatim = [i for i in range(n) if i not in targets]
    counts = dict(zip(verbatim, form.count([contents[i] for i in verbatim])))  # type: ignore[misc]
    specs = []
    for i, (content, out) in enumerate(zip(contents, out_lens)):
        assert content is not None
        messages = [{"role": "user", "content": content}] if workload.api == "chat" else None
        specs.append(
            RequestSpec(
                prompt=None if messages else content,
                messages=messages,
                prompt_tokens=targets[i] if i in targets else counts[i],
                max_tokens=int(out),
                ignore_eos=workload.ignore_eos,
            )
        )
    return specs


def _choose_start(form: _Form, voc: _Vocab, overhead: int, rng: np.random.Generator) -> np.ndarray:
    """Which text the first word takes (as decoded at the start, or with its leading space): the one that keeps
    it a single token in this request form most often (e.g. `▁`-tokenizers after a template's newline)."""
    best: tuple[int, np.ndarray] | None = None
    probes = [rng.integers(0, len(voc.ids), 3) for _ in range(16)]
    for start in (voc.first, voc.mid):
        counts = form.count([_join(start, voc.mid, p) for p in probes])
        clean = sum(c == overhead + 3 for c in counts)
        if best is None or clean > best[0]:
            best = (clean, start)
    assert best is not None
    return best[1]


def _choose_prefix(
    form: _Form, voc: _Vocab, start: np.ndarray, overhead: int, k: int, rng: np.random.Generator
) -> np.ndarray:
    """K words that are exactly K tokens in the request form, so the shared token prefix is exactly K long."""
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    prefix = rng.integers(0, len(voc.ids), size=k)
    for _ in range(64):
        if form.count([_join(start, voc.mid, prefix)])[0] == overhead + k:
            return prefix
        prefix = np.concatenate([rng.integers(0, len(voc.ids), size=1), prefix[1:-1], rng.integers(0, len(voc.ids), 1)])[:k]
    return prefix  # junction tokens merge in this form: the shared part is within a token or two of k


class _Fitter:
    """Adds or drops words in the middle of each prompt until the request form has the target token count."""

    def __init__(
        self, form: _Form, voc: _Vocab, start: np.ndarray, rng: np.random.Generator, prefix: np.ndarray, where: str
    ) -> None:
        self.form, self.voc, self.start, self.rng, self.prefix, self.where = form, voc, start, rng, prefix, where
        self._ref: list[int] | None = None
        self._last_ids: list[list[int]] = []

    def text(self, seq: np.ndarray) -> str:
        return _join(self.start, self.voc.mid, seq)

    def full_count(self, seqs: list[np.ndarray]) -> tuple[list[str], list[int]]:
        texts = [self.text(s) for s in seqs]
        self._last_ids = self.form.encode(texts)
        return texts, [len(x) for x in self._last_ids]

    def window_count(self, seqs: list[np.ndarray]) -> tuple[list[str], list[int]]:
        """Count only both ends in the request form; the middle is one token per word (proven additive)."""
        w = _WINDOW
        windows = [s if len(s) <= 2 * w else np.concatenate([s[:w], s[-w:]]) for s in seqs]
        counts = self.form.count([self.text(x) for x in windows])
        out = [c + len(s) - len(x) for s, x, c in zip(seqs, windows, counts)]
        return [self.text(s) for s in seqs], out

    def _prefix_ref(self) -> list[int]:
        """The request form's tokens up to the end of the shared prefix (slow path check)."""
        if self._ref is None:
            full = self.form.encode([self.text(self.prefix)])[0]
            tail = self.form.tail
            tail_len = len(self.form.tok(tail, add_special_tokens=False)["input_ids"]) if tail else 0
            self._ref = full[: len(full) - tail_len]
        return self._ref

    def run(
        self,
        seqs: dict[int, np.ndarray],
        targets: dict[int, int],
        counter: Callable[[list[np.ndarray]], tuple[list[str], list[int]]],
        *,
        check_prefix: bool = False,
    ) -> dict[int, str]:
        k = len(self.prefix)
        lo = max(k, 1)  # never drop prefix words or the first word
        vsize = len(self.voc.ids)
        done: dict[int, str] = {}
        pending = sorted(seqs)
        for attempt in range(_MAX_FIX_PASSES):
            if not pending:
                break
            texts, counts = counter([seqs[i] for i in pending])
            ref = self._prefix_ref() if check_prefix else []
            still = []
            for j, (i, text, got) in enumerate(zip(pending, texts, counts)):
                diff = got - targets[i]
                if diff == 0 and (not check_prefix or self._last_ids[j][: len(ref)] == ref):
                    done[i] = text
                    continue
                s = seqs[i]
                if diff == 0:  # the word after the prefix merged with it: replace that word
                    if len(s) > k:
                        s[k] = self.rng.integers(0, vsize)
                elif diff > 0:
                    keep = max(lo, len(s) - 1 - diff)
                    s = np.concatenate([s[:keep], s[-1:]]) if len(s) - 1 > keep else s[: max(lo, len(s) - diff)]
                else:
                    s = np.concatenate([s[:-1], self.rng.integers(0, vsize, size=-diff), s[-1:]]) if len(s) > lo \
                        else np.concatenate([s, self.rng.integers(0, vsize, size=-diff)])
                if attempt >= _MAX_FIX_PASSES // 2 and len(s) > lo:
                    s[-1] = self.rng.integers(0, vsize)  # break a cycle at the end boundary
                seqs[i] = s
                still.append(i)
            pending = still
        if pending:
            i = pending[0]
            raise UserError(
                f"could not build a prompt of exactly {targets[i]} tokens with this tokenizer "
                f"({len(pending)} of {len(seqs)} prompts did not converge)",
                source=self.where,
                key="input_len",
            )
        return done
