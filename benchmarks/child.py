"""One benchmark case in its own process: `python -m benchmarks.child '<json params>'`.

Progress goes to stderr; the last stdout line is the JSON result, with this process's peak RSS
(VmHWM) so every case's memory is its own.
"""

from __future__ import annotations

import importlib
import json
import sys


def peak_rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    params = json.loads(sys.argv[1])
    case = params.pop("case")
    senders = case in ("raw_ceiling", "naive_requests", "braze_client")
    module = importlib.import_module("benchmarks.senders" if senders else "benchmarks.pipeline")
    result = getattr(module, case)(**params)
    result["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
