"""Serving adapters: start-up, the run-time engine, batches of requests, the pool, the response JSON.

:mod:`~tfb_core.serving.config` holds :class:`EngineConfig` and its defaults;
:mod:`~tfb_core.serving.startup` builds engines (the classifiers; sigma fixed, from the cache or
searched, :mod:`~tfb_core.search.classifier` being the search's objective on the anchor set; the
calibration, :mod:`~tfb_core.serving.calibrate` running its forward in steps);
:mod:`~tfb_core.serving.engine` is one adapter at run time (noise draws, forwards, what the
calibration allows); :mod:`~tfb_core.serving.batch` runs many callers' requests in shared forwards;
:mod:`~tfb_core.serving.pool` holds the served adapters and resolves their names;
:mod:`~tfb_core.serving.lifecycle` owns every adapter that is not simply served (loading, searching,
calibrating, failed, unloading: one state machine, compare-and-set transitions on the model's
worker), :mod:`~tfb_core.serving.runtime` the model work of a load and an unload;
:mod:`~tfb_core.serving.response` builds the JSON of ``/predict``, ``tfb predict`` and ``/info``.
Imports point down (to :mod:`tfb_core.forward`, :mod:`tfb_core.decide`, :mod:`tfb_core.data`);
only the CLI, ``tfb eval`` and the web app import this package.
"""
