"""Measuring an SAE and its features: evaluation, the feature store, geometry and steering.

    from analysis import open_run, evaluate, analyze, FeatureStore, Steering, Intervention
    run = open_run("checkpoints/demo/run")
    evaluate(run, 4096)["metrics"]["fvu"]          # also L0, CE loss recovered, KL, ...
    store = FeatureStore(analyze(run, 40_000))     # the feature store, RUN/features/

The names below load on first use, so `import analysis` stays cheap for the command line.
"""

from hooks.lazy import lazy_exports

_LAZY = {
    "Run": "analysis.run",
    "open_run": "analysis.run",
    "evaluate": "analysis.evaluation",
    "analyze": "analysis.store.build",
    "FeatureStore": "analysis.store.read",
    "Intervention": "analysis.steering.interventions",
    "Steering": "analysis.steering.interventions",
    "caa_vector": "analysis.steering.caa",
    "lf_steer": "analysis.steering.lf",
    "run_geometry": "analysis.geometry.pipeline",
}


__getattr__ = lazy_exports("analysis", _LAZY)

__all__ = list(_LAZY)
