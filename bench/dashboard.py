"""Dashboard server time on a 32k-latent store, through the real HTTP layer (Flask test client,
the same POST /_dash-update-component the browser sends), so it counts routing, the store read,
building the page and serialising it.

    python bench/dashboard.py [--latents 32768] [--requests 300] [--out bench/out/dashboard.json]

  feature page   the router callback for /feature/<random id>?run=bench (top examples and the
                 10 x 5 interval samples: about 70 highlighted 32-token contexts)
  grid block     one 100-row block of the feature grid, sorted by density (descending)
  grid search    the same block filtered to latents whose top examples fire on one token
With `--served FOLDER --run NAME` it times the part-2 pages instead (the map, geometry,
compare, prompt and steering pages' loads through the router) on a real run that has `saewb geometry`,
`saewb compare` and steering outputs; `--compare-with NAME` names the compare page's second run.
Prints p50/p95 per request kind and the response sizes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# The repository before bench/, where this file would shadow the dashboard package.
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]


def router_payload(path: str, search: str) -> dict:
    return {
        "output": "..page.children...title-sink.children..",
        "outputs": [
            {"id": "page", "property": "children"},
            {"id": "title-sink", "property": "children"},
        ],
        "inputs": [
            {"id": "url", "property": "pathname", "value": path},
            {"id": "url", "property": "search", "value": search},
        ],
        "changedPropIds": ["url.pathname"],
        "state": [],
    }


def grid_payload(request: dict) -> dict:
    return {
        "output": "..feature-grid.getRowsResponse...grid-message.children..",
        "outputs": [
            {"id": "feature-grid", "property": "getRowsResponse"},
            {"id": "grid-message", "property": "children"},
        ],
        "inputs": [{"id": "feature-grid", "property": "getRowsRequest", "value": request}],
        "changedPropIds": ["feature-grid.getRowsRequest"],
        "state": [{"id": "browser-run-name", "property": "data", "value": "bench"}],
    }


def timed(client, payloads: list[dict], check: str) -> dict:
    client.post("/_dash-update-component", json=payloads[0])  # opens the store, warms caches
    times, sizes = [], []
    for payload in payloads:
        start = time.perf_counter()
        response = client.post("/_dash-update-component", json=payload)
        times.append(time.perf_counter() - start)
        assert response.status_code == 200, response.data[:300]
        assert check in response.get_data(as_text=True), response.data[:300]
        sizes.append(len(response.data))
    return dict(
        requests=len(payloads),
        p50_ms=1000 * float(np.percentile(times, 50)),
        p95_ms=1000 * float(np.percentile(times, 95)),
        max_ms=1000 * float(np.max(times)),
        response_kib=float(np.mean(sizes)) / 1024,
    )


def synthetic_run(run: Path, latents: int, examples: int, intervals: bool) -> None:
    """A run folder with a synthetic store (bench/analyze.py), kept if it is already there."""
    from analyze import synthetic_store

    run.mkdir(parents=True, exist_ok=True)
    (run / "run.json").write_text(json.dumps({"model": "smollm2-135m", "site": "resid_post.3"}))
    manifest = run / "features" / "manifest.json"
    if not manifest.exists() or json.loads(manifest.read_text())["n_latents"] != latents:
        start = time.perf_counter()
        synthetic_store(run / "features", latents, examples, intervals=intervals)
        print(f"store of {latents:,} latents written in {time.perf_counter() - start:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latents", type=int, default=32768)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--out", default=str(ROOT / "bench/out/dashboard.json"))
    parser.add_argument("--folder", help="keep the synthetic store here and reuse it next time")
    parser.add_argument("--served", help="a folder of real runs for the part-2 pages")
    parser.add_argument("--run", help="the run (its name below --served) with geometry outputs")
    parser.add_argument("--compare-with", help="the run the compare page pairs with --run")
    args = parser.parse_args()
    if args.served:
        record = {"served": args.served, "run": args.run, "results": part2(args)}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=2))
        report(record["results"])
        return

    from dashboard.app import create_app

    with tempfile.TemporaryDirectory() as tmp:
        tmp = args.folder or tmp
        synthetic_run(Path(tmp) / "bench", args.latents, 20, intervals=True)
        client = create_app(Path(tmp)).server.test_client()
        rng = np.random.default_rng(0)
        ids = rng.integers(0, args.latents, args.requests)
        results = {
            "feature page": timed(
                client,
                [router_payload(f"/feature/{i}", "?run=bench") for i in ids],
                "Top activations",
            ),
            "grid block": timed(
                client,
                [
                    grid_payload(
                        {"startRow": int(s), "endRow": int(s) + 100,
                         "sortModel": [{"colId": "density", "sort": "desc"}], "filterModel": {}}
                    )
                    for s in rng.integers(0, args.latents - 100, args.requests // 3) // 100 * 100
                ],
                "rowData",
            ),
            "grid search": timed(
                client,
                [
                    grid_payload(
                        {"startRow": 0, "endRow": 100, "filterModel": {
                            "top_tokens": {"filterType": "text", "type": "contains",
                                           "filter": f"tok{int(t)}"}}}
                    )
                    for t in rng.integers(0, 49152, args.requests // 3)
                ],
                "rowData",
            ),
        }  # fmt: skip
    record = {"latents": args.latents, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    report(results)


def part2(args) -> dict:
    """The part-2 pages' first loads on a real run (read only; nothing is written there)."""
    from dashboard.app import create_app

    client = create_app(Path(args.served)).server.test_client()
    run, n = args.run, max(args.requests // 10, 10)
    pages = {
        "map page": ("/map", f"?run={run}", "map-graph"),
        "geometry page": ("/geometry", f"?run={run}", "galaxy-spectrum"),
        "prompt page": ("/prompt", f"?run={run}", "prompt-text"),
        "steering page": ("/steer", f"?run={run}", "steer-prompt"),
    }
    if args.compare_with:
        pages["compare page"] = ("/compare", f"?a={run}&b={args.compare_with}", "compare-histogram")
    return {
        name: timed(client, [router_payload(path, search)] * n, check)
        for name, (path, search, check) in pages.items()
    }


def report(results: dict) -> None:
    print(f"{'request':<16}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}{'KiB':>9}")
    for name, r in results.items():
        print(
            f"{name:<16}{r['p50_ms']:>9.1f}{r['p95_ms']:>9.1f}{r['max_ms']:>9.1f}"
            f"{r['response_kib']:>9.0f}"
        )


if __name__ == "__main__":
    main()
