"""Training runs as separate processes, several at once on one device, from any code tree.

What the GPU check's ``train_run`` section needs to put numbers side by side: the same short
schedule trained by several seeds, by this checkout and by an earlier commit of it (``git
archive`` of that commit, which reads packs of its own format, packed by its own command), each
run one ``launch/train.py`` process with its own run folder, all reading ``test.json`` back.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hmaml.errors import HmamlError
from hmaml.files import read_json

#: The two packs of Omniglot -> EMNIST: (pack name, pack command's dataset, raw file or folder)
PACKS = (("omniglot_nolatin", "omniglot-nolatin", "omniglot"),
         ("emnist", "emnist", "emnist/emnist.zip"))


@dataclass(frozen=True)
class Code:
    """A tree of this project that can train (``launch/train.py``) and pack."""

    label: str  # "this checkout" or the commit
    root: Path
    packs: Path  # where its Omniglot -> EMNIST packs are (each tree reads its own format)


@dataclass(frozen=True)
class RunSpec:
    variant: str  # what the runs of one row share, e.g. "new, fp32"
    code: Code
    config: str
    overrides: tuple[str, ...]
    seed: int
    run_dir: Path

    def command(self) -> list[str]:
        return [sys.executable, str(self.code.root / "launch" / "train.py"), "--config",
                self.config, f"seed={self.seed}", f"run_dir={self.run_dir}",
                "tracking.enabled=false", "train.progress=false",
                f"data.train_pack={self.code.packs / 'omniglot_nolatin'}",
                f"data.eval_pack={self.code.packs / 'emnist'}", *self.overrides]


@dataclass
class RunResult:
    spec: RunSpec
    returncode: int | None
    seconds: float
    test: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def extract_commit(repo: Path, commit: str, into: Path) -> Path:
    """The tree of ``commit`` (``git archive``) in ``into`` (created; reused when it holds one)."""
    if (into / "launch" / "train.py").is_file():
        return into
    if shutil.which("git") is None or not (repo / ".git").exists():
        raise HmamlError(f"--compare-commit {commit}: {repo} is not a git checkout; extract the "
                         f"commit elsewhere (git archive {commit} | tar -x -C DIR) and pass "
                         "--compare-src DIR")
    into.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile() as archive:
        proc = subprocess.run(["git", "-C", str(repo), "archive", commit], stdout=archive,
                              stderr=subprocess.PIPE, text=False, check=False)
        if proc.returncode != 0:
            raise HmamlError(f"git archive {commit}: "
                             f"{proc.stderr.decode(errors='replace').strip()}")
        archive.seek(0)
        with tarfile.open(fileobj=archive) as tar:
            tar.extractall(into, filter="data")
    return into


def ensure_packs(code: Code, raw: Path | None, log: Callable[[str], None]) -> None:
    """Pack Omniglot -> EMNIST with ``code``'s own pack command where its packs are missing
    (from ``raw``: a folder with ``omniglot/`` zips and ``emnist/emnist.zip``)."""
    missing = [(code.packs / name, dataset, source) for name, dataset, source in PACKS
               if not (code.packs / name / "manifest.json").is_file()]
    if missing and raw is None:
        raise HmamlError(f"packs not found: {', '.join(str(out) for out, _, _ in missing)} "
                         "(--raw DIR packs them; docs/benchmarks.md: The GPU check)")
    for out, dataset, source in missing:
        assert raw is not None
        log(f"packing {dataset} for {code.label} into {out}")
        proc = subprocess.run([sys.executable, str(code.root / "launch" / "pack.py"), dataset,
                               "--src", str(raw / source), "--out", str(out), "--quiet"],
                              cwd=code.root, env=code_env(code), capture_output=True,
                              text=True, check=False)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            raise HmamlError(f"packing {dataset} with {code.label} failed: {tail}")


def code_env(code: Code) -> dict[str, str]:
    """The environment of a run of ``code``: its tree first on the path (before an installed
    hmaml), the rest of the path kept (wheels carried to a GPU machine)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(code.root), *filter(None, [
        env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_all(specs: Sequence[RunSpec], parallel: int, deadline: float,
            log: Callable[[str], None]) -> list[RunResult]:
    """Run every spec, at most ``parallel`` at once; a run still going at ``deadline`` is
    terminated (its result says so), one that fails keeps the last line of its error output
    (all of it is in ``<run_dir>.log``)."""
    queue = list(specs)
    running: list[tuple[RunSpec, subprocess.Popen[str], float, Any]] = []
    results: list[RunResult] = []
    try:
        _drain(queue, running, results, parallel, deadline, log)
    finally:  # the section's own time limit, Ctrl-C: no run outlives the check
        for _, proc, _, errors in running:
            proc.kill()
            proc.wait()
            errors.close()
    return results


def _drain(queue: list[RunSpec], running: list[Any], results: list[RunResult], parallel: int,
           deadline: float, log: Callable[[str], None]) -> None:
    while queue or running:
        while queue and len(running) < parallel:
            spec = queue.pop(0)
            spec.run_dir.parent.mkdir(parents=True, exist_ok=True)
            # the run's stderr, beside its folder; closed when the run ends
            errors = open(spec.run_dir.with_name(spec.run_dir.name + ".log"), "w+")  # noqa: SIM115
            proc = subprocess.Popen(spec.command(), cwd=spec.code.root, env=code_env(spec.code),
                                    stdout=subprocess.DEVNULL, stderr=errors, text=True)
            running.append((spec, proc, time.perf_counter(), errors))
        time.sleep(0.2)
        late = time.perf_counter() > deadline
        for item in list(running):
            spec, proc, began, errors = item
            if proc.poll() is None and not late:
                continue
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=60)
            running.remove(item)
            errors.seek(0)
            tail = (errors.read().strip().splitlines() or [""])[-1]
            errors.close()
            result = RunResult(spec, proc.returncode, time.perf_counter() - began,
                               read_json(spec.run_dir / "test.json") or {})
            if result.test:
                outcome = f"test {result.test.get('test_acc', float('nan')):.2f} %"
            else:
                outcome = result.error = "stopped at the deadline" if late else \
                    f"exit status {proc.returncode}: {tail}"
            results.append(result)
            log(f"run {spec.variant} seed {spec.seed}: " + outcome
                + f" ({result.seconds:.0f} s)")


def seed_table(results: Sequence[RunResult]) -> dict[str, Any]:
    """Per variant: each seed's test accuracy and wall time, the mean ± sample std over seeds."""
    table: dict[str, Any] = {}
    for result in results:
        row = table.setdefault(result.spec.variant, {
            "code": result.spec.code.label, "overrides": list(result.spec.overrides),
            "seeds": {}})
        row["seeds"][str(result.spec.seed)] = (
            {"test_acc": result.test.get("test_acc"), "best_val_acc": result.test.get(
                "best_val_acc"), "wall_s": round(result.test.get("wall_s") or 0.0, 1)}
            if result.test else {"error": result.error})
    for row in table.values():
        accs = [s["test_acc"] for s in row["seeds"].values() if s.get("test_acc") is not None]
        row["test_acc_mean"] = statistics.fmean(accs) if accs else None
        row["test_acc_std"] = statistics.stdev(accs) if len(accs) > 1 else None
        row["finished"] = len(accs)
    return table




def checkout_code(packs: Path) -> Code:
    """This checkout as a :class:`Code` (a wheel has no ``launch/``: refused)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "launch" / "train.py").is_file():
        raise HmamlError(f"{root} is not a checkout of hmaml (no launch/train.py): run the GPU "
                         "check from a clone")
    return Code("this checkout", root, packs)


#: The variants of the seeds comparison: like for like with the old code (fp32, PyTorch's
#: initialisation: the old code knew no other), and what a user of this checkout gets.
NEW_VARIANTS = (("new, fp32, torch init", ("train.mixed_precision=no", "model.init=torch")),
                ("new, defaults (auto precision, authors' init)", ()))


def seed_comparison(*, packs: Path, raw: Path | None, compare: Code | None,
                    seeds: Sequence[int], schedule: Sequence[str], parallel: int,
                    workdir: Path, deadline: float, log: Callable[[str], None]
                    ) -> dict[str, Any]:
    """The short Omniglot -> EMNIST schedule trained by every variant and seed at once; the
    mean ± std over seeds of each, and the differences of their means."""
    new = checkout_code(packs)
    ensure_packs(new, raw, log)  # done before the sections when --raw is given: a no-op then
    variants = [(label, new, (*overrides, "eval.test_repeats=1"))
                for label, overrides in NEW_VARIANTS]
    if compare is not None:
        ensure_packs(compare, raw, log)
        variants.append((f"old {compare.label}, fp32, torch init", compare,
                         ("train.mixed_precision=no",)))
    specs = [RunSpec(label, code, "omni_emnist1", (*schedule, *overrides), seed,
                     workdir / f"v{i}_seed{seed}")
             for i, (label, code, overrides) in enumerate(variants) for seed in seeds]
    table = seed_table(run_all(specs, parallel, deadline, log))
    means = {label: row["test_acc_mean"] for label, row in table.items()}
    labels = list(means)
    differences = {f"{a} - {b}": means[a] - means[b] for i, a in enumerate(labels)
                   for b in labels[i + 1:] if means[a] is not None and means[b] is not None}
    return {"what": "omni_emnist1 with " + " ".join(schedule) + f"; seeds {list(seeds)}, "
            f"{len(specs)} runs, {parallel} at once on one device; one test list",
            "variants": table, "differences_of_means": differences}


__all__ = ["Code", "RunResult", "RunSpec", "checkout_code", "code_env", "ensure_packs",
           "extract_commit", "run_all", "seed_comparison", "seed_table"]
