"""Wall time per method and benchmark of what ``configs/grids/reference.yaml`` has finished (docs/results.md).

    python benchmarks/reference_walltimes.py results/reference

Reads ``<root>/<benchmark>/<method>/seed<k>/wall_s`` (and ``<root>/<benchmark>/diffusion/wall_s``), which
``python -m lightning_ood.grid`` writes: seconds from the start of the run's ``train.py`` / ``evaluate.py``
process to its end (training, the detector fit and the OOD evaluation). Prints one Markdown row per
(benchmark, method): runs, mean and range in minutes.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def wall_times(root: Path) -> dict[tuple[str, str], list[float]]:
    """``{(benchmark, method): [seconds per finished run]}`` under ``root``."""
    found: dict[tuple[str, str], list[float]] = {}
    for path in sorted(root.glob("*/*/seed*/wall_s")) + sorted(root.glob("*/diffusion/wall_s")):
        method_dir = path.parent.parent if path.parent.name.startswith("seed") else path.parent
        key = (method_dir.parent.name, method_dir.name)
        found.setdefault(key, []).append(float(path.read_text().strip()))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="the grid's out (default there: results/reference)")
    args = parser.parse_args()
    times = wall_times(args.root)
    if not times:
        raise SystemExit(f"no finished runs (wall_s files) under {args.root}")
    print("| benchmark | method | runs | wall time, mean (min) | range (min) |")
    print("|---|---|---:|---:|---|")
    for (bench, method), seconds in sorted(times.items()):
        minutes = [s / 60 for s in seconds]
        mean = sum(minutes) / len(minutes)
        print(f"| {bench} | {method} | {len(minutes)} | {mean:.1f} | {min(minutes):.1f}-{max(minutes):.1f} |")


if __name__ == "__main__":
    main()
