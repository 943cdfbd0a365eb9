"""The executors trials run on, shared by the grid's submission (:mod:`~hmaml.sweep.execute`)
and the search's (:mod:`~hmaml.sweep.search`): submitit's SLURM and local executors with a
sweep's settings, the GPU slots of local trials, and the lines the submitter prints.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import submitit
import torch

from hmaml.errors import HmamlError, first_line
from hmaml.sweep.spec import ExecutorSpec, Sweep
from hmaml.train.rundir import Status, TrainResult, wall_time

# submitit's LocalExecutor sends the timeout signal this long before its limit (not settable).
LOCAL_SIGNAL_DELAY_S = 30


def sqlite_warning(sweep: Sweep, cluster: str) -> str | None:
    """The warning for SLURM jobs that all log to one SQLite file."""
    if cluster != "slurm" or not sweep.tracking_enabled \
            or not sweep.tracking_uri.startswith("sqlite:"):
        return None
    return (f"warning: tracking.uri={sweep.tracking_uri}: many SLURM jobs locking one SQLite "
            "file on a shared filesystem lose metrics; run the tracking server of "
            "docker/compose.yaml and set tracking.uri=http://<host>:5000")


def executor_parameters(spec: ExecutorSpec, cluster: str) -> dict[str, Any]:
    """The ``update_parameters`` keywords of the cluster's submitit executor (``AutoExecutor``
    for SLURM, ``LocalExecutor`` locally, which also takes each trial's ``visible_gpus``); a
    packed SLURM job has one task per trial it holds."""
    tasks = spec.trials_per_gpu if cluster == "slurm" and spec.packed else \
        spec.processes_per_node()
    if cluster == "slurm":
        params: dict[str, Any] = {
            "timeout_min": spec.timeout_min, "nodes": spec.nodes,
            "gpus_per_node": spec.gpus_per_node, "tasks_per_node": tasks,
            "cpus_per_task": spec.cpus_per_task, "mem_gb": spec.mem_gb,
            "slurm_partition": spec.partition, "slurm_account": spec.account,
            "slurm_qos": spec.qos, "slurm_array_parallelism": spec.array_parallelism,
            "slurm_signal_delay_s": spec.signal_delay_s,
            # a task that dies ends the job step at once: no survivor waits for it
            "slurm_srun_args": ["--kill-on-bad-exit=1"],
            "slurm_setup": [f"export OMP_NUM_THREADS={spec.cpus_per_task}", *spec.setup],
            "slurm_additional_parameters": dict(spec.additional_parameters) or None}
        return {k: v for k, v in params.items() if v is not None}
    if cluster == "local":
        return {"timeout_min": spec.timeout_min, "gpus_per_node": spec.gpus_per_node,
                "tasks_per_node": tasks, "setup": ["export OMP_NUM_THREADS=1"]}
    return {}


def visible_gpu_count() -> int:
    """The GPUs this process sees (CUDA_VISIBLE_DEVICES applied)."""
    return torch.cuda.device_count()


def gpu_slots(spec: ExecutorSpec) -> list[tuple[int, ...]] | None:
    """The GPU sets of the local trials that may run at once: each set of ``gpus_per_node``
    GPUs appears ``trials_per_gpu`` times, round robin, so that trials spread over the GPUs
    before they share one. None without GPUs (``max_local_parallel`` CPU processes)."""
    if not spec.gpus_per_node:
        return None
    gpus = list(spec.visible_gpus) if spec.visible_gpus is not None else \
        list(range(visible_gpu_count()))
    if len(gpus) < spec.gpus_per_node:
        raise HmamlError(f"executor.gpus_per_node={spec.gpus_per_node}, but this machine shows "
                         f"{len(gpus)} GPU{'s' if len(gpus) != 1 else ''} (CUDA_VISIBLE_DEVICES="
                         f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use "
                         "gpus_per_node: 0 for CPU trials")
    size = spec.gpus_per_node
    groups = [tuple(gpus[i:i + size]) for i in range(0, len(gpus) - size + 1, size)]
    return [group for _ in range(spec.trials_per_gpu) for group in groups]


def local_executor(spec: ExecutorSpec, folder: Path) -> Any:
    """submitit's local executor with the sweep's settings (job logs under ``folder``)."""
    executor = submitit.LocalExecutor(folder=folder / "%j", max_num_timeout=spec.max_num_timeout)
    executor.update_parameters(**executor_parameters(spec, "local"))
    return executor


def slurm_executor(spec: ExecutorSpec, folder: Path) -> Any:
    """submitit's SLURM executor with the sweep's settings (job logs under ``folder``)."""
    try:
        executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm",
                                         slurm_max_num_timeout=spec.max_num_timeout)
    except RuntimeError as exc:
        raise HmamlError(f"cluster slurm: {first_line(exc)} (use --cluster local or debug)"
                         ) from None
    executor.update_parameters(**executor_parameters(spec, "slurm"))
    return executor


def result_line(result: TrainResult) -> str:
    """How a trial ended, on one line of the submitter's log."""
    test = result.test
    if result.status != Status.FINISHED or test is None:
        return f"{result.status.value} at epoch {result.epoch}"
    return (f"finished: test {test['test_acc']:.2f} ± {test['test_ci']:.2f} %, "
            f"best val {test['best_val_acc']:.2f} %, {wall_time(test)}")


__all__ = ["LOCAL_SIGNAL_DELAY_S", "executor_parameters", "gpu_slots", "local_executor",
           "result_line", "slurm_executor", "sqlite_warning", "visible_gpu_count"]
