"""The training curves of several runs in one figure (`evaluate.py curves`): each run folder's
metrics.jsonl (one JSON record per logged step, as train.py writes it) read back and overlaid in
curves.png. It reads files only: no model, no device, no ranks."""
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import MissingFileError, UserError, read_json
from .eval_io import print_table
from .plots import plot_training_curves

CURVE_METRICS = ("loss", "accuracy", "margin", "rewards/accuracies", "rewards/margins")  # absent ones are skipped


@dataclass
class CurvesSettings:
    """evaluate.py curves' settings."""
    run_dirs: list[str]  # training run folders, each with metrics.jsonl
    output: str | None  # folder for curves.png; None: runs/eval/curves
    metrics: list[str]  # the metrics to plot, one panel each (absent ones skipped)


def run_label(run_dir: Path) -> str:
    """The run folder's name, with its learning rate when run_config.json records one."""
    cfg = run_dir / "run_config.json"
    settings = read_json(cfg, "the run's settings") if cfg.is_file() else {}
    lr = settings.get("lr") if isinstance(settings, dict) else None
    return f"{run_dir.name} (lr {lr:g})" if isinstance(lr, (int, float)) else run_dir.name


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of a run folder's metrics.jsonl (blank lines skipped); a line that is not JSON
    is an error naming the file and line."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise MissingFileError(f"{path} not found: is {run_dir} a training run folder?")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError as e:
                raise UserError(f"{path}, line {n}: not JSON ({e})") from None
    return records


def overlay_curves(s: CurvesSettings) -> Path:
    """Every run's curves in output/curves.png; prints how many records each run has. Returns the figure's path."""
    runs = []
    for d in map(Path, s.run_dirs):
        records = read_metrics(d)  # first: a folder without metrics.jsonl is named as such
        runs.append((run_label(d), records))
    out = Path(s.output or "runs/eval/curves")
    figure = plot_training_curves(runs, out / "curves.png", metrics=tuple(s.metrics))
    print_table("training curves", [(label, f"{len(r)} records") for label, r in runs])
    print(f"\nwrote {figure}")
    return figure
