"""The core install has no matplotlib (it is the `plot` extra): commands that draw nothing must work without it,
and a plot command must say what to install instead of failing with a traceback."""

import subprocess
import sys

import pytest

# sys.modules[name] = None makes `import name` raise ImportError, as on a core install.
NO_MATPLOTLIB = "import sys; sys.modules['matplotlib'] = None; sys.modules['matplotlib.pyplot'] = None; "


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_MATPLOTLIB + code], capture_output=True, text=True, timeout=120)


def test_every_cli_command_parses_without_matplotlib():
    proc = run_python("from tokenmill.cli import build_parser; p = build_parser(); "
                      "p.parse_args(['serve', '--help'])")
    assert proc.returncode == 0, proc.stderr
    assert "usage: tokenmill serve" in proc.stdout


def test_plot_command_without_matplotlib_is_a_clear_error(tmp_path):
    args = ["train", "plots", "--sweep", str(tmp_path)]
    proc = run_python(f"from tokenmill.cli import main; sys.exit(main({args!r}))")
    assert proc.returncode == 2, proc.stderr
    assert "plots need matplotlib: pip install 'tokenmill[plot]'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_pyplot_loads_matplotlib_when_installed():
    pytest.importorskip("matplotlib")
    from tokenmill.plotting import pyplot

    assert pyplot().get_backend().lower() == "agg"
