"""A run launcher that treats each run the way the Kubernetes run launcher does, on one machine.

The K8sRunLauncher starts `dagster api execute_run` in a new pod: a fresh process with an empty
disk that vanishes with the run. `PodLikeRunLauncher` starts the same command as a local process in
its own session (its process group is the "pod": the run worker and the step processes of the
multiprocess executor), with its working directory, HOME, TMPDIR and BRAZE_ASSETS_HOME set to a
new empty directory under `runs_root`, never reused. So whatever a run writes to its local disk is
lost to every other run, exactly as in production, and `kill -9` of the group is a pod dying.

It reports the directory and the group's pid as run tags (the tests read them) and implements
`check_run_worker_health`, so the daemon's run monitoring sees a dead run's process like it sees a
Kubernetes Job whose pod failed. The daemon imports it from dagster.yaml (`run_launcher`), with the
repository on PYTHONPATH.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from pathlib import Path

import dagster as dg

# private: Dagster 1.13 exports neither the run launcher base class and its context/results nor the
# configurable-class protocol instance plug-ins implement, nor the execute_run command builder
from dagster._cli.api import ExecuteRunArgs
from dagster._core.events import EngineEventData
from dagster._core.launcher.base import (
    CheckRunHealthResult,
    LaunchRunContext,
    RunLauncher,
    WorkerStatus,
)
from dagster._serdes import ConfigurableClass, ConfigurableClassData

from braze_assets.instance import process_start_time

#: run tags the launcher sets: the run's own directory, and the pid leading its process group
RUN_DIR_TAG = "braze_assets_tests/run_dir"
RUN_PID_TAG = "braze_assets_tests/run_pid"


class PodLikeRunLauncher(RunLauncher, ConfigurableClass):
    """Each run in its own process group, in a fresh empty directory under `runs_root`."""

    def __init__(self, runs_root: str, inst_data: ConfigurableClassData | None = None):
        self._inst_data = inst_data
        self.runs_root = Path(runs_root)
        self._workers: dict[str, subprocess.Popen[bytes]] = {}
        super().__init__()

    @property
    def inst_data(self) -> ConfigurableClassData | None:
        return self._inst_data

    @classmethod
    def config_type(cls):
        return {"runs_root": dg.Field(dg.StringSource)}

    @classmethod
    def from_config_value(cls, inst_data, config_value):
        return cls(inst_data=inst_data, **config_value)

    def launch_run(self, context: LaunchRunContext) -> None:
        run = context.dagster_run
        origin = run.job_code_origin
        if origin is None:
            raise dg.DagsterInvariantViolationError(f"run {run.run_id} has no code origin to launch")
        self.runs_root.mkdir(parents=True, exist_ok=True)
        run_dir = Path(tempfile.mkdtemp(prefix=f"run-{run.run_id[:8]}-", dir=self.runs_root))
        (run_dir / "tmp").mkdir()
        args = ExecuteRunArgs(
            job_origin=origin, run_id=run.run_id, instance_ref=self._instance.get_ref()
        ).get_command_args()
        env = {
            **os.environ,
            "BRAZE_ASSETS_HOME": str(run_dir),
            "HOME": str(run_dir),
            "TMPDIR": str(run_dir / "tmp"),
        }
        # the worker's output beside its directory, not in it: the directory holds only what the run wrote
        with open(self.runs_root / f"{run_dir.name}.log", "wb") as log:
            worker = subprocess.Popen(
                args, cwd=run_dir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._workers[run.run_id] = worker
        self._instance.add_run_tags(run.run_id, {RUN_DIR_TAG: str(run_dir), RUN_PID_TAG: str(worker.pid)})
        self._instance.report_engine_event(
            "Started the run worker in its own empty directory",
            run,
            # pid under another key: this is the group leader, not a step process
            EngineEventData({"run_dir": str(run_dir), "worker_pid": str(worker.pid)}),
            cls=self.__class__,
        )

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: dg.DagsterRun) -> CheckRunHealthResult:
        pid = run.tags.get(RUN_PID_TAG)
        if pid is None:
            return CheckRunHealthResult(WorkerStatus.NOT_FOUND, "the run has no worker process yet")
        worker = self._workers.get(run.run_id)
        if worker is not None and worker.poll() is not None:  # reaped here: no zombie lingers
            code = worker.returncode
            status = WorkerStatus.SUCCESS if code == 0 else WorkerStatus.FAILED
            return CheckRunHealthResult(status, f"run worker {pid} exited with {code}")
        if process_start_time(int(pid)) is None:
            return CheckRunHealthResult(WorkerStatus.FAILED, f"run worker {pid} is gone")
        return CheckRunHealthResult(WorkerStatus.RUNNING)

    def terminate(self, run_id: str) -> bool:
        run = self._instance.get_run_by_id(run_id)
        pid = run.tags.get(RUN_PID_TAG) if run else None
        if run is None or pid is None:
            return False
        self._instance.report_run_canceling(run)
        try:
            os.killpg(int(pid), signal.SIGTERM)
        except ProcessLookupError:
            return False
        return True
