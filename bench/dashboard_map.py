"""The feature map page's server time and payload at 65k latents, through the real HTTP layer
(Flask test client, the same POST /_dash-update-component the browser sends) on a synthetic run:
a store of N latents (bench/analyze.py's synthetic_store) with a planted map, lobes and clusters.

    python bench/dashboard_map.py [--latents 65536] [--requests 60] [--out bench/out/dashboard_map.json]

  first load     the router callback for /map?run=bench: the page with the whole figure
                 (coordinates as base64 typed arrays). 'Cold' is the first one of an app,
                 reading the map and the joined cluster table (the store opens in a
                 background thread); the second app's shares the CPU with the first's thread
  recolour       the colour callback: a Patch of the marker only, cycling through lobe,
                 geometric lobe, cluster and density
  label search   the same colouring by a label search for a random token (labels and top
                 tokens of all latents scanned)
  select box     the selection callback for a box over a random quarter of the map
  select lasso   the same for a 40-vertex lasso
  hover          the tooltip callback for one point
Prints p50/p95 per request kind and the response sizes; targets: first load p95 < 1 s,
recolouring < 200 ms, the map's payload < 3 MB.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# The repository before bench/: bench/dashboard.py would otherwise shadow the dashboard package.
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

KEYS = ("cooc_lobe", "geometric_lobe", "multidim_cluster", "density", "search")


def plant_geometry(run: Path, n: int, seed: int = 0) -> None:
    """RUN/geometry/map (5% of latents left off as dead), lobes, multidim and the joined
    features.parquet, in the formats the geometry pipeline writes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from analysis.geometry.results import Result, write_result

    rng = np.random.default_rng(seed)
    n_lobes = 64
    lobe = rng.integers(0, n_lobes, n)
    centres = rng.normal(0, 6, (n_lobes, 2))
    xy = (centres[lobe] + rng.normal(0, 1, (n, 2))).astype(np.float32)
    alive = rng.random(n) > 0.05
    density = 10 ** rng.uniform(-6, -1, n)
    feature = np.flatnonzero(alive)
    coords = dict(feature=feature, x=xy[alive, 0], y=xy[alive, 1], alive=alive[alive],
                  density=density[alive])  # fmt: skip
    write_result(run / "geometry" / "map", Result({"method": "umap"}, {"coords": coords}))
    geometric = rng.integers(0, n_lobes, n).astype(np.int32)
    cluster = np.where(rng.random(n) < 0.01, rng.integers(0, 200, n), -1).astype(np.int32)
    write_result(run / "geometry" / "lobes", Result({}, {"labels": dict(
        feature=np.arange(n, dtype=np.int32), cooc_lobe=lobe.astype(np.int32),
        geometric_lobe=geometric)}))  # fmt: skip
    write_result(run / "geometry" / "multidim",
                 Result({}, {"clusters": dict(feature=np.arange(n), cluster=cluster)}))  # fmt: skip
    map_x = np.where(alive, xy[:, 0], np.nan).astype(np.float32)
    map_y = np.where(alive, xy[:, 1], np.nan).astype(np.float32)
    pq.write_table(
        pa.table(
            dict(
                feature=np.arange(n),
                map_x=map_x,
                map_y=map_y,
                cooc_lobe=lobe.astype(np.int32),
                geometric_lobe=geometric,
                multidim_cluster=cluster,
            )
        ),  # fmt: skip
        run / "geometry" / "features.parquet",
    )


def payload(outputs: list[tuple[str, str]], inputs: list[tuple[str, str, object]],
            state: list[tuple[str, str, object]]) -> dict:  # fmt: skip
    name = "...".join(f"{i}.{p}" for i, p in outputs)
    return {
        "output": f"..{name}.." if len(outputs) > 1 else name,
        "outputs": [{"id": i, "property": p} for i, p in outputs]
        if len(outputs) > 1
        else {"id": outputs[0][0], "property": outputs[0][1]},
        "inputs": [{"id": i, "property": p, "value": v} for i, p, v in inputs],
        "changedPropIds": [f"{inputs[0][0]}.{inputs[0][1]}"],
        "state": [{"id": i, "property": p, "value": v} for i, p, v in state],
    }


RUN = [("map-run", "data", "bench")]


def recolour_payload(key: str, text: str) -> dict:
    return payload([("map-graph", "figure"), ("map-caption", "children")],
                   [("map-color", "value", key), ("map-search", "value", text)], RUN)  # fmt: skip


def selection_payload(selection: dict) -> dict:
    return payload([("map-selected-grid", "rowData"), ("map-selected-count", "children")],
                   [("map-selection", "data", selection)], RUN)  # fmt: skip


def hover_payload(point: int) -> dict:
    event = {"points": [{"curveNumber": 0, "pointNumber": point, "bbox": {"x0": 0, "x1": 1,
             "y0": 0, "y1": 1}}]}  # fmt: skip
    return payload([("map-tooltip", "show"), ("map-tooltip", "bbox"), ("map-tooltip", "children")],
                   [("map-graph", "hoverData", event)], RUN)  # fmt: skip


def first_load(client, load: dict) -> dict:
    start = time.perf_counter()
    response = client.post("/_dash-update-component", json=load)
    assert response.status_code == 200 and b"bdata" in response.data, response.data[:300]
    return dict(ms=1000 * (time.perf_counter() - start), response_kib=len(response.data) / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latents", type=int, default=65536)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--out", default=str(ROOT / "bench/out/dashboard_map.json"))
    parser.add_argument("--folder", help="keep the synthetic run here and reuse it next time")
    args = parser.parse_args()

    from dashboard.app import create_app

    spec = importlib.util.spec_from_file_location("bench_dashboard", ROOT / "bench/dashboard.py")
    bench_dashboard = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_dashboard)  # its request helpers, not the dashboard package
    router_payload, timed = bench_dashboard.router_payload, bench_dashboard.timed

    with tempfile.TemporaryDirectory() as tmp:
        tmp = args.folder or tmp
        run = Path(tmp) / "bench"
        bench_dashboard.synthetic_run(run, args.latents, 10, intervals=False)
        plant_geometry(run, args.latents)
        load = router_payload("/map", "?run=bench")

        client = create_app(Path(tmp)).server.test_client()
        cold = {"first app": first_load(client, load)}
        client = create_app(Path(tmp)).server.test_client()
        cold["second app"] = first_load(client, load)

        rng = np.random.default_rng(0)
        words = [f"tok{int(t)}" for t in rng.integers(0, 49152, args.requests)]
        recolours = [recolour_payload(KEYS[i % 4], "") for i in range(args.requests)]
        searches = [recolour_payload("search", w) for w in words]
        boxes, lassos = [], []
        for _ in range(args.requests // 2):
            x0, y0 = rng.uniform(-15, 5, 2)
            boxes.append(selection_payload({"range": {"x": [x0, x0 + 10], "y": [y0, y0 + 10]}}))
            angle = np.linspace(0, 2 * np.pi, 40, endpoint=False)
            r = rng.uniform(4, 8) * (1 + 0.3 * np.sin(3 * angle))
            cx, cy = rng.uniform(-8, 8, 2)
            lassos.append(selection_payload({"lassoPoints": {
                "x": (cx + r * np.cos(angle)).tolist(), "y": (cy + r * np.sin(angle)).tolist()}}))  # fmt: skip
        results = {
            "first load": timed(client, [load] * (args.requests // 3), "bdata"),
            "recolour": timed(client, recolours, "marker"),
            "label search": timed(client, searches, "marker"),
            "select box": timed(client, boxes, "features selected"),
            "select lasso": timed(client, lassos, "features selected"),
            "hover": timed(client, [hover_payload(int(i)) for i in rng.integers(0, int(0.9 * args.latents), args.requests)], "label"),
        }  # fmt: skip
    record = {"latents": args.latents, "cold first load": cold, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    for name, r in cold.items():
        print(f"cold first load, {name}: {r['ms']:.0f} ms, {r['response_kib']:.0f} KiB")
    print(f"{'request':<14}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}{'KiB':>9}")
    for name, r in results.items():
        print(
            f"{name:<14}{r['p50_ms']:>9.1f}{r['p95_ms']:>9.1f}{r['max_ms']:>9.1f}"
            f"{r['response_kib']:>9.0f}"
        )


if __name__ == "__main__":
    main()
