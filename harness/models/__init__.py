"""Local random-weight models: the tiny demo/test Llama and real architectures by name or config.json.

`python -m harness.models tiny DIR`, `python -m harness.models arch mistral-7b DIR`. A model argument elsewhere
in the harness that is not a local directory is a hub name and goes to vLLM unchanged (`is_model_dir`).
Importing this package is cheap; torch and transformers load only when a model is built.
"""

from harness.models.build import (
    KNOWN_ARCHS,
    TINY_CONFIG,
    BuiltModel,
    build_from_config,
    build_tiny,
    cached_tiny,
    ensure_model,
    is_model_dir,
    resolve_config,
)

__all__ = [
    "KNOWN_ARCHS",
    "TINY_CONFIG",
    "BuiltModel",
    "build_from_config",
    "build_tiny",
    "cached_tiny",
    "ensure_model",
    "is_model_dir",
    "resolve_config",
]
