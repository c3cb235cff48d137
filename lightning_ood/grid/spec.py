"""A grid file (benchmarks x methods x seeds x override sweeps) expanded into runs with stable directories.

A grid is YAML (``configs/grids/*.yaml``)::

    out: results/reference               # root of every run directory (``--out`` replaces it)
    vars: {accelerator: cpu}             # {name} placeholders; ``--set accelerator=gpu`` replaces a value
    benchmarks: [fashionmnist, fashionmnist_openset]
    seeds: [0, 1, 2]
    common_args: [--trainer.accelerator={accelerator}, ...]   # every run (after the method's own arguments)
    eval_args: [--ood_eval.output_dir={dir}, ...]             # every run that writes ood_results.json
    methods:
      classifier:
        entry: train                     # train.py (fit, then test) or evaluate (test only)
        args: [--config, "configs/reference_{benchmark}.yaml", --seed_everything, "{seed}"]
      heatmap:
        needs: {classifier: classifier}  # {classifier} = the best checkpoint of that method's run
        args: [..., "--model.init_args.classifier_ckpt={classifier}"]

A method may also set ``benchmarks``, ``seeds``, ``run_dir`` (default ``{benchmark}/{method}/seed{seed}``),
``benchmark_args`` (``{benchmark: [more arguments]}``), ``sweep`` (``{name: [values]}``: one run per
combination, ``{name}`` in the arguments and the run directory), ``exclude`` (sweep points to leave out),
``done: checkpoint`` (a run that writes no ``ood_results.json``, e.g. a diffusion model: done when it exited
cleanly and left a best checkpoint) and ``limited_data`` (``{config, test_limit, ood_limit}``: the run gets
``{data}``, a copy of that data config with seeded subsets of the test sets, written into its directory).

A dependency is the upstream method's run of the same benchmark and seed; where the upstream method has only
one benchmark or one seed (a diffusion model trained once), that one. Placeholders of the upstream checkpoints
are filled when the run starts, so a whole grid can be submitted before any checkpoint exists.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

#: Where a run's best checkpoint lies, relative to its directory (the CSV logger of ``common_args``).
CHECKPOINT_GLOB = "log/version_0/checkpoints/best-*.ckpt"
ENTRIES = ("train", "evaluate")
PLACEHOLDER = re.compile(r"\{(\w+)\}")
METHOD_KEYS = {
    "entry", "args", "benchmarks", "seeds", "run_dir", "benchmark_args", "sweep", "exclude", "done", "needs",
    "limited_data",
}  # fmt: skip
GRID_KEYS = {"out", "vars", "benchmarks", "seeds", "common_args", "eval_args", "methods", "run_dir"}


@dataclass(frozen=True)
class Job:
    """One run: ``python -m lightning_ood.grid.launch <entry> <args>`` writing into ``directory``.

    ``args`` may still hold ``{name}`` placeholders of ``needs`` (name -> upstream run directory), filled with
    the upstream run's best checkpoint when the run starts. ``done`` is ``"results"`` (finished when
    ``ood_results.json`` exists; the result writer is atomic) or ``"checkpoint"``.
    """

    name: str
    method: str
    benchmark: str
    seed: int
    directory: Path
    entry: str
    args: tuple[str, ...]
    done: str = "results"
    needs: Mapping[str, Path] = field(default_factory=dict)
    upstream: tuple[str, ...] = ()
    limited_data: Mapping[str, Any] | None = None

    @property
    def log(self) -> Path:
        """The run's own log (stdout and stderr of the run)."""
        return self.directory / "run.log"


def _fill(text: str, values: Mapping[str, Any], where: str) -> str:
    """``text.format(**values)``, keeping unknown placeholders (the checkpoints, filled when the run starts)."""
    try:
        return text.format_map(_Keep(values))
    except (ValueError, IndexError) as err:
        raise ValueError(f"{where}: cannot fill the placeholders of {text!r} ({err})") from err


class _Keep(dict):
    def __init__(self, values: Mapping[str, Any]) -> None:
        super().__init__({k: str(v) for k, v in values.items()})

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def _as_list(value: Any, key: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"grid key {key!r} must be a list, got {value!r}")
    return value


def load_grid(
    path: Path, overrides: Mapping[str, str] | None = None, out: Path | None = None
) -> tuple[Path, list[Job]]:
    """Read and expand a grid file: ``(root of the run directories, jobs)``; ``overrides`` replace ``vars``
    values, ``out`` the grid's ``out``."""
    grid = yaml.safe_load(Path(path).read_text())
    if not isinstance(grid, dict) or not isinstance(grid.get("methods"), dict):
        raise ValueError(
            f"{path}: a grid is a mapping with a 'methods' mapping (see lightning_ood.grid.spec)"
        )
    unknown = set(grid) - GRID_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown grid keys {sorted(unknown)}; known: {sorted(GRID_KEYS)}")
    variables = dict(grid.get("vars") or {})
    for key, value in (overrides or {}).items():
        if key not in variables:
            raise ValueError(f"--set {key}=...: the grid has no variable {key!r}; it has {sorted(variables)}")
        variables[key] = value
    root = Path(out if out is not None else grid.get("out", "results"))
    return root, expand(grid, variables, root)


def expand(grid: Mapping[str, Any], variables: Mapping[str, Any], root: Path) -> list[Job]:
    """Every (method, benchmark, seed, sweep point) of ``grid`` as a :class:`Job`, upstream runs first."""
    jobs: dict[str, Job] = {}
    for method, spec in grid["methods"].items():
        for job in _method_jobs(method, spec or {}, grid, variables, root):
            if job.name in jobs:
                raise ValueError(f"{job.name!r} is the run directory of two runs; make run_dir unique")
            jobs[job.name] = job
    return _link(list(jobs.values()))


def _method_jobs(
    method: str, spec: Mapping[str, Any], grid: Mapping[str, Any], variables: Mapping[str, Any], root: Path
) -> list[Job]:
    """The runs of one method: its benchmarks x seeds x sweep points (less ``exclude``)."""
    unknown = set(spec) - METHOD_KEYS
    if unknown:
        raise ValueError(f"method {method!r}: unknown keys {sorted(unknown)}; known: {sorted(METHOD_KEYS)}")
    entry, done = spec.get("entry", "train"), spec.get("done", "results")
    if entry not in ENTRIES:
        raise ValueError(f"method {method!r}: entry must be one of {ENTRIES}, got {entry!r}")
    if done not in ("results", "checkpoint"):
        raise ValueError(f"method {method!r}: done must be 'results' or 'checkpoint', got {done!r}")
    sweep = dict(spec.get("sweep") or {})
    points = [dict(zip(sweep, values, strict=True)) for values in itertools.product(*sweep.values())]
    excluded = [dict(e) for e in _as_list(spec.get("exclude"), f"{method}.exclude")]
    points = [p for p in points if not any(_matches(p, e) for e in excluded)]
    pattern = spec.get("run_dir", grid.get("run_dir", "{benchmark}/{method}/seed{seed}"))
    benchmarks = _as_list(spec.get("benchmarks", grid.get("benchmarks")), f"{method}.benchmarks")
    seeds = _as_list(spec.get("seeds", grid.get("seeds", [0])), f"{method}.seeds")
    if not benchmarks or not seeds:
        raise ValueError(
            f"method {method!r} has no benchmarks or no seeds: set them in the grid or the method"
        )
    shared = [*_as_list(grid.get("common_args"), "common_args")]
    shared += _as_list(grid.get("eval_args"), "eval_args") if done == "results" else []
    out = []
    for bench, seed, point in itertools.product(benchmarks, seeds, points):
        values = {**variables, "method": method, "benchmark": bench, "seed": seed, **point}
        where = f"method {method!r} ({bench}, seed {seed})"
        rel = _fill(pattern, values, where)
        if PLACEHOLDER.search(rel):
            raise ValueError(f"{where}: run_dir {pattern!r} has unknown placeholders: {rel!r}")
        values["dir"] = root / rel
        limited = spec.get("limited_data")
        if limited is not None:
            limited = {k: _fill(str(v), values, where) for k, v in dict(limited).items()}
            values["data"] = root / rel / "data.yaml"
        args = [*spec.get("args", []), *(spec.get("benchmark_args") or {}).get(bench, []), *shared]
        out.append(
            Job(name=rel, method=method, benchmark=bench, seed=int(seed), directory=root / rel, entry=entry,
                args=tuple(_fill(str(a), values, where) for a in args), done=done, limited_data=limited,
                upstream=tuple(f"{k}={v}" for k, v in (spec.get("needs") or {}).items()))
        )  # fmt: skip
    return out


def _matches(point: Mapping[str, Any], exclude: Mapping[str, Any]) -> bool:
    return all(str(point.get(k)) == str(v) for k, v in exclude.items())


def _link(jobs: Sequence[Job]) -> list[Job]:
    """Resolve ``needs`` into upstream run directories; order the jobs so upstream runs come first."""
    by_method: dict[str, list[Job]] = {}
    for job in jobs:
        by_method.setdefault(job.method, []).append(job)
    linked: dict[str, Job] = {}
    for job in jobs:
        needs: dict[str, Path] = {}
        names: list[str] = []
        for item in job.upstream:
            placeholder, method = item.split("=", 1)
            up = _upstream(job, method, by_method.get(method, []))
            needs[placeholder] = up.directory
            names.append(up.name)
        for placeholder in needs:
            if not any("{" + placeholder + "}" in a for a in job.args):
                raise ValueError(f"{job.name}: needs {placeholder!r} but no argument uses {{{placeholder}}}")
        left = {m for a in job.args for m in PLACEHOLDER.findall(a)} - set(needs)
        if left:
            raise ValueError(
                f"{job.name}: unknown placeholders {sorted(left)} (not a variable, benchmark, seed, method, dir, "
                "data, sweep key or need); write literal braces as {{ and }}"
            )
        linked[job.name] = replace(job, needs=needs, upstream=tuple(names))
    _check_nesting(list(linked.values()))
    return _ordered(linked)


def _upstream(job: Job, method: str, candidates: Sequence[Job]) -> Job:
    if not candidates:
        raise ValueError(f"{job.name}: needs method {method!r}, which the grid does not define")
    if len({c.benchmark for c in candidates}) > 1:
        candidates = [c for c in candidates if c.benchmark == job.benchmark]
    if len({c.seed for c in candidates}) > 1:
        candidates = [c for c in candidates if c.seed == job.seed]
    if len(candidates) != 1:
        found = [c.name for c in candidates] or "none"
        raise ValueError(
            f"{job.name}: needs one {method!r} run of benchmark {job.benchmark!r} and seed {job.seed}, found "
            f"{found}"
        )
    return candidates[0]


def _check_nesting(jobs: Sequence[Job]) -> None:
    """A run directory is wiped before the run starts: none may lie inside another run's."""
    dirs = sorted((j.directory for j in jobs), key=lambda p: len(p.parts))
    for i, outer in enumerate(dirs):
        for inner in dirs[i + 1 :]:
            if outer in inner.parents:
                raise ValueError(f"run directory {inner} lies inside run directory {outer}; change run_dir")


def _ordered(jobs: Mapping[str, Job]) -> list[Job]:
    """Topological order (upstream first), otherwise the grid's order; a cycle is an error."""
    out: list[Job] = []
    state: dict[str, str] = {}

    def visit(name: str, path: tuple[str, ...]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "open":
            raise ValueError(f"dependency cycle: {' -> '.join((*path, name))}")
        state[name] = "open"
        for up in jobs[name].upstream:
            visit(up, (*path, name))
        state[name] = "done"
        out.append(jobs[name])

    for name in jobs:
        visit(name, ())
    return out


def select(
    jobs: Sequence[Job],
    methods: Sequence[str] | None = None,
    benchmarks: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
) -> list[Job]:
    """The jobs of ``methods`` / ``benchmarks`` / ``seeds`` (``None``: all) and every run they depend on, in
    ``jobs``' order."""
    for name, wanted, known in (
        ("--methods", methods, {j.method for j in jobs}),
        ("--benchmarks", benchmarks, {j.benchmark for j in jobs}),
        ("--seeds", seeds, {j.seed for j in jobs}),
    ):
        missing = sorted(set(wanted or ()) - known, key=str)
        if missing:
            raise ValueError(f"{name} {missing}: not in the grid, which has {sorted(known, key=str)}")
    by_name = {j.name: j for j in jobs}
    keep: set[str] = set()
    stack = [
        j.name
        for j in jobs
        if (not methods or j.method in methods)
        and (not benchmarks or j.benchmark in benchmarks)
        and (not seeds or j.seed in seeds)
    ]
    while stack:
        name = stack.pop()
        if name not in keep:
            keep.add(name)
            stack.extend(by_name[name].upstream)
    return [j for j in jobs if j.name in keep]
