"""The model's tokenizer, which prompts are built with: exact token lengths need the server's own tokenizer."""

from __future__ import annotations

from typing import Any

from harness.errors import UserError


def load_tokenizer(model: str, key: str = "models[].model") -> Any:
    """`AutoTokenizer` for a local model directory or a hub name; a UserError naming `model` (and the config `key`
    it came from) when it cannot be loaded (offline hub name, broken directory)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types; say which model and why, in one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load the tokenizer: {first}", source=model, key=key) from None
