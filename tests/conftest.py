"""Shared test fixtures. `tiny_tokenizer`: a real Hugging Face fast tokenizer trained in a second, no downloads."""

from __future__ import annotations

import random

import pytest

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def make_tiny_tokenizer(kind: str = "bytelevel", *, chat_template: bool = True, vocab_size: int = 2000):  # type: ignore[no-untyped-def]
    """Train a small BPE tokenizer on generated text and wrap it as transformers' PreTrainedTokenizerFast.

    kind "bytelevel" is GPT-2 / Llama-3 / Qwen style (Ġ word marker, no unk), "metaspace" is Llama-2 / Mistral
    style (▁ marker), "nosplit" is metaspace without word splitting (multi-word tokens). All add a BOS token like
    real causal-LM tokenizers do.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rnd = random.Random(1234)
    syllables = [c + v for c in "bcdfghklmnprstvwz" for v in "aeiou"] + ["th", "st", "er", "an", "on"]
    words = ["".join(rnd.choice(syllables) for _ in range(rnd.randint(1, 4))) for _ in range(1500)]
    words += [w.capitalize() for w in words[:300]]
    lines = [" ".join(rnd.choice(words) for _ in range(rnd.randint(5, 25))) + rnd.choice([".", "?", "!", ","])
             for _ in range(1500)]
    specials = ["<s>", "</s>", "<pad>", "<unk>"]
    if kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    elif kind in ("metaspace", "nosplit"):
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        # nosplit: BPE over whole lines, so it learns tokens that span words (like some recent vocabularies)
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first",
                                                     split=kind == "metaspace")
        tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    else:
        raise ValueError(kind)
    tok.train_from_iterator(lines, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                      unk_token="<unk>")
    if chat_template:
        wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


@pytest.fixture(scope="session")
def tiny_tokenizer():  # type: ignore[no-untyped-def]
    """Byte-level BPE with BOS and a chat template."""
    return make_tiny_tokenizer("bytelevel")


@pytest.fixture(scope="session")
def tiny_tokenizer_metaspace():  # type: ignore[no-untyped-def]
    """Sentencepiece-style (▁) BPE with BOS and a chat template."""
    return make_tiny_tokenizer("metaspace")


# ---------------------------------------------------------------------------------------------- launch / models
# Tests that start a real vLLM server are marked `@pytest.mark.slow` (each start costs ~40 s of CPU here).


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):  # type: ignore[no-untyped-def]
    """Path of the tiny random Llama (harness.models), built once and cached across sessions by builder version.

    VLLM_TUNE_TEST_FRESH_MODEL=1 builds it into this session's tmp dir instead.
    """
    import os

    from harness.models import build_tiny, cached_tiny

    if os.environ.get("VLLM_TUNE_TEST_FRESH_MODEL"):
        out = tmp_path_factory.mktemp("tiny-model")
        build_tiny(out)
        return out
    return cached_tiny()


@pytest.fixture(scope="session")
def vllm_argspec():  # type: ignore[no-untyped-def]
    """The installed vLLM's ArgSpec (dumped once per vLLM version into ~/.cache/vllm-tune, ~15 s the first time)."""
    from harness.launch.vllm_args import load_argspec

    return load_argspec()
