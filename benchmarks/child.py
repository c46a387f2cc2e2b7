"""One benchmark case in its own process: `python -m benchmarks.child '<json params>'`.

Progress goes to stderr; the last stdout line is the JSON result, with this process's peak RSS
(VmHWM) so every case's memory is its own. `run_children` is the parent's side. A case's `cpus`
(a list of CPU numbers) confines the case, its threads and its workers to those CPUs.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_children(params: list[dict]) -> list[dict]:
    """Run cases in fresh interpreters, all at once; their progress goes to our stderr."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "benchmarks.child", json.dumps(one)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for one in params
    ]
    results = []
    for proc in procs:
        lines = proc.communicate()[0].strip().splitlines()
        if proc.returncode or not lines:
            results.append({"error": f"the case's process exited with {proc.returncode}"})
        else:
            results.append(json.loads(lines[-1]))
    return results


def peak_rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    params = json.loads(sys.argv[1])
    case = params.pop("case")
    cpus = params.pop("cpus", None)
    if cpus:  # before any thread or worker starts: they all inherit it
        os.sched_setaffinity(0, cpus)
    modules = {"raw_ceiling": "senders", "naive_requests": "senders", "braze_client": "senders"}
    modules["ledger_probe"] = "state_backends"
    modules.update(snapshot_runs="attribute_diff", diff_cost="attribute_diff")
    module = importlib.import_module(f"benchmarks.{modules.get(case, 'pipeline')}")
    result = getattr(module, case)(**params)
    result["peak_rss_mib"] = peak_rss_mib()
    result["cpus"] = sorted(os.sched_getaffinity(0))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
