import pytest

from tokenmill.workload.sessions import generate_sessions, parse_workload_spec
from tokenmill.workload.text import PromptSynthesizer, TokenizerAdapter, load_tokenizer, stable_words
from tokenmill.workload.traces import Trace, TraceRequest, rechunk_hash_ids


def common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def test_text_for_key_is_exact_and_prefix_stable(toy_tokenizer):
    synth = PromptSynthesizer(toy_tokenizer, seed=1)
    enc = TokenizerAdapter(toy_tokenizer).encode
    for n in (1, 7, 255, 256, 257, 1000):
        text = synth.text_for_key(("doc", 3), n)
        assert enc(text) == synth.tokens_for_key(("doc", 3), n)
        assert len(enc(text)) == n
    long, short = synth.tokens_for_key(("doc", 3), 700), synth.tokens_for_key(("doc", 3), 300)
    assert long[:300] == short
    other = synth.tokens_for_key(("doc", 4), 300)
    assert common_prefix(other, short) < 3
    # Another synthesizer with the same seed writes the same text; another seed does not.
    assert PromptSynthesizer(toy_tokenizer, seed=1).text_for_key(("doc", 3), 50) == synth.text_for_key(("doc", 3), 50)
    assert PromptSynthesizer(toy_tokenizer, seed=2).text_for_key(("doc", 3), 50) != synth.text_for_key(("doc", 3), 50)


def _trace_sharing_check(tokenizer, block_size):
    reqs = [
        TraceRequest(0, 5 * block_size + 3, 1, [10, 11, 12, 13, 14, 15]),
        TraceRequest(1, 3 * block_size, 1, [10, 11, 20]),
        TraceRequest(2, 4 * block_size + 1, 1, [10, 11, 12, 30, 31]),
        TraceRequest(3, 2 * block_size, 1, [40, 41]),
    ]
    synth = PromptSynthesizer(tokenizer, seed=0)
    enc = TokenizerAdapter(tokenizer).encode
    tokens = [enc(synth.prompt_for_hash_ids(r.hash_ids, r.input_length, block_size)) for r in reqs]
    for r, t in zip(reqs, tokens):
        assert len(t) == r.input_length
    for i, a in enumerate(reqs):
        for j, b in enumerate(reqs):
            shared_blocks = common_prefix(a.hash_ids, b.hash_ids)
            expected = min(shared_blocks * block_size, a.input_length, b.input_length)
            got = common_prefix(tokens[i], tokens[j])
            if i == j:
                assert got == a.input_length
            else:
                # Identical up to the last shared block; the first different block differs (almost surely from
                # its first token, at worst within a few tokens).
                assert expected <= got < expected + 4
    # Block boundaries: request 0's tokens are the concatenation of its blocks.
    flat = [tok for h in reqs[0].hash_ids for tok in synth.block_tokens(h, block_size)]
    assert tokens[0] == flat[: reqs[0].input_length]


def test_hash_id_sharing_becomes_token_prefix_sharing_toy(toy_tokenizer):
    _trace_sharing_check(toy_tokenizer, 16)
    _trace_sharing_check(toy_tokenizer, 64)


def test_hash_id_sharing_becomes_token_prefix_sharing_smollm2(smol_tokenizer):
    _trace_sharing_check(smol_tokenizer, 16)
    _trace_sharing_check(smol_tokenizer, 512)


def test_rechunked_trace_prompts_match_original_sharing(toy_tokenizer):
    t = Trace(
        [TraceRequest(0, 1100, 1, [1, 2, 3]), TraceRequest(1, 1024, 1, [1, 2]), TraceRequest(2, 700, 1, [1, 9])],
        block_size=512,
    )
    fine = rechunk_hash_ids(t, 16)
    synth = PromptSynthesizer(toy_tokenizer)
    enc = TokenizerAdapter(toy_tokenizer).encode
    toks = [enc(synth.prompt_for_hash_ids(r.hash_ids, r.input_length, 16)) for r in fine.requests]
    assert common_prefix(toks[0], toks[1]) == 1024
    assert 512 <= common_prefix(toks[0], toks[2]) < 516


def test_session_prompts_share_tokens_exactly_where_hash_ids_do(toy_tokenizer):
    """The prompt of every turn (prefix + history + message, answers as their own segments) tokenizes to blocks
    whose sharing across all requests equals the sharing of the sessions' hash ids."""
    block = 16
    sessions = generate_sessions(parse_workload_spec(f"mix:tool_agent=1,chat=1,sessions=12,scale=0.05,block={block}"))
    synth = PromptSynthesizer(toy_tokenizer, seed=0)
    enc = TokenizerAdapter(toy_tokenizer).encode
    prompts = []
    for s in sessions:
        for t in s.turns:
            tokens = enc(synth.text_for_segments(s.input_segments(t.index)))
            assert len(tokens) == t.input_tokens
            assert tokens == synth.tokens_for_segments(s.input_segments(t.index))
            prompts.append((t.hash_ids, tokens))
    checked = 0
    for i in range(len(prompts)):
        for j in range(i + 1, len(prompts)):
            (ha, ta), (hb, tb) = prompts[i], prompts[j]
            blocks = common_prefix(ha, hb)
            tokens = common_prefix(ta, tb)
            # Shared hash ids <=> shared whole blocks of tokens (a partial last block counts when it is shared).
            assert tokens >= min(blocks * block, len(ta), len(tb))
            if blocks < min(len(ha), len(hb)):
                assert tokens < (blocks + 1) * block
            checked += blocks > 0
    assert checked > 10


def test_chat_template_keeps_shared_system_prompt_prefix(smol_tokenizer):
    sessions = generate_sessions(parse_workload_spec("tool_agent,sessions=40,scale=0.05,seed=2"))
    synth = PromptSynthesizer(smol_tokenizer)
    by_system = {}
    for s in sessions:
        by_system.setdefault(s.prefix[0].key, []).append(s)
    a, b = next(group for group in by_system.values() if len(group) > 1)[:2]
    ids = []
    for s in (a, b):
        system = synth.text_for_segments(s.prefix)
        user = synth.text_for_key(s.turns[0].message.key, s.turns[0].message.tokens)
        # SmolLM2's chat template (ChatML).
        text = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        ids.append(smol_tokenizer.encode(text, add_special_tokens=False).ids)
    # <|im_start|>system\n + the system prompt's tokens are shared.
    assert common_prefix(*ids) >= a.prefix_tokens + 2


def test_stable_words_of_a_real_tokenizer(smol_tokenizer):
    ids, words = stable_words(smol_tokenizer)
    assert len(ids) > 5000
    assert all(w.startswith(" ") and w[1:].isalpha() for w in words)


class CharTokenizer:
    """One token per character: no ' word' tokens, so synthesis must refuse it."""

    vocab_size = 128

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_unsuitable_tokenizer_is_refused():
    with pytest.raises(ValueError, match="byte-level BPE"):
        PromptSynthesizer(CharTokenizer())


def test_load_tokenizer_reads_a_tokenizer_json_or_a_folder_holding_one(tmp_path, toy_tokenizer):
    path = tmp_path / "tokenizer.json"
    toy_tokenizer.save(str(path))
    want = toy_tokenizer.encode("abc defg hij", add_special_tokens=False).ids
    for source in (path, tmp_path):  # (a folder: e.g. random weights with a real tokenizer beside them)
        tok = load_tokenizer(str(source))
        assert tok.encode("abc defg hij") == want
        assert tok.encode_batch(["abc defg hij", "abc"]) == [want, tok.encode("abc")]
    with pytest.raises(ValueError, match="no tokenizer from"):
        load_tokenizer(str(tmp_path / "missing"))


def test_load_tokenizer_from_a_gguf_is_the_one_the_server_uses(smollm2_path):
    # tokenmill's own tokenizer (no transformers, which only the test extra installs): the prompt lengths a benchmark
    # plans are the ones the server counts.
    from tokenmill.tokenizer import Tokenizer

    tok = load_tokenizer(str(smollm2_path))
    text = "Hello there, how are you doing today?"
    assert tok.encode(text) == Tokenizer.from_gguf(smollm2_path).encode(text, add_special_tokens=False)
