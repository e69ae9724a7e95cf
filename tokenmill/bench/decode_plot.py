"""The decode benchmark's results as a figure: ms/token against batch size, one panel per context, one line per
variant, and the memory-bandwidth floor measured in the same run (`tokenmill bench decode --out R.json` writes it
next to the JSON; `--replot R.json` redraws it from a saved run, no GPU needed)."""

from __future__ import annotations

import json
from pathlib import Path

from tokenmill.plotting import pyplot


def load_report(path: str | Path) -> dict:
    """A saved `bench decode` JSON report; ValueError (a CLI error) when it is not one."""
    try:
        report = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None
    if not isinstance(report, dict) or not isinstance(report.get("cells"), list) or not report["cells"]:
        raise ValueError(f"{path}: not a bench decode report (no 'cells')")
    for cell in report["cells"]:
        if not {"batch", "context", "floor_ms", "results"} <= set(cell):
            raise ValueError(f"{path}: a cell lacks batch, context, floor_ms or results")
    return report


def plot_decode(report: dict, path: str | Path) -> Path:
    """Draws `report` (a bench decode report) to the PNG at `path`; returns the path."""
    cells = report["cells"]
    contexts = sorted({c["context"] for c in cells})
    variants = list(dict.fromkeys(v for c in cells for v in c["results"]))
    plt = pyplot()
    fig, axes = plt.subplots(1, len(contexts), figsize=(4.6 * len(contexts), 4.2), squeeze=False, sharey=True)
    for ax, context in zip(axes[0], contexts):
        row = sorted((c for c in cells if c["context"] == context), key=lambda c: c["batch"])
        batches = [c["batch"] for c in row]
        ax.plot(batches, [c["floor_ms"] for c in row], "k--", lw=1, label="floor (weights + KV / copy bandwidth)")
        for variant in variants:
            points = [(c["batch"], c["results"][variant]["ms"]) for c in row
                      if variant in c["results"] and c["results"][variant].get("ms") is not None]
            if points:
                ax.plot(*zip(*points), "o-", ms=4, label=variant)
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("batch (sequences)")
        ax.set_title(f"context {context}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("ms per decode step (ms/token)")
    axes[0][0].set_ylim(bottom=0)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)))
    bandwidth = report.get("copy_bandwidth_TBps")
    fig.suptitle(f"{report.get('shape', '')} {report.get('dtype', '')} decode on {report.get('device', '?')}"
                 + (f", copy bandwidth {bandwidth:.2f} TB/s" if bandwidth else "")
                 + (f" ({report['date']})" if report.get("date") else ""))
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
