"""bench offline's llama-server peer: a server that crashes with its default flags is retried without repacking."""

from __future__ import annotations

import stat
import sys
import textwrap

from tokenmill.bench.offline import bench_llama_server

FAKE_SERVER = textwrap.dedent(
    """
    import json, os, sys
    from http.server import BaseHTTPRequestHandler, HTTPServer

    port = int(sys.argv[sys.argv.index("--port") + 1])
    repack = "--no-repack" not in sys.argv

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"{}")

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if repack:  # like the native build whose repacked kernels die on the first request
                os._exit(132)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for _ in range(body["n_predict"]):
                self.wfile.write(b'data: {"content": "x", "stop": false}\\n\\n')
            self.wfile.write(b'data: {"content": "", "stop": true, "tokens_predicted": %d}\\n\\n' % body["n_predict"])

    HTTPServer(("127.0.0.1", port), Handler).serve_forever()
    """
)


def test_crashing_server_is_retried_without_repacking(tmp_path):
    script = tmp_path / "fake_llama_server.py"
    script.write_text(FAKE_SERVER)
    binary = tmp_path / "llama-server"
    binary.write_text(f"#!/bin/sh\nexec {sys.executable} {script} \"$@\"\n")
    binary.chmod(binary.stat().st_mode | stat.S_IEXEC)
    res = bench_llama_server(str(binary), "model.gguf", [1, 2, 3], output_len=5, concurrency=3, slots=2, repeats=1)
    assert res.extra["extra_args"] == ["--no-repack"]
    assert len(res.extra["crashes"]) == 1 and "132" in res.extra["crashes"][0]
    assert res.single is not None and res.aggregate_tok_s > 0 and res.aggregate_batch == 3
