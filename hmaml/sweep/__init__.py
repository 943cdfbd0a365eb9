"""Sweeps: many trials of one base config, run as a SLURM job array, local processes or in-process.

:mod:`~hmaml.sweep.spec` reads a sweep file and expands it into trials, :mod:`~hmaml.sweep.job`
runs one trial as a preemptible submitit job, :mod:`~hmaml.sweep.execute` checks and submits the
unfinished trials (on the executors of :mod:`~hmaml.sweep.executors`; a search through
:mod:`~hmaml.sweep.search`) and :mod:`~hmaml.sweep.report` reads their states back into a status
table and a summary. :mod:`~hmaml.sweep.signals` holds the preemption, requeue and "is it still
running" rules that depend on SLURM and submitit.
"""

from hmaml.sweep.execute import describe, submit
from hmaml.sweep.executors import executor_parameters
from hmaml.sweep.job import TrialJob, write_trial_state
from hmaml.sweep.report import read_sweep_json, status_table, summarize, summary_rows, trial_state
from hmaml.sweep.spec import (
    CLUSTERS,
    ExecutorSpec,
    RandomSpec,
    Sweep,
    SweepSpec,
    Trial,
    VariantSpec,
    load_sweep,
)

__all__ = ["CLUSTERS", "ExecutorSpec", "RandomSpec", "Sweep", "SweepSpec", "Trial", "TrialJob",
           "VariantSpec", "describe", "executor_parameters", "load_sweep", "read_sweep_json",
           "status_table", "submit", "summarize", "summary_rows", "trial_state",
           "write_trial_state"]
