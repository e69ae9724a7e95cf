"""tokenmill: an LLM inference engine."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenmill.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]

if TYPE_CHECKING:
    from tokenmill.llm import LLM


def __getattr__(name: str):
    # The engine imports torch and the model code; keep `import tokenmill` cheap for the CLI's --help.
    if name == "LLM":
        from tokenmill.llm import LLM

        return LLM
    raise AttributeError(name)
