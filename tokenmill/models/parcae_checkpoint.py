"""Parcae model folders the engine serves: exported folders, training-run folders, and parcae-lm checkpoints.

Formats (told apart by config.json):
- **export** (`tokenmill train export RUN_DIR OUT_DIR`, `save_parcae_folder`): config.json with
  architectures ["ParcaeForCausalLM"], the ParcaeConfig under "parcae", the served T under "recurrence", plus
  eos/bos ids; model.safetensors with ParcaeModel's own parameter names (the tied LM head left out);
  tokenizer.json (+ tokenizer_config.json).
- **run**: a `tokenmill train run` output folder: config.json (TrainConfig + "resolved_model"), checkpoint.pt, and
  (from runs trained since serving landed) tokenizer.json / tokenizer_config.json copied from the corpus.
- **parcae-lm**: their config.json keys (n_embd, n_layers_in_recurrent_block, ...) and weights, mapped by
  `tokenmill.models.parcae.load_parcae_lm`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch

from tokenmill.config import ModelConfig, parse_dtype
from tokenmill.models.parcae import ParcaeConfig, ParcaeModel, config_from_parcae_lm, load_parcae_lm
from tokenmill.models.parcae_engine import PARCAE_ARCHITECTURE, parcae_model_config

ParcaeFormat = Literal["export", "run", "parcae-lm"]
WEIGHTS_FILE = "model.safetensors"


class ParcaeCheckpoint(NamedTuple):
    model: ParcaeModel
    recurrence: int  # the T the folder asks to be served at (its config's mean recurrence unless exported otherwise)
    eos_token_ids: list[int]
    bos_token_id: int | None
    format: ParcaeFormat


def parcae_format(folder: str | Path, config: dict[str, Any] | None = None) -> ParcaeFormat | None:
    """Which Parcae format a model folder holds, or None when it is not a Parcae folder."""
    folder = Path(folder)
    if config is None:
        path = folder / "config.json"
        if not path.is_file():
            return None
        config = json.loads(path.read_text())
    if PARCAE_ARCHITECTURE in (config.get("architectures") or []) or config.get("model_type") == "parcae":
        return "export"
    if "resolved_model" in config and "model" in config:
        return "run"
    if "n_embd" in config and "n_layers_in_recurrent_block" in config:
        return "parcae-lm"
    # their fixed-depth GPT: litgpt-style keys (a Hugging Face GPT-2 config also has n_embd/n_layer, not these)
    if "n_embd" in config and "n_layer" in config and "block_class_name" in config and not config.get("architectures"):
        return "parcae-lm"
    return None


def read_parcae_checkpoint(
    folder: str | Path, dtype: torch.dtype | str = torch.float32, device: torch.device | str = "cpu"
) -> ParcaeCheckpoint:
    """The model of a Parcae folder (any format above), in `dtype` on `device`, in eval mode."""
    folder = Path(folder).expanduser()
    config = _read_json(folder / "config.json")
    fmt = parcae_format(folder, config)
    dtype, device = parse_dtype(dtype), torch.device(device)
    if fmt == "export":
        if "parcae" not in config:
            raise ValueError(f"{folder}/config.json names {PARCAE_ARCHITECTURE} but has no 'parcae' section")
        parcae_config = ParcaeConfig.from_dict(config["parcae"])
        weights = folder / WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"{folder} has no {WEIGHTS_FILE}")
        from safetensors.torch import load_file

        model = _model_from_state(parcae_config, load_file(str(weights)), dtype, device, f"{weights}")
        eos = config.get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        recurrence = int(config.get("recurrence") or parcae_config.mean_recurrence)
        return ParcaeCheckpoint(model, recurrence, eos_ids, config.get("bos_token_id"), fmt)
    if fmt == "run":
        parcae_config = ParcaeConfig.from_dict(config["resolved_model"])
        path = folder / "checkpoint.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is a training-run folder without checkpoint.pt (did the run save one?)")
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
            raise ValueError(f"{path} holds no model state dict")
        model = _model_from_state(parcae_config, state["model"], dtype, device, str(path))
        return ParcaeCheckpoint(model, parcae_config.mean_recurrence, [], None, fmt)
    if fmt == "parcae-lm":
        model = load_parcae_lm(folder, device=str(device)).to(dtype)
        model.reset_rope_tables()
        model.requires_grad_(False)
        return ParcaeCheckpoint(model, model.config.mean_recurrence, [], None, fmt)
    raise ValueError(f"{folder} is not a Parcae model folder (config.json is neither an export, a run nor parcae-lm)")


def parcae_folder_model_config(folder: str | Path, recurrence: int | None = None) -> ModelConfig:
    """The engine's ModelConfig of a Parcae folder at T = `recurrence` (default: the folder's), no weights read."""
    folder = Path(folder).expanduser()
    config = _read_json(folder / "config.json")
    fmt = parcae_format(folder, config)
    eos_ids: list[int] = []
    bos = None
    if fmt == "export":
        parcae_config = ParcaeConfig.from_dict(config["parcae"])
        default_T = int(config.get("recurrence") or parcae_config.mean_recurrence)
        eos = config.get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        bos = config.get("bos_token_id")
    elif fmt == "run":
        parcae_config = ParcaeConfig.from_dict(config["resolved_model"])
        default_T = parcae_config.mean_recurrence
    elif fmt == "parcae-lm":
        parcae_config = config_from_parcae_lm(config)
        default_T = parcae_config.mean_recurrence
    else:
        raise ValueError(f"{folder} is not a Parcae model folder")
    return parcae_model_config(parcae_config, recurrence or default_T, eos_ids, bos)


def save_parcae_folder(
    model: ParcaeModel,
    out_dir: str | Path,
    recurrence: int | None = None,
    eos_token_id: int | None = None,
    bos_token_id: int | None = None,
) -> Path:
    """Writes config.json and model.safetensors (fp32) of the export format; the tokenizer is the caller's."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    c = model.config
    T = c.mean_recurrence if recurrence is None else recurrence
    if T < 1:
        raise ValueError(f"recurrence must be >= 1, got {T}")
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    if c.tie_embeddings:
        state.pop("lm_head.weight", None)  # the same tensor as embed.weight; safetensors stores no aliases
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    config = {
        "architectures": [PARCAE_ARCHITECTURE],
        "model_type": "parcae",
        "recurrence": T,
        "parcae": c.to_dict(),
        # Hugging Face-style fields, for tools that read them (the engine reads only the above)
        "vocab_size": c.vocab_size,
        "hidden_size": c.d_model,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.num_kv_heads,
        "max_position_embeddings": c.max_seq_len,
        "tie_word_embeddings": c.tie_embeddings,
        "eos_token_id": eos_token_id,
        "bos_token_id": bos_token_id,
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def _model_from_state(
    config: ParcaeConfig, state: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device, where: str
) -> ParcaeModel:
    with torch.device("meta"):
        model = ParcaeModel(config)
    model.to_empty(device=device)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    model.to(dtype)
    expected = model.state_dict()
    required = set(expected) - ({"lm_head.weight"} if config.tie_embeddings else set())
    missing, unexpected = sorted(required - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{where} does not match its config: missing {missing[:6]}, unexpected {unexpected[:6]}")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"{where}: {key} has shape {tuple(tensor.shape)}, the config needs {tuple(expected[key].shape)}"
            )
    head = state.get("lm_head.weight")
    if config.tie_embeddings and head is not None and not torch.equal(head, state["embed.weight"]):
        raise ValueError(f"{where}: the config ties embeddings but lm_head.weight differs from embed.weight")
    model.load_state_dict(state, strict=False)
    model.reset_rope_tables()
    model.requires_grad_(False)
    return model.eval()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path.parent} has no config.json") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
