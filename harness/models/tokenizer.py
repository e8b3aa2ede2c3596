"""A byte-level BPE tokenizer trained here, in seconds, on generated English-like text.

No model hub is reachable, yet vLLM and the prompt builder need a real tokenizer whose vocabulary matches the
model's `vocab_size` and whose special tokens sit at the ids the model's config names (`bos_token_id`,
`eos_token_id`, ...). Byte-level BPE encodes any text without unknown tokens, so prompts of exact token lengths
can be built from it like from a real model's tokenizer.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# A simple chat template so /v1/chat/completions works; the tokenizer itself adds the BOS token (Llama-style).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_CORE_WORDS = (
    "the of and to in a is that for it as was with be by on not he i this are or his from at which but have an "
    "they you were her she there one all we their been has would when if more will so no what up out who them some "
    "time can into other only new could about its these two may then do first any like now my such over our man me "
    "even most made after also did many before must through back years where much your way well down should because "
    "each just those people how too little state good very make world still own see men work long get here between "
    "both life being under never day same another know while last might us great old year off come since against go "
    "came right used take three system model server request token memory cache batch latency throughput prompt "
    "answer question water light house small large number part place case week company group problem fact hand "
    "point government city area mother night word business issue side kind head service friend power hour game "
    "line end member law car market name team minute idea body information back parent face others level office "
    "door health person art war history party result change morning reason research girl guy moment air teacher "
    "force education"
).split()

_ONSETS = ("", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
           "br", "ch", "cl", "dr", "fl", "gr", "pl", "pr", "sh", "st", "th", "tr")  # fmt: skip
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ou", "io", "y")
_CODAS = ("", "", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng", "rk", "x")


@dataclass(frozen=True)
class SpecialTokens:
    """Special tokens and the ids the model's config puts them at."""

    bos: tuple[str, int] | None
    eos: tuple[str, int] | None
    pad: tuple[str, int] | None = None
    unk: tuple[str, int] | None = None

    def by_id(self) -> dict[int, str]:
        out: dict[int, str] = {}
        for entry in (self.unk, self.bos, self.eos, self.pad):
            if entry is not None:
                out.setdefault(entry[1], entry[0])
        return out


def special_tokens_for(config: dict[str, Any]) -> SpecialTokens:
    """Special tokens at the ids a HF config.json names: GPT-2 style (one <|endoftext|>) or Llama style."""

    def first(v: Any) -> int | None:
        if isinstance(v, list):
            return int(v[0]) if v else None
        return int(v) if isinstance(v, int) else None

    bos_id, eos_id, pad_id = first(config.get("bos_token_id")), first(config.get("eos_token_id")), None
    pad_id = first(config.get("pad_token_id"))
    if bos_id is not None and bos_id == eos_id:
        tok = ("<|endoftext|>", bos_id)
        pad = ("<|endoftext|>", pad_id) if pad_id == bos_id else (("<pad>", pad_id) if pad_id is not None else None)
        return SpecialTokens(bos=tok, eos=tok, pad=pad)
    bos = ("<s>", bos_id) if bos_id is not None else None
    eos = ("</s>", eos_id) if eos_id is not None else None
    pad = None
    if pad_id is not None and pad_id not in (bos_id, eos_id):
        pad = ("<pad>", pad_id)
    unk = ("<unk>", 0) if 0 not in (bos_id, eos_id, pad_id) and bos_id == 1 else None  # Llama's layout
    return SpecialTokens(bos=bos, eos=eos, pad=pad, unk=unk)


def synthetic_text(n_words: int, lexicon_size: int, seed: int = 0) -> list[str]:
    """English-like lines: common English words mixed with pronounceable pseudo-words (Zipf-distributed), so BPE
    keeps finding merges until a large vocabulary (32k, 50k) is filled."""
    rng = random.Random(seed)
    lexicon = list(_CORE_WORDS)
    seen = set(lexicon)
    while len(lexicon) < lexicon_size:
        word = "".join(
            rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(rng.choice((1, 2, 2, 3, 3, 4)))
        )
        if word and word not in seen:
            seen.add(word)
            lexicon.append(word)
    weights = [1.0 / (rank + 8) for rank in range(len(lexicon))]
    words = rng.choices(lexicon, weights=weights, k=n_words)
    lines: list[str] = []
    i = 0
    while i < len(words):
        n = rng.randint(6, 18)
        sentence = words[i : i + n]
        i += n
        if rng.random() < 0.15:
            sentence.insert(rng.randrange(len(sentence) + 1), str(rng.randint(0, 2025)))
        if rng.random() < 0.3:
            j = rng.randrange(len(sentence))
            sentence[j] = sentence[j] + ","
        text = " ".join(sentence)
        lines.append(text[:1].upper() + text[1:] + rng.choice((".", ".", ".", "?", "!", ":")))
    return lines


def train_tokenizer(
    vocab_size: int, specials: SpecialTokens, *, model_max_length: int = 2048, seed: int = 0
) -> tuple[Any, dict[str, Any]]:
    """Train byte-level BPE with exactly `vocab_size` ids (specials at their config ids).

    Returns (tokenizers.Tokenizer, tokenizer_config dict). When the generated text runs out of merges before
    the vocabulary is full, the remaining ids are filled with `<|reserved_N|>` tokens so that the vocabulary
    size equals the model's embedding rows, as vLLM expects.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    special_by_id = specials.by_id()
    if any(i >= vocab_size or i < 0 for i in special_by_id):
        raise ValueError(f"special token ids {sorted(special_by_id)} do not fit vocab_size {vocab_size}")
    n_plain = vocab_size - len(special_by_id)

    n_words = max(60_000, 25 * n_plain)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=n_plain,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(synthetic_text(n_words, lexicon_size=max(2000, n_plain), seed=seed), trainer=trainer)

    data = json.loads(tok.to_str())
    trained = sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])
    plain = [t for t, _ in trained if t not in special_by_id.values()]
    reserved = 0
    while len(plain) < n_plain:
        plain.append(f"<|reserved_{reserved}|>")
        reserved += 1
    plain = plain[:n_plain]
    vocab: dict[str, int] = {}
    it = iter(plain)
    for idx in range(vocab_size):
        vocab[special_by_id[idx] if idx in special_by_id else next(it)] = idx
    data["model"]["vocab"] = vocab
    data["added_tokens"] = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True}
        for i, t in sorted(special_by_id.items())
    ]  # fmt: skip
    final = Tokenizer.from_str(json.dumps(data))
    add_bos = specials.bos is not None and specials.bos != specials.eos
    if add_bos:
        assert specials.bos is not None
        final.post_processor = processors.TemplateProcessing(
            single=f"{specials.bos[0]} $A",
            pair=f"{specials.bos[0]} $A {specials.bos[0]} $B",
            special_tokens=[specials.bos],
        )
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "chat_template": CHAT_TEMPLATE,
    }
    for name, entry in (("bos_token", specials.bos), ("eos_token", specials.eos), ("pad_token", specials.pad),
                        ("unk_token", specials.unk)):  # fmt: skip
        if entry is not None:
            config[name] = entry[0]
    if "pad_token" not in config and specials.eos is not None:
        config["pad_token"] = specials.eos[0]
    return final, config


def save_tokenizer(tokenizer: Any, tokenizer_config: dict[str, Any], out_dir: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (what AutoTokenizer reads)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    special_map = {k: v for k, v in tokenizer_config.items() if k.endswith("_token") and isinstance(v, str)}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
