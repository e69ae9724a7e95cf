"""Prompt text whose token blocks reproduce a workload's (or a trace's) block sharing, for a given tokenizer.

The text is built from "stable words": vocabulary entries that decode to a space followed by letters and encode
back to that one token. A byte-level BPE pre-tokenizer (GPT-2, Llama 3, Qwen 2, SmolLM2) splits text at spaces, so
a string of such words re-tokenizes to exactly the chosen tokens, and text concatenated at any word boundary
tokenizes as the concatenation of the parts. Hence: the same content key (or hash id) -> the same text -> the same
tokens at the same positions, and a prompt of n blocks has exactly n * block_size tokens. Every block is checked
with a real encode; a block that does not round-trip is drawn again.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tokenmill.workload.sessions import Segment, stable_seed


class TokenCodec(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    @property
    def vocab_size(self) -> int: ...


class TokenizerAdapter:
    """One encode/decode interface over tokenizers.Tokenizer, Hugging Face tokenizers and tokenmill's Tokenizer:
    encode(text) never adds special tokens and returns a list of ids."""

    def __init__(self, tokenizer: Any) -> None:
        self.inner = tokenizer
        probe = self._raw_encode("hello")
        self._has_ids = hasattr(probe, "ids")

    def _raw_encode(self, text: str) -> Any:
        try:
            return self.inner.encode(text, add_special_tokens=False)
        except TypeError:
            return self.inner.encode(text)

    def encode(self, text: str) -> list[int]:
        out = self._raw_encode(text)
        return list(out.ids if self._has_ids else out)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        inner = self.inner
        if hasattr(inner, "encode_batch"):
            if self._has_ids:  # tokenizers.Tokenizer
                return [e.ids for e in inner.encode_batch(texts, add_special_tokens=False)]
            return [list(x) for x in inner.encode_batch(texts, add_special_tokens=False)]  # tokenmill's Tokenizer
        if callable(inner) and hasattr(inner, "batch_decode"):  # Hugging Face
            return [list(x) for x in inner(texts, add_special_tokens=False)["input_ids"]]
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return self.inner.decode(list(ids))

    def decode_each(self, ids: Iterable[int]) -> list[str | None]:
        """decode([i]) for every id (None where an id cannot be decoded alone), batched when the tokenizer can."""
        singles = [[i] for i in ids]
        inner = self.inner
        for batch in ("decode_batch", "batch_decode"):
            if hasattr(inner, batch):
                try:
                    return list(getattr(inner, batch)(singles))
                except Exception:
                    break
        out: list[str | None] = []
        for single in singles:
            try:
                out.append(inner.decode(single))
            except Exception:  # holes in the vocabulary
                out.append(None)
        return out

    @property
    def vocab_size(self) -> int:
        inner = self.inner
        for attr in ("get_vocab_size",):
            if hasattr(inner, attr):
                return int(getattr(inner, attr)())
        try:
            return len(inner)
        except TypeError:
            pass
        if hasattr(inner, "vocab_size"):
            return int(inner.vocab_size)
        raise ValueError(f"cannot tell the vocabulary size of tokenizer {type(inner).__name__}")


def as_codec(tokenizer: Any) -> TokenizerAdapter:
    return tokenizer if isinstance(tokenizer, TokenizerAdapter) else TokenizerAdapter(tokenizer)


def load_tokenizer(name_or_path: str) -> TokenizerAdapter:
    """The tokenizer a server built from this model would use (tokenmill's own: prompts are then the lengths the
    server counts): from a GGUF file, a tokenizer.json, a folder holding tokenizer.json (or one GGUF file), or a hub
    id (downloaded as `tokenmill serve` would). ValueError when none of these reads."""
    from tokenmill.models.hub import resolve_model
    from tokenmill.tokenizer import Tokenizer

    path = Path(name_or_path).expanduser()
    if path.suffix == ".json" and path.is_file():
        from tokenizers import Tokenizer as RustTokenizer

        return TokenizerAdapter(RustTokenizer.from_file(str(path)))
    if path.is_dir() and (path / "tokenizer.json").is_file():  # (a random-weight model folder plus a tokenizer)
        return TokenizerAdapter(Tokenizer.from_dir(path))
    try:
        return TokenizerAdapter(Tokenizer.from_source(resolve_model(name_or_path)))
    except (OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"no tokenizer from {name_or_path!r}: {exc}") from None


_WORD = re.compile(r"^ [a-z]{2,16}$")


_STABLE_CACHE: OrderedDict[int, tuple[Any, tuple[list[int], list[str]]]] = OrderedDict()


def stable_words(tokenizer: Any) -> tuple[list[int], list[str]]:
    """Token ids (sorted) whose text is ' ' + lowercase letters and which encode back to themselves alone.

    Remembered for the last few tokenizer objects: scanning a 50k vocabulary takes about a second."""
    inner = tokenizer.inner if isinstance(tokenizer, TokenizerAdapter) else tokenizer
    hit = _STABLE_CACHE.get(id(inner))
    if hit is not None and hit[0] is inner:
        return hit[1]
    result = _scan_stable_words(as_codec(tokenizer))
    _STABLE_CACHE[id(inner)] = (inner, result)
    while len(_STABLE_CACHE) > 8:
        _STABLE_CACHE.popitem(last=False)
    return result


def _scan_stable_words(codec: TokenizerAdapter) -> tuple[list[int], list[str]]:
    candidates = [(i, s) for i, s in enumerate(codec.decode_each(range(codec.vocab_size))) if s and _WORD.match(s)]
    encoded = codec.encode_batch([s for _, s in candidates]) if candidates else []
    ids, words = [], []
    for (i, s), enc in zip(candidates, encoded):
        if list(enc) == [i]:
            ids.append(i)
            words.append(s)
    return ids, words


class PromptSynthesizer:
    """Deterministic text for content keys and block hash ids, exact to the token for one tokenizer."""

    CHUNK = 256  # a key's token stream is generated in fixed chunks, so a shorter request is a prefix of a longer
    MIN_WORDS = 32

    def __init__(self, tokenizer: Any, seed: int = 0, verify: bool = True, cache_keys: int = 4096) -> None:
        self.codec = as_codec(tokenizer)
        self.seed = seed
        self.verify = verify
        ids, words = stable_words(self.codec)
        if len(ids) < self.MIN_WORDS:
            raise ValueError(
                f"the tokenizer has only {len(ids)} single-token words of the form ' word'; prompt synthesis needs "
                "a byte-level BPE tokenizer whose pre-tokenizer splits at spaces (GPT-2, Llama 3, Qwen 2, SmolLM2)"
            )
        self.word_ids = np.array(ids, dtype=np.int64)
        self.words = words
        self._chunks: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._cache_keys = cache_keys
        self._blocks: dict[tuple[int, int], np.ndarray] = {}
        self._self_test()

    def _self_test(self) -> None:
        rng = np.random.default_rng(stable_seed("self-test", self.seed))
        picks = rng.integers(0, len(self.words), 512)
        text = "".join(self.words[i] for i in picks)
        if self.codec.encode(text) != self.word_ids[picks].tolist():
            raise ValueError(
                "this tokenizer merges tokens across spaces, so synthesized text would not re-tokenize to the "
                "intended tokens; use a byte-level BPE tokenizer"
            )

    # -- token streams per content key -------------------------------------------------------------------------

    def _chunk(self, key: tuple, index: int) -> np.ndarray:
        ck = (key, index)
        hit = self._chunks.get(ck)
        if hit is not None:
            self._chunks.move_to_end(ck)
            return hit
        rng = np.random.default_rng(stable_seed("text", self.seed, key, index))
        picks = rng.integers(0, len(self.words), self.CHUNK)
        self._chunks[ck] = picks
        if len(self._chunks) > self._cache_keys:
            self._chunks.popitem(last=False)
        return picks

    def _picks(self, key: tuple, n: int) -> np.ndarray:
        if n <= 0:
            return np.zeros(0, dtype=np.int64)
        chunks = [self._chunk(key, c) for c in range((n + self.CHUNK - 1) // self.CHUNK)]
        return np.concatenate(chunks)[:n]

    def tokens_for_key(self, key: tuple, n: int) -> list[int]:
        """The first n tokens of the stream named by key (any hashable, printable tuple)."""
        return self.word_ids[self._picks(key, n)].tolist()

    def text_for_key(self, key: tuple, n: int) -> str:
        """Text that tokenizes to exactly tokens_for_key(key, n)."""
        return "".join(self.words[i] for i in self._picks(key, n))

    def text_for_segments(self, segments: Sequence[Segment]) -> str:
        return "".join(self.text_for_key(s.key, s.tokens) for s in segments)

    def tokens_for_segments(self, segments: Sequence[Segment]) -> list[int]:
        """Token ids of text_for_segments(segments), without tokenizing (for the simulator and tests)."""
        return [t for s in segments for t in self.tokens_for_key(s.key, s.tokens)]

    # -- trace blocks ------------------------------------------------------------------------------------------

    def _block_picks(self, hash_id: int, block_size: int) -> np.ndarray:
        hit = self._blocks.get((block_size, hash_id))
        if hit is not None:
            return hit
        picks = self._find_block(hash_id, block_size)
        self._blocks[(block_size, hash_id)] = picks
        return picks

    def _find_block(self, hash_id: int, block_size: int) -> np.ndarray:
        for attempt in range(16):
            rng = np.random.default_rng(stable_seed("block", self.seed, block_size, int(hash_id), attempt))
            picks = rng.integers(0, len(self.words), block_size)
            if not self.verify:
                return picks
            text = "".join(self.words[i] for i in picks)
            if self.codec.encode(text) == self.word_ids[picks].tolist():
                return picks
        raise ValueError(f"could not find text for block {hash_id} that re-tokenizes to itself")

    def block_tokens(self, hash_id: int, block_size: int) -> list[int]:
        return self.word_ids[self._block_picks(hash_id, block_size)].tolist()

    def block_text(self, hash_id: int, block_size: int, num_tokens: int | None = None) -> str:
        picks = self._block_picks(hash_id, block_size)
        return "".join(self.words[i] for i in picks[: block_size if num_tokens is None else num_tokens])

    def prompt_for_hash_ids(self, hash_ids: Sequence[int], input_length: int, block_size: int) -> str:
        """Prompt of exactly input_length tokens: block i is the text of hash_ids[i], the last block cut short.

        If the trace lists fewer blocks than input_length needs, the rest is unique filler; if it lists more, the
        extra ids are ignored.
        """
        if input_length < 0:
            raise ValueError(f"input_length must be >= 0, got {input_length}")
        parts: list[str] = []
        remaining = input_length
        for h in hash_ids:
            if remaining <= 0:
                break
            take = min(block_size, remaining)
            parts.append(self.block_text(h, block_size, take))
            remaining -= take
        if remaining > 0:
            parts.append(self.text_for_key(("filler", tuple(hash_ids[-4:]), input_length), remaining))
        return "".join(parts)
