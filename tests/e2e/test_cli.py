"""The command line as a person uses it: generate, chat, bench help, and clear errors for bad input."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

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


def test_every_subcommand_has_help(capsys):
    r = tokenmill("serve", "--help")  # the installed entry point, in a process of its own
    assert r.returncode == 0, r.stderr
    assert "usage: tokenmill serve" in r.stdout
    from tokenmill.cli import main

    for args in (["generate"], ["chat"], ["bench", "offline"], ["bench", "serve"], ["bench", "decode"],
                 ["bench", "megakernel-ab"], ["train"]):  # the rest in this process (a process each took ~3 s)
        with pytest.raises(SystemExit) as exit_:
            main([*args, "--help"])
        assert exit_.value.code == 0, args
        assert f"usage: tokenmill {' '.join(args)}" in capsys.readouterr().out


def test_bad_engine_and_server_flags_are_messages(tiny_model_dir, capsys):
    """In-process (no model load for most): each is one `tokenmill: error:` line and exit status 2."""
    from tokenmill.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--port", "70000"])  # was an OverflowError traceback once the model had loaded
    assert exit_.value.code == 2 and "not a TCP port" in capsys.readouterr().err
    for flag in ("--max-num-seqs", "--max-num-batched-tokens"):  # 0 used to mean "the default"
        assert main(["generate", "--prompt", "hi", flag, "0"]) == 2
        assert f"{flag[2:].replace('-', '_')} must be >= 1" in capsys.readouterr().err
    assert main(["generate", "--prompt", "hi", "--device", "bogus"]) == 2
    assert "unknown device 'bogus'" in capsys.readouterr().err
    # the tiny model's context is 512 tokens: a larger --max-model-len was silently clamped to it
    assert main(["generate", str(tiny_model_dir), "--prompt", "<5>", "--device", "cpu", "--max-model-len", "1000"]) == 2
    assert "--max-model-len 1000 is larger than the model's context length (512 tokens)" in capsys.readouterr().err



def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    return [int(p) for task in Path(f"/proc/{pid}/task").iterdir() for p in (task / "children").read_text().split()]


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not Path(f"/proc/{pid}").exists()


def _start_serving(tiny_model_dir, *args: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "tokenmill", "serve", str(tiny_model_dir), "--device", "cpu",
                               "--max-model-len", "128", "--port", str(port), "--log-level", "warning", *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + TIMEOUT
    while True:
        assert server.poll() is None, server.communicate()[1]
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the server never became healthy"
        time.sleep(0.2)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process tree from /proc")
def test_serve_answers_then_stops_on_ctrl_c_with_its_engine_process(tiny_model_dir):
    """`python -m tokenmill serve` as a person runs it: the engine steps in a spawned process, Ctrl-C stops both."""
    server, url = _start_serving(tiny_model_dir)
    try:
        r = httpx.post(url + "/v1/completions", timeout=60, json={"prompt": "<5> <6>", "max_tokens": 4,
                                                                  "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        bad = httpx.post(url + "/v1/completions", json={"prompt": "<5>", "max_tokens": 1000})
        assert bad.status_code == 400 and "maximum context length" in bad.json()["error"]["message"]
        engines = _children(server.pid)
        assert engines, "no engine process"
        server.send_signal(signal.SIGINT)
        _, err = server.communicate(timeout=60)
        assert server.returncode in (0, 130) and "Traceback" not in err, err
        assert all(_wait_gone(pid) for pid in engines), "the engine process outlived the server"
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process tree from /proc")
def test_serve_from_several_api_server_processes(tiny_model_dir):
    """--api-server-count 3: three HTTP processes on one port and one engine; every answer complete, /metrics the
    same whichever process answers it, Ctrl-C to the first stops them all (the others are in their own groups)."""
    server, url = _start_serving(tiny_model_dir, "--api-server-count", "3")
    try:
        children = _children(server.pid)
        workers = [pid for pid in children if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]
        assert len(workers) == 3, "expected the engine and two more API server processes"

        def complete(i: int) -> int:
            with httpx.Client(timeout=60) as client:  # a connection of its own: the kernel picks the process
                body = {"prompt": [5 + i % 7, 6, 7], "max_tokens": 5 + i % 4, "ignore_eos": True, "temperature": 0}
                if i % 2:
                    return client.post(url + "/v1/completions", json=body).json()["usage"]["completion_tokens"]
                streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
                with client.stream("POST", url + "/v1/completions", json=streamed) as r:
                    events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
                text = "".join(c["text"] for e in events for c in e["choices"])
                assert len(text.split()) == events[-1]["usage"]["completion_tokens"]  # word-level tokens
                return events[-1]["usage"]["completion_tokens"]

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(8) as pool:
            counts = list(pool.map(complete, range(24)))
        assert counts == [5 + i % 4 for i in range(24)]
        want = float(sum(counts))

        def generated_tokens() -> float:  # each scrape on a new connection, so on any of the processes
            text = httpx.get(url + "/metrics", headers={"Connection": "close"}).text
            line = next(ln for ln in text.splitlines() if ln.startswith("tokenmill:generation_tokens_total"))
            return float(line.split()[-1])

        # A process learns of the other processes' requests from the engine's events on its own pipe, read by its own
        # thread: an answer can be complete before every other process has counted it (on a loaded 2-core machine,
        # for a while). The counts must agree once the events are in, and never pass the total.
        deadline = time.monotonic() + 30
        for _ in range(6):
            while (seen := generated_tokens()) != want:
                assert seen < want and time.monotonic() < deadline, f"generation_tokens_total {seen}, want {want}"
                time.sleep(0.2)
        bad = httpx.post(url + "/v1/completions", json={"prompt": "<5>", "max_tokens": 1000})
        assert bad.status_code == 400
        server.send_signal(signal.SIGINT)
        _, err = server.communicate(timeout=90)
        assert server.returncode in (0, 130) and "Traceback" not in err, err
        assert all(_wait_gone(pid) for pid in children), "a process outlived the server"
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()


def test_serve_runs_the_engine_in_a_process_unless_told_not_to():
    from tokenmill.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["serve"]).engine_process is True
    assert parser.parse_args(["serve", "--no-engine-process"]).engine_process is False
    assert parser.parse_args(["serve"]).api_server_count == 1
