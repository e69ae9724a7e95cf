"""Shared by the probe scripts: compile a one-file CUDA program with nvcc and run it, exiting with a message (not a
traceback) when there is no nvcc, the build fails or the program does; and a probe's command line."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from tokenmill.kernels.megakernel.build import find_nvcc


def build_and_run(source: str, flags: tuple[str, ...]) -> str:
    """The program's stdout."""
    nvcc = find_nvcc()
    if nvcc is None:
        sys.exit("nvcc not found (set NVCC or put it on PATH)")
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "probe.cu", Path(tmp) / "probe"
        src.write_text(source)
        build = subprocess.run([nvcc, *flags, "-o", str(exe), str(src)], capture_output=True, text=True)
        if build.returncode != 0:
            sys.exit(f"nvcc failed:\n{build.stderr[-3000:]}")
        run = subprocess.run([str(exe)], capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(f"the probe failed:\n{run.stdout[-1000:]}{run.stderr[-3000:]}")
    return run.stdout


def probe_cli(description: str, measure: Callable[[], dict], table: Callable[[dict], str]) -> None:
    """A probe's command line (`--out FILE`): measures, prints the table and writes the result as JSON."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, help="write the result here (JSON)")
    args = parser.parse_args()
    result = measure()
    print(table(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
