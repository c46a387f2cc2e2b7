"""What the delta's fork server loads before it forks workers (`delta_workers.py`).

Importing the preparation code is not all a worker needs before its first batch: pandera
registers its pandas backends on the first validation in a process, and that imports its
data-synthesis strategies too (hypothesis, where installed). Measured here: a worker's first
20,000-row batch took 0.8 s against 0.2 s for the next, paid again by every worker of every
run. Done once in the fork server, every worker starts with it done.
"""

from __future__ import annotations

import pandas as pd
import pandera.pandas as pa

import braze_assets.delta_batch  # noqa: F401  (the preparation code itself)

# An empty frame through an empty schema: the registration alone, nothing of a real batch.
pa.DataFrameSchema({}).validate(pd.DataFrame())
