"""Architecture name -> model class, for Hugging Face `architectures` names and GGUF `general.architecture` values."""

from __future__ import annotations

from torch import nn

from tokenmill.models.llama import LlamaForCausalLM
from tokenmill.models.parcae_engine import PARCAE_ARCHITECTURE, ParcaeForEngine


class UnsupportedArchitectureError(ValueError):
    pass


_MODEL_CLASSES: dict[str, type[nn.Module]] = {
    # Hugging Face config.json "architectures"
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    # tokenmill's Parcae export (and, detected by their config keys, training runs and parcae-lm checkpoints):
    # loaded by models/parcae_checkpoint.py, not through the Llama-style constructor
    PARCAE_ARCHITECTURE: ParcaeForEngine,
    # GGUF general.architecture
    "llama": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
}


def register_architecture(name: str, model_class: type[nn.Module]) -> None:
    """Lets another model family (e.g. models/parcae.py) plug into the loader."""
    _MODEL_CLASSES[name] = model_class


def supported_architectures() -> list[str]:
    return sorted(_MODEL_CLASSES)


def get_model_class(architecture: str) -> type[nn.Module]:
    try:
        return _MODEL_CLASSES[architecture]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"model architecture {architecture!r} is not supported; supported: {', '.join(supported_architectures())}"
        ) from None
