"""Loaded by every Python process of the MLflow server that `study.store.server` starts (this
folder leads its PYTHONPATH), before MLflow is imported.

A search of 1,000 runs makes the server build ~80,000 ORM objects (one per param, tag and
metric), and CPython's cyclic collector, run every 700 new objects by default, rescans the
young ones each time: on the 2-core development machine that was 40% of the server's time on
such a search (docs/store.md#reading-runs-at-scale). Collecting every 200,000 objects instead
leaves each request's objects to reference counting, which frees them all; cycles are still
collected, less often.
"""

import gc

gc.set_threshold(200_000, 20, 100)
