"""The GPU probe scripts (scripts/probe_*.py) off the GPU: their build-and-run helper with host-only programs, its
failure paths, and each probe's parsing of its program's output into a table and JSON."""

import json
import sys
from pathlib import Path

import pytest

from tokenmill.kernels.megakernel.build import find_nvcc

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import cuda_probe  # noqa: E402
import probe_consumer_issue  # noqa: E402
import probe_instruction_fetch  # noqa: E402
import probe_kv_streaming  # noqa: E402
import probe_read_latency  # noqa: E402

needs_nvcc = pytest.mark.skipif(find_nvcc() is None, reason="nvcc not installed")


@needs_nvcc
def test_build_and_run_returns_the_programs_output():
    source = '#include <cstdio>\nint main() { printf("copy %d\\n", 6 * 7); return 0; }\n'
    assert cuda_probe.build_and_run(source, ("-O2",)) == "copy 42\n"


@needs_nvcc
@pytest.mark.parametrize("source,message", [
    ("int main() { return undeclared; }\n", "nvcc failed"),
    ('#include <cstdio>\nint main() { fprintf(stderr, "no GPU\\n"); return 3; }\n', "the probe failed:\nno GPU"),
])
def test_build_and_run_exits_with_a_message(source, message):
    with pytest.raises(SystemExit, match=message):
        cuda_probe.build_and_run(source, ())


def test_build_and_run_without_nvcc_says_so(monkeypatch):
    monkeypatch.setattr(cuda_probe, "find_nvcc", lambda: None)
    with pytest.raises(SystemExit, match="nvcc not found"):
        cuda_probe.build_and_run("int main() { return 0; }\n", ())


def run_probe(module, stdout: str, tmp_path: Path, monkeypatch, capsys) -> tuple[dict, str]:
    monkeypatch.setattr(module, "build_and_run", lambda source, flags: stdout)
    out = tmp_path / "probe.json"
    monkeypatch.setattr(sys, "argv", ["probe", "--out", str(out)])
    module.main()
    return json.loads(out.read_text()), capsys.readouterr().out


def test_kv_streaming_table_and_json(tmp_path, monkeypatch, capsys):
    stdout = "copy 4000.0\nmode head-box 2 4400.0\nmode bulk 4 4600.5\n"
    result, printed = run_probe(probe_kv_streaming, stdout, tmp_path, monkeypatch, capsys)
    assert result == {"copy_gb_per_s": 4000.0, "rows": [
        {"copy": "head-box", "in_flight": 2, "gb_per_s": 4400.0},
        {"copy": "bulk", "in_flight": 4, "gb_per_s": 4600.5}]}
    assert "head-box" in printed and "1.10" in printed and "1.15" in printed  # ratios to the copy bandwidth


def test_instruction_fetch_table_and_json(tmp_path, monkeypatch, capsys):
    stdout = "0 512 3.460 2.600 2.480\n1 16384 5.910 5.670 5.670\nnoise line\n"
    result, printed = run_probe(probe_instruction_fetch, stdout, tmp_path, monkeypatch, capsys)
    assert result["rows"] == [
        {"hbm_busy": False, "instructions": 512, "kib": 8, "cycles_per_instruction": [3.46, 2.6, 2.48]},
        {"hbm_busy": True, "instructions": 16384, "kib": 256, "cycles_per_instruction": [5.91, 5.67, 5.67]}]
    assert "busy" in printed and "256 KB" in printed


def test_consumer_issue_table_and_json(tmp_path, monkeypatch, capsys):
    stdout = ("consumer=lds vecs=16 mode=idle cycles_per_round=400.0 ns_per_round=202.0 stream_gbps=0.0\n"
              "consumer=lds vecs=16 mode=stream cycles_per_round=1200.0 ns_per_round=606.1 stream_gbps=4400.5\n"
              "consumer=alu vecs=1 mode=try-wait cycles_per_round=80.5 ns_per_round=40.7 stream_gbps=0.0\n")
    result, printed = run_probe(probe_consumer_issue, stdout, tmp_path, monkeypatch, capsys)
    assert result["rows"][1] == {"consumer": "lds", "vecs": 16, "mode": "stream", "cycles_per_round": 1200.0,
                                 "ns_per_round": 606.1, "stream_gbps": 4400.5}
    assert [r["mode"] for r in result["rows"]] == ["idle", "stream", "try-wait"]
    assert "3.00" in printed  # stream vs idle for the same pass
    assert "try-wait" in printed.splitlines()[-2] and " - " in printed.splitlines()[-2]  # no idle row for alu x 1


@needs_nvcc
def test_consumer_issue_probe_compiles_for_sm90a(tmp_path):
    import subprocess

    src = tmp_path / "probe.cu"
    src.write_text(probe_consumer_issue.source())
    assert "uint32_t rmsnorm_pair(" in src.read_text() and "RMSNORM_PAIR" not in src.read_text()
    proc = subprocess.run([find_nvcc(), "-arch=sm_90a", "-O1", "-std=c++17", "-o", str(tmp_path / "probe"), str(src)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(mode in probe_consumer_issue.SOURCE for mode in probe_consumer_issue.MODES)


def test_read_latency_table_and_json(tmp_path, monkeypatch, capsys):
    stdout = ("mode=none inflight=0 chase_ns=600.0 stage8_ns=900.0 stage64_ns=1500.0 streamers=0 stream_gbps=0.0\n"
              "mode=all inflight=2 chase_ns=1800.0 stage8_ns=2700.0 stage64_ns=4500.0 streamers=132 "
              "stream_gbps=4300.0\n"
              "handoff=tagged poll=warp-first mode=all-but-readers inflight=2 mean_ns=900.5 last_ns=1400.0\n")
    result, printed = run_probe(probe_read_latency, stdout, tmp_path, monkeypatch, capsys)
    assert result["rows"][1] == {"mode": "all", "inflight": 2, "chase_ns": 1800.0, "stage8_ns": 2700.0,
                                 "stage64_ns": 4500.0, "streamers": 132, "stream_gbps": 4300.0}
    assert result["handoffs"] == [{"kind": "tagged", "poll": "warp-first", "mode": "all-but-readers", "inflight": 2,
                                   "mean_ns": 900.5, "last_ns": 1400.0}]
    lines = printed.splitlines()
    read_row = next(line for line in lines if line.startswith("all "))
    assert read_row.split()[:2] == ["all", "2"] and read_row.count("3.00") == 3  # every read 3x its idle time
    assert lines[-2].split() == ["tagged", "warp-first", "all-but-readers", "2", "900", "1400"]  # (then the JSON)


@needs_nvcc
def test_read_latency_probe_compiles_for_sm90a(tmp_path):
    import subprocess

    src = tmp_path / "probe.cu"
    src.write_text(probe_read_latency.SOURCE)
    proc = subprocess.run([find_nvcc(), "-arch=sm_90a", "-O1", "-std=c++17", "-o", str(tmp_path / "probe"), str(src)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(f'"{mode}"' in probe_read_latency.SOURCE for mode in probe_read_latency.MODES)


def test_probe_sources_name_what_the_parsers_read():
    # The programs print the lines the parsers expect (a rename on either side breaks a real run silently).
    assert 'printf("copy %.1f\\n"' in probe_kv_streaming.SOURCE
    assert 'printf("mode %s %d %.1f\\n"' in probe_kv_streaming.SOURCE
    assert 'printf("%d %d %.3f %.3f %.3f\\n"' in probe_instruction_fetch.source()
    assert ('"consumer=%s vecs=%d mode=%s cycles_per_round=%.1f ns_per_round=%.1f stream_gbps=%.1f\\n"'
            in probe_consumer_issue.SOURCE)
    assert ('"mode=%s inflight=%d chase_ns=%.1f stage8_ns=%.1f stage64_ns=%.1f streamers=%d stream_gbps=%.1f\\n"'
            in probe_read_latency.SOURCE)
    assert '"handoff=%s poll=%s mode=%s inflight=%d mean_ns=%.1f last_ns=%.1f\\n"' in probe_read_latency.SOURCE
