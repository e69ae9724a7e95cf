"""The command line as a person uses it: generate, chat, bench help, and clear errors for bad input."""

from __future__ import annotations

import subprocess
import sys

TIMEOUT = 180


def tokenmill(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokenmill", *args], input=stdin, capture_output=True, text=True,
                          timeout=TIMEOUT)


def test_generate_streams_tokens(tiny_model_dir):
    r = tokenmill("generate", str(tiny_model_dir), "--prompt", "<5> <6> <7>", "--max-tokens", "6", "--device", "cpu",
                  "--max-model-len", "128")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.split()) == 6  # six word-level tokens, streamed


def test_chat_answers_and_exits(tiny_model_dir):
    r = tokenmill("chat", str(tiny_model_dir), "--max-tokens", "4", "--device", "cpu", "--max-model-len", "256",
                  stdin="<5> <6>\n/reset\n<7>\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert "tokenmill chat" in r.stdout
    assert r.stdout.count(">>> ") == 4


def test_bad_input_is_a_message_not_a_traceback(tmp_path):
    r = tokenmill("generate", str(tmp_path / "missing.gguf"), "--prompt", "hi")
    assert r.returncode == 2
    assert "tokenmill: error:" in r.stderr and "Traceback" not in r.stderr
    r = tokenmill("serve", "--kv-cache-memory", "lots")
    assert r.returncode == 2 and "not a memory size" in r.stderr


def test_every_subcommand_has_help():
    for args in (["serve"], ["generate"], ["chat"], ["bench", "offline"], ["bench", "serve"], ["bench", "decode"],
                 ["train"]):
        r = tokenmill(*args, "--help")
        assert r.returncode == 0, (args, r.stderr)
        assert "usage: tokenmill" in r.stdout
