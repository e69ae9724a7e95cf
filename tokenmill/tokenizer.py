"""Text in and out: a `tokenizers.Tokenizer` built from a GGUF file or a Hugging Face directory, plus chat templates.

A GGUF has no tokenizer.json; it stores the vocabulary, merges, token types and special ids under llama.cpp's key
names. We rebuild the tokenizer those describe with the Rust `tokenizers` library (never transformers at run time):

- tokenizer.ggml.model == "gpt2": byte-level BPE. The vocabulary is already spelled in the GPT-2 byte alphabet; the
  pre-tokenizer regex comes from tokenizer.ggml.pre (the same table llama.cpp keys on).
- tokenizer.ggml.model == "llama": SentencePiece BPE. Merges are rebuilt from the token scores when the file has
  none, unknown characters fall back to <0xNN> byte tokens, and a "▁" is prepended the way llama.cpp does.

Chat templates render in a sandboxed Jinja environment that offers what Hugging Face templates expect.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as RustTokenizer

# llama.cpp token types (gguf.TokenType)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# ChatML, for models that ship no template.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

# Tokens that end a turn in common chat formats. One of these counts as an end-of-sequence token when the model's
# chat template writes it (e.g. Llama 3 ends turns with <|eot_id|> while its eos_token is <|end_of_text|>).
_TURN_END_MARKERS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<｜end▁of▁sentence｜>",
    "</s>",
)

# --- pre-tokenizer split patterns, keyed by tokenizer.ggml.pre (names as llama.cpp spells them) -------------------
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DIGIT = r"\p{N}"


@dataclass(frozen=True)
class _PreTokenizerSpec:
    splits: tuple[str, ...]  # applied in order, each isolating its matches
    ignore_merges: bool = False  # a whole pre-token found in the vocabulary is one token (Llama 3, Tekken)
    add_bos: bool = False  # llama.cpp's default when the file has no tokenizer.ggml.add_bos_token


_PRE_TOKENIZERS: dict[str, _PreTokenizerSpec] = {}


def _register_pre(names: Iterable[str], spec: _PreTokenizerSpec) -> None:
    for name in names:
        _PRE_TOKENIZERS[name] = spec


_register_pre(
    ["default", "gpt2", "gpt-2", "mpt", "olmo", "jais", "phi-2", "exaone4", "trillion", "granite-docling"],
    _PreTokenizerSpec((_GPT2_SPLIT,)),
)
_register_pre(
    ["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"],
    _PreTokenizerSpec((_DIGIT, _GPT2_SPLIT)),
)
_register_pre(
    ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"],
    _PreTokenizerSpec((_LLAMA3_SPLIT,), ignore_merges=True, add_bos=True),
)
_register_pre(["dbrx", "smaug-bpe", "chatglm-bpe", "glm4"], _PreTokenizerSpec((_LLAMA3_SPLIT,)))
_register_pre(
    ["qwen2", "deepseek-r1-qwen", "stablelm2", "megrez", "kormo", "hunyuan", "grok-2"],
    _PreTokenizerSpec((_QWEN2_SPLIT,)),
)
_register_pre(["tekken"], _PreTokenizerSpec((_TEKKEN_SPLIT,), ignore_merges=True, add_bos=True))
_register_pre(["gpt-4o", "llama4", "minimax-m2", "kanana2"], _PreTokenizerSpec((_GPT4O_SPLIT,)))


# --- the GPT-2 byte alphabet ----------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _byte_alphabet() -> tuple[dict[int, str], dict[str, int]]:
    """GPT-2's reversible byte -> printable character map (and its inverse)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    byte_to_char: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in byte_to_char:
            byte_to_char[b] = chr(256 + extra)
            extra += 1
    return byte_to_char, {c: b for b, c in byte_to_char.items()}


def _spell_in_byte_alphabet(text: str) -> str:
    byte_to_char, _ = _byte_alphabet()
    return "".join(byte_to_char[b] for b in text.encode("utf-8"))


# --- GGUF metadata --------------------------------------------------------------------------------------------------
# Scalar value types of the GGUF key/value section (gguf.GGUFValueType), as struct formats.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_metadata(
    path: str | os.PathLike, prefixes: tuple[str, ...] = ("tokenizer.", "general.")
) -> dict[str, Any]:
    """The key/value metadata of a GGUF file whose keys start with one of `prefixes`, as plain Python values.

    Reads only the header and metadata section through mmap, so it takes milliseconds where gguf.GGUFReader, which
    also indexes every tensor and builds numpy views for each of the ~100k vocabulary strings, takes seconds.
    """
    import mmap

    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as exc:  # empty file
            raise ValueError(f"{path} is not a readable GGUF file: {exc}") from exc
    try:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path} is not a readable GGUF file: bad magic {bytes(buf[:4])!r}")
        order = "<" if struct.unpack_from("<I", buf, 4)[0] & 0xFFFF else ">"  # big-endian files exist, rarely
        version = struct.unpack_from(order + "I", buf, 4)[0]
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is too old (need 2 or newer)")
        _, kv_count = struct.unpack_from(order + "QQ", buf, 8)
        offset = 24

        def take(fmt: str) -> Any:
            nonlocal offset
            value = struct.unpack_from(order + fmt, buf, offset)[0]
            offset += struct.calcsize(fmt)
            return value

        def take_str() -> str:
            nonlocal offset
            n = take("Q")
            raw = buf[offset : offset + n]
            offset += n
            return raw.decode("utf-8", errors="replace")

        def take_value(kind: int, keep: bool) -> Any:
            nonlocal offset
            if kind == _GGUF_STRING:
                return take_str()
            if kind in _GGUF_SCALARS:
                return take(_GGUF_SCALARS[kind])
            if kind != _GGUF_ARRAY:
                raise ValueError(f"{path}: unknown GGUF value type {kind}")
            elem, count = take("I"), take("Q")
            if elem in _GGUF_SCALARS:
                dtype = np.dtype(order + _GGUF_SCALARS[elem].replace("?", "b1"))
                size = dtype.itemsize * count
                values = np.frombuffer(buf, dtype=dtype, count=count, offset=offset).tolist() if keep else None
                offset += size
                return values
            if elem == _GGUF_STRING:
                if not keep:
                    for _ in range(count):
                        offset += take("Q")
                    return None
                return [take_str() for _ in range(count)]
            return [take_value(elem, keep) for _ in range(count)]  # nested arrays

        meta: dict[str, Any] = {}
        for _ in range(kv_count):
            key = take_str()
            keep = key.startswith(prefixes)
            value = take_value(take("I"), keep)
            if keep:
                meta[key] = value
        return meta
    except (struct.error, IndexError) as exc:
        raise ValueError(f"{path} is not a readable GGUF file (truncated metadata): {exc}") from exc
    finally:
        buf.close()


def _unique_vocab(tokens: Sequence[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)  # a duplicate string keeps its first id; later copies can't be produced by encoding
    return vocab


def _split_merge(merge: str, vocab: Mapping[str, int]) -> tuple[str, str]:
    parts = merge.split(" ")
    if len(parts) == 2:
        return parts[0], parts[1]
    # A side that itself holds a space (SentencePiece vocabularies can): pick the split whose halves both exist.
    for i, ch in enumerate(merge):
        if ch == " " and merge[:i] in vocab and merge[i + 1 :] in vocab:
            return merge[:i], merge[i + 1 :]
    raise ValueError(f"cannot parse GGUF merge {merge!r}")


def _merges_from_scores(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges implied by a vocabulary: every (left, right) that forms a token, best score first."""
    vocab = _unique_vocab(tokens)
    candidates: list[tuple[float, int, int, str, str]] = []
    for token_id, token in enumerate(tokens):
        if types and types[token_id] not in (_NORMAL, _USER_DEFINED):
            continue
        if vocab[token] != token_id or len(token) < 2:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                candidates.append((-scores[token_id], vocab[left], vocab[right], left, right))
    candidates.sort()
    return [(left, right) for *_, left, right in candidates]


def _bpe(**kwargs: Any) -> models.BPE:
    try:
        return models.BPE(**kwargs)
    except Exception as exc:  # tokenizers raises a bare Exception, e.g. for a merge naming a missing token
        raise ValueError(f"GGUF vocabulary and merges are inconsistent: {exc}") from exc


def _gguf_byte_level_backend(meta: dict[str, Any]) -> RustTokenizer:
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    if "tokenizer.ggml.merges" not in meta:
        raise ValueError("GGUF byte-level BPE tokenizer has no tokenizer.ggml.merges")
    pre_name = meta.get("tokenizer.ggml.pre") or "default"
    spec = _PRE_TOKENIZERS.get(pre_name)
    if spec is None:
        raise ValueError(
            f"unknown GGUF pre-tokenizer {pre_name!r} (tokenizer.ggml.pre); supported: {sorted(_PRE_TOKENIZERS)}"
        )

    _, char_to_byte = _byte_alphabet()
    spelled = []
    for tok, kind in zip(tokens, types, strict=True):
        # Control and user-defined tokens are matched as whole strings, so they keep their literal spelling; a normal
        # token written with characters outside the byte alphabet gets re-spelled so the decoder can map it to bytes.
        if kind in (_CONTROL, _USER_DEFINED) or all(c in char_to_byte for c in tok):
            spelled.append(tok)
        else:
            spelled.append(_spell_in_byte_alphabet(tok))
    vocab = _unique_vocab(spelled)
    merges = [_split_merge(m, vocab) for m in meta["tokenizer.ggml.merges"]]

    backend = RustTokenizer(_bpe(vocab=vocab, merges=merges, ignore_merges=spec.ignore_merges, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(pattern), behavior="isolated") for pattern in spec.splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    _add_typed_tokens(backend, spelled, types)
    return backend


def _gguf_sentencepiece_backend(meta: dict[str, Any]) -> RustTokenizer:
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    scores: list[float] | None = meta.get("tokenizer.ggml.scores")
    vocab = _unique_vocab(tokens)
    if "tokenizer.ggml.merges" in meta:
        merges = [_split_merge(m, vocab) for m in meta["tokenizer.ggml.merges"]]
    elif scores is not None:
        merges = _merges_from_scores(tokens, scores, types)
    else:
        raise ValueError("GGUF SentencePiece tokenizer has neither tokenizer.ggml.merges nor tokenizer.ggml.scores")
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    has_byte_tokens = any(t == _BYTE for t in types) or "<0x00>" in vocab
    backend = RustTokenizer(
        _bpe(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=has_byte_tokens)
    )
    add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    # llama.cpp turns spaces into "▁" and, with add_space_prefix, puts one in front of every run of text that starts
    # the input or follows a special token; Metaspace's "always" scheme does exactly that per split segment.
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="always" if add_space_prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    _add_typed_tokens(backend, tokens, types)
    return backend


def _add_typed_tokens(backend: RustTokenizer, tokens: Sequence[str], types: Sequence[int]) -> None:
    """Control/unknown tokens become special added tokens; user-defined ones plain added tokens (matched whole)."""
    special = [
        AddedToken(tok, special=True, normalized=False)
        for tok, kind in zip(tokens, types, strict=True)
        if kind in (_CONTROL, _UNKNOWN) and tok
    ]
    user = [
        AddedToken(tok, special=False, normalized=False)
        for tok, kind in zip(tokens, types, strict=True)
        if kind == _USER_DEFINED
    ]
    if special:
        backend.add_special_tokens(special)
    if user:
        backend.add_tokens(user)


def _bos_eos_post_processor(
    backend: RustTokenizer, bos_id: int | None, eos_id: int | None, add_bos: bool, add_eos: bool
) -> processors.TemplateProcessing | None:
    """A post-processor that puts BOS before and/or EOS after each sequence, or None when neither is wanted."""
    bos = backend.id_to_token(bos_id) if add_bos and bos_id is not None else None
    eos = backend.id_to_token(eos_id) if add_eos and eos_id is not None else None
    if bos is None and eos is None:
        return None

    def sequence(name: str, type_id: int) -> list[str]:
        return [f"{t}:{type_id}" for t in (bos,) if t] + [f"{name}:{type_id}"] + [f"{t}:{type_id}" for t in (eos,) if t]

    specials = [(t, i) for t, i in ((bos, bos_id), (eos, eos_id)) if t is not None]
    return processors.TemplateProcessing(
        single=sequence("$A", 0),
        pair=sequence("$A", 0) + sequence("$B", 1),
        special_tokens=list(dict.fromkeys(specials)),
    )


# --- Hugging Face directory -----------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _token_content(entry: Any) -> str | None:
    """tokenizer_config stores special tokens as strings or as serialized AddedTokens ({"content": ...})."""
    if isinstance(entry, str):
        return entry
    if isinstance(entry, Mapping) and isinstance(entry.get("content"), str):
        return entry["content"]
    return None


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


# --- chat templates -------------------------------------------------------------------------------------------------
class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering keeps the body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson HTML-escapes <, >, & and '; Hugging Face templates expect plain json.dumps output.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"chat template does not parse (line {exc.lineno}): {exc.message}") from exc


def _normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Copy messages into plain dicts; join text parts; reject anything a template can't render."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{i}] has no 'role' (a non-empty string such as 'user' or 'assistant')")
        msg = dict(message)
        content = message.get("content")
        if content is None:
            if not message.get("tool_calls"):  # only an assistant turn that calls tools may omit its content
                problem = "has no 'content'" if "content" not in message else "has content None and no tool_calls"
                raise ValueError(f"messages[{i}] (role {role!r}) {problem}")
        elif isinstance(content, str):
            pass
        elif isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, Mapping):
                    raise ValueError(f"messages[{i}].content[{j}] must be a dict like {{'type': 'text', 'text': ...}}")
                kind = part.get("type")
                if kind != "text":
                    raise ValueError(
                        f"messages[{i}].content[{j}] has unsupported type {kind!r}; only 'text' parts are supported"
                    )
                text = part.get("text")
                if not isinstance(text, str):
                    raise ValueError(f"messages[{i}].content[{j}] is a text part without a string 'text'")
                texts.append(text)
            msg["content"] = "\n".join(texts)
        else:
            raise ValueError(
                f"messages[{i}].content must be a string or a list of text parts, got {type(content).__name__}"
            )
        out.append(msg)
    return out


# --- the tokenizer --------------------------------------------------------------------------------------------------
class ModelSourceLike(Protocol):
    kind: str  # "gguf" | "hf_dir"
    path: Any


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what an inference engine needs around it: special ids, EOS set, chat template."""

    def __init__(
        self,
        backend: RustTokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_ids: Sequence[int] = (),
        pad_token_id: int | None = None,
        unk_token_id: int | None = None,
        chat_template: str | dict[str, str] | None = None,
        name_or_path: str | None = None,
    ) -> None:
        self.backend = backend
        self.name_or_path = name_or_path
        n = backend.get_vocab_size(with_added_tokens=True)
        for name, tid in (
            ("bos_token_id", bos_token_id),
            ("pad_token_id", pad_token_id),
            ("unk_token_id", unk_token_id),
        ):
            if tid is not None and not 0 <= tid < n:
                raise ValueError(f"{name} {tid} is outside the vocabulary (size {n})")
        for tid in eos_token_ids:
            if not 0 <= tid < n:
                raise ValueError(f"eos token id {tid} is outside the vocabulary (size {n})")
        self.bos_token_id = bos_token_id
        self.eos_token_ids: list[int] = list(dict.fromkeys(eos_token_ids))
        self.pad_token_id = pad_token_id
        self.unk_token_id = unk_token_id
        self._templates: dict[str, str] = (
            dict(chat_template)
            if isinstance(chat_template, Mapping)
            else ({"default": chat_template} if chat_template else {})
        )
        self._special_ids = frozenset(tid for tid, tok in backend.get_added_tokens_decoder().items() if tok.special)
        # Whether encode() prepends BOS is whatever the backend's post-processor does; computed once.
        self.add_bos_token = bool(
            bos_token_id is not None and backend.encode("", add_special_tokens=True).ids[:1] == [bos_token_id]
        )

    # --- construction ---------------------------------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> Tokenizer:
        meta = read_gguf_metadata(path)
        if "tokenizer.ggml.tokens" not in meta:
            raise ValueError(f"{path} has no tokenizer (tokenizer.ggml.tokens missing)")
        for key in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            if key in meta and len(meta[key]) != len(meta["tokenizer.ggml.tokens"]):
                raise ValueError(
                    f"{path}: {key} has {len(meta[key])} entries for {len(meta['tokenizer.ggml.tokens'])} tokens"
                )
        kind = meta.get("tokenizer.ggml.model")
        if kind == "gpt2":
            backend = _gguf_byte_level_backend(meta)
            add_bos_default = _PRE_TOKENIZERS[meta.get("tokenizer.ggml.pre") or "default"].add_bos
        elif kind == "llama":
            backend = _gguf_sentencepiece_backend(meta)
            add_bos_default = True  # llama.cpp's default for SentencePiece vocabularies
        else:
            raise ValueError(
                f"unsupported GGUF tokenizer model {kind!r} (tokenizer.ggml.model); supported: 'gpt2', 'llama'"
            )
        tokens = meta["tokenizer.ggml.tokens"]

        def token_id(key: str) -> int | None:
            tid = meta.get(f"tokenizer.ggml.{key}")
            return int(tid) if tid is not None and 0 <= int(tid) < len(tokens) else None

        bos, eos = token_id("bos_token_id"), token_id("eos_token_id")
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default))
        add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
        processor = _bos_eos_post_processor(backend, bos, eos, add_bos, add_eos)
        if processor is not None:
            backend.post_processor = processor

        # The default template, plus named ones (tokenizer.chat_template.tool_use, ...) some conversions carry.
        template: str | dict[str, str] | None = meta.get("tokenizer.chat_template")
        named = {
            key.removeprefix("tokenizer.chat_template."): value
            for key, value in meta.items()
            if key.startswith("tokenizer.chat_template.") and isinstance(value, str)
        }
        if named:
            template = {**({"default": template} if template else {}), **named}
        eos_ids = [eos] if eos is not None else []
        eos_ids += [t for t in (token_id("eot_token_id"), token_id("eom_token_id")) if t is not None]
        eos_ids += _turn_end_ids(backend, template)
        return cls(
            backend,
            bos_token_id=bos,
            eos_token_ids=eos_ids,
            pad_token_id=token_id("padding_token_id"),
            unk_token_id=token_id("unknown_token_id"),
            chat_template=template,
            name_or_path=str(path),
        )

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        root = Path(path)
        tokenizer_file = root / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{root} has no tokenizer.json")
        try:
            backend = RustTokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"{tokenizer_file} is not a valid tokenizer.json: {exc}") from exc
        config = _read_json(root / "tokenizer_config.json")
        special_map = _read_json(root / "special_tokens_map.json")
        generation = _read_json(root / "generation_config.json")
        model_config = _read_json(root / "config.json")

        def special_id(name: str) -> int | None:
            content = _token_content(config.get(name)) or _token_content(special_map.get(name))
            return backend.token_to_id(content) if content is not None else None

        bos = special_id("bos_token")
        if bos is None:
            bos = next(
                iter(_as_id_list(generation.get("bos_token_id")) + _as_id_list(model_config.get("bos_token_id"))), None
            )
        eos = special_id("eos_token")
        eos_ids = ([eos] if eos is not None else []) + _as_id_list(generation.get("eos_token_id"))
        if not eos_ids:
            eos_ids = _as_id_list(model_config.get("eos_token_id"))

        # tokenizer.json's post-processor already adds BOS where the model wants it; an explicit add_bos_token /
        # add_eos_token in tokenizer_config overrides it (transformers does the same).
        if "add_bos_token" in config or "add_eos_token" in config:
            adds_bos = bos is not None and backend.encode("", add_special_tokens=True).ids[:1] == [bos]
            want_bos = bool(config.get("add_bos_token", adds_bos))
            want_eos = bool(config.get("add_eos_token", False))
            if want_bos != adds_bos or want_eos:
                backend.post_processor = _bos_eos_post_processor(backend, bos, eos, want_bos, want_eos)

        template: str | dict[str, str] | None = None
        jinja_file = root / "chat_template.jinja"
        json_file = root / "chat_template.json"
        if jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        elif json_file.is_file():
            template = _read_json(json_file).get("chat_template")
        if template is None:
            template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            template = {t["name"]: t["template"] for t in template if isinstance(t, Mapping)}
        eos_ids += _turn_end_ids(backend, template)
        pad = special_id("pad_token")
        if pad is None:
            pad = next(iter(_as_id_list(generation.get("pad_token_id"))), None)
        return cls(
            backend,
            bos_token_id=bos,
            eos_token_ids=eos_ids,
            pad_token_id=pad,
            unk_token_id=special_id("unk_token"),
            chat_template=template,
            name_or_path=str(root),
        )

    @classmethod
    def from_source(cls, source: ModelSourceLike | str | os.PathLike) -> Tokenizer:
        """From a loader's ModelSource (`.kind` in {"gguf", "hf_dir"}, `.path`), or a plain path."""
        if isinstance(source, (str, os.PathLike)):
            return cls.from_path(source)
        kind = getattr(source, "kind", None)
        path = getattr(source, "path", None)
        if path is None:
            raise ValueError(f"model source {source!r} has no path")
        if kind == "gguf":
            return cls.from_gguf(path)
        if kind == "hf_dir":
            return cls.from_dir(path)
        raise ValueError(f"unknown model source kind {kind!r}; expected 'gguf' or 'hf_dir'")

    @classmethod
    def from_path(cls, path: str | os.PathLike) -> Tokenizer:
        """A .gguf file or a directory holding tokenizer.json."""
        p = Path(path)
        if p.is_dir():
            return cls.from_dir(p)
        if p.is_file() and p.suffix.lower() == ".gguf":
            return cls.from_gguf(p)
        raise FileNotFoundError(f"no tokenizer at {p}: expected a .gguf file or a directory with tokenizer.json")

    # --- encode / decode ------------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        return [self.backend.id_to_token(i) for i in ids]

    def convert_tokens_to_ids(self, tokens: Sequence[str]) -> list[int | None]:
        return [self.backend.token_to_id(t) for t in tokens]

    def id_to_piece(self, token_id: int) -> str:
        """The text one token decodes to on its own (special tokens included); "" for an id outside the vocab."""
        return self.backend.decode([token_id], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(self._special_ids)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def _token_str(self, token_id: int | None) -> str | None:
        return self.backend.id_to_token(token_id) if token_id is not None else None

    @property
    def bos_token(self) -> str | None:
        return self._token_str(self.bos_token_id)

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def eos_token(self) -> str | None:
        return self._token_str(self.eos_token_id)

    # --- chat -----------------------------------------------------------------------------------------------------
    @property
    def chat_template(self) -> str:
        """The model's default template, or ChatML when it ships none."""
        return self._templates.get("default") or next(iter(self._templates.values()), CHATML_TEMPLATE)

    @property
    def has_chat_template(self) -> bool:
        return bool(self._templates)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        *,
        chat_template: str | None = None,
        continue_final_message: bool = False,
        **kwargs: Any,
    ) -> str:
        """Render a conversation with the model's Jinja template (as transformers' apply_chat_template does).

        `continue_final_message` leaves the last message open, so generation continues it (assistant prefill).
        Extra keyword arguments (e.g. `enable_thinking`, `documents`) are passed to the template.
        """
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be set")
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, Mapping) for t in tools)):
            raise ValueError("tools must be a list of JSON-schema dicts")
        chat = _normalize_messages(messages)
        if chat_template is None:
            chat_template = self._templates.get("tool_use") if tools and "tool_use" in self._templates else None
            chat_template = chat_template or self.chat_template
        context: dict[str, Any] = {
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            "unk_token": self._token_str(self.unk_token_id) or "",
            "pad_token": self._token_str(self.pad_token_id) or "",
        }
        context.update(kwargs)
        try:
            rendered = _compile_template(chat_template).render(
                messages=chat, tools=tools, add_generation_prompt=add_generation_prompt, **context
            )
        except jinja2.TemplateError as exc:  # raise_exception() in the template, or a template bug
            raise ValueError(f"chat template rejected the conversation: {exc}") from exc
        if continue_final_message:
            if not chat or not isinstance(chat[-1].get("content"), str) or not chat[-1]["content"]:
                raise ValueError("continue_final_message needs a final message with text content")
            final = chat[-1]["content"]
            cut = rendered.rfind(final)
            if cut < 0:
                stripped = final.strip()
                cut = rendered.rfind(stripped)
                if cut < 0 or not stripped:
                    raise ValueError("the chat template does not reproduce the final message; cannot continue it")
                final = stripped
            rendered = rendered[: cut + len(final)]
        return rendered

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.name_or_path!r}, vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
            f"eos_ids={self.eos_token_ids}, add_bos={self.add_bos_token})"
        )


def _turn_end_ids(backend: RustTokenizer, template: str | Mapping[str, str] | None) -> list[int]:
    """Ids of turn-end markers the chat template writes; generation should stop on those too."""
    if not template:
        return []
    text = "\n".join(template.values()) if isinstance(template, Mapping) else template
    special = {tok.content: tid for tid, tok in backend.get_added_tokens_decoder().items() if tok.special}
    return [special[m] for m in _TURN_END_MARKERS if m in special and m in text]
