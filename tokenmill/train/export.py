"""`tokenmill train export RUN_DIR OUT_DIR`: a training run (or a parcae-lm checkpoint) as a self-contained model
folder the engine serves: config.json (architectures ["ParcaeForCausalLM"], the ParcaeConfig, the served T),
model.safetensors and the corpus tokenizer (see tokenmill/models/parcae_checkpoint.py for the format).

Runs also serve in place (`tokenmill serve RUN_DIR`): the trainer copies the tokenizer next to its checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tokenmill.models.parcae_checkpoint import read_parcae_checkpoint, save_parcae_folder
from tokenmill.train.data import EOS_TOKEN

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def copy_tokenizer(src_dir: str | Path, dst_dir: str | Path) -> int | None:
    """Copies tokenizer.json from src_dir (a corpus or model folder) to dst_dir and makes sure a
    tokenizer_config.json there names the corpus's end-of-text token as EOS. Returns the EOS id (None when the
    vocabulary has no such token). Raises FileNotFoundError when src_dir has no tokenizer.json."""
    from tokenizers import Tokenizer

    src, dst = Path(src_dir), Path(dst_dir)
    if not (src / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{src} has no tokenizer.json")
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and (src / name).resolve() != (dst / name).resolve():
            shutil.copyfile(src / name, dst / name)
    eos_id = Tokenizer.from_file(str(dst / "tokenizer.json")).token_to_id(EOS_TOKEN)
    config_path = dst / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if eos_id is not None and "eos_token" not in config:
        config["eos_token"] = EOS_TOKEN
        config_path.write_text(json.dumps(config, indent=2) + "\n")
    return eos_id


def _tokenizer_source(run_dir: Path, tokenizer: str | Path | None) -> Path:
    if tokenizer is not None:
        path = Path(tokenizer)
        return path.parent if path.is_file() else path
    if (run_dir / "tokenizer.json").is_file():
        return run_dir
    config = json.loads((run_dir / "config.json").read_text())
    data_dir = config.get("data_dir")
    if data_dir and (Path(data_dir) / "tokenizer.json").is_file():
        return Path(data_dir)
    raise FileNotFoundError(
        f"no tokenizer for {run_dir}: neither it nor its data_dir ({data_dir}) holds tokenizer.json; pass --tokenizer"
    )


def export_run(
    run_dir: str | Path, out_dir: str | Path, recurrence: int | None = None, tokenizer: str | Path | None = None
) -> Path:
    """Writes the export folder of a run (or of any Parcae folder the engine reads) to out_dir; returns out_dir."""
    run, out = Path(run_dir), Path(out_dir)
    if out.resolve() == run.resolve():
        raise ValueError("OUT_DIR must differ from RUN_DIR")
    ckpt = read_parcae_checkpoint(run)
    out.mkdir(parents=True, exist_ok=True)
    eos_id = copy_tokenizer(_tokenizer_source(run, tokenizer), out)
    if ckpt.eos_token_ids:
        eos_id = ckpt.eos_token_ids[0]
    T = recurrence or ckpt.recurrence
    save_parcae_folder(ckpt.model, out, T, eos_token_id=eos_id, bos_token_id=ckpt.bos_token_id)
    return out
