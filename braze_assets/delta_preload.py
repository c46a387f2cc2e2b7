"""What the delta's fork server loads before it forks workers (`delta_workers.py`).

Importing the preparation code is not all a worker needs before its first batch: pandera
registers its pandas backends on the first validation in a process, and that imports its
data-synthesis strategies too (hypothesis, where installed). Measured here: a worker's first
20,000-row batch took 0.8 s against 0.2 s for the next, paid again by every worker of every
run. Done once in the fork server, every worker starts with it done.
"""

from __future__ import annotations

from multiprocessing import spawn as mp_spawn

import pandas as pd
import pandera.pandas as pa

import braze_assets.delta_batch  # noqa: F401  (the preparation code itself)

# An empty frame through an empty schema: the registration alone, nothing of a real batch.
pa.DataFrameSchema({}).validate(pd.DataFrame())


def _skip_main_module(*_args: object) -> None:
    """In place of multiprocessing's re-import of the parent's main module in a new worker."""


# A worker forked from this server would first import the parent's main module again, as
# multiprocessing does for every child it does not fork from the parent itself. When that
# module imports Dagster, every worker of every delta pays for it: measured, 1.3 CPU-seconds
# for the `dagster` command's script (a materialization run in process by `dagster asset
# materialize`), 2.1 for `dagster-daemon`'s, and more for a script importing the project at
# its top. (`braze-assets` and Dagster's run workers, started as `python -m dagster`, import
# nothing heavy there.) A worker needs none of it: its tasks are `delta_batch` functions on
# Arrow batches. So the fork server, whose children are only delta workers, leaves the main
# module alone. These are private hooks of CPython's multiprocessing (3.11: `spawn.prepare`
# calls them); if they are gone, nothing changes.
for _hook in ("_fixup_main_from_path", "_fixup_main_from_name"):
    if hasattr(mp_spawn, _hook):
        setattr(mp_spawn, _hook, _skip_main_module)
