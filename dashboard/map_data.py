"""What the feature map page draws from: one run's map points with their latent ids and colour
keys (RUN/geometry/map and RUN/geometry/features.parquet), read once per rewrite; plotly's
typed arrays; the label search; which points a box or lasso holds."""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from dashboard.data import Workspace, mtime
from hooks.errors import UserError

JOINED = "features.parquet"  # RUN/geometry/features.parquet: per-latent cluster ids
CATEGORIES = {  # colour key (a column of features.parquet): what the dropdown says
    "cooc_lobe": "co-occurrence lobe",
    "geometric_lobe": "geometric lobe",
    "multidim_cluster": "multi-dimensional cluster",
}
SEARCH = "search"


@dataclass
class MapData:
    """One run's map: the points in the map's order, each point's feature id and colour keys."""

    feature: np.ndarray  # (N,) latent id of each point
    x: np.ndarray  # (N,) float32
    y: np.ndarray  # (N,) float32
    density: np.ndarray | None  # (N,)
    clusters: dict[str, np.ndarray]  # colour key -> (N,) cluster id, -1 for none
    open_store: Callable[[], object] | None  # the run's FeatureStore (labels, search), if any
    encoded: dict = field(default_factory=dict)  # the typed arrays, encoded once
    y_order: np.ndarray | None = None  # (N,) points by y, for lasso tests

    @property
    def keys(self) -> list[str]:
        """The colourings this run offers, in dropdown order."""
        keys = [k for k in CATEGORIES if k in self.clusters]
        keys += ["density"] if self.density is not None else []
        keys += [SEARCH] if self.has_store else []
        return keys or ["plain"]

    @property
    def has_store(self) -> bool:
        return self.open_store is not None

    @property
    def store(self):
        """The FeatureStore, opened on first use (the map draws without it), or None."""
        return None if self.open_store is None else self.open_store()

    def index(self, feature: int) -> int | None:
        """The point of a latent, or None where the map leaves it out (a dead latent)."""
        hit = np.flatnonzero(self.feature == feature)
        return int(hit[0]) if len(hit) else None


def load_map(ws: Workspace, run: str) -> MapData:
    """The run's map, read once (and again when `saewb geometry` or `saewb analyze` rewrites
    its parts). No map raises NotFound naming `saewb geometry RUN --only map`."""
    result = ws.result(run, "map")
    manifest = ws.path(run) / "features" / "manifest.json"
    joined = ws.path(run) / "geometry" / JOINED
    key = ("map", mtime(manifest), mtime(joined))  # the store and the joined clusters too
    return result.memo(key, lambda: _read_map(ws, run, result, key[1] is not None, joined))


def _read_map(ws: Workspace, run: str, result, has_store: bool, joined: Path) -> MapData:
    open_store = (lambda: ws.store(run)) if has_store else None
    coords = result.table("coords")
    feature = coords["feature"].astype(np.int64)
    x, y = coords["x"].astype(np.float32), coords["y"].astype(np.float32)
    keep = np.isfinite(x) & np.isfinite(y)
    feature, x, y = feature[keep], x[keep], y[keep]
    density = coords.get("density")
    if density is not None:
        density = density[keep].astype(np.float64)
    elif open_store is not None:
        density = open_store().features.column("density").to_numpy()[feature]
    clusters = {}
    if joined.is_file():
        table = pq.read_table(joined)
        ids = table.column("feature").to_numpy() if "feature" in table.column_names else None
        for name in CATEGORIES:
            if name not in table.column_names or ids is None:
                continue
            full = np.full(max(int(feature.max(initial=0)), int(ids.max(initial=0))) + 1, -1)
            full[ids] = table.column(name).to_numpy(zero_copy_only=False)
            clusters[name] = full[feature].astype(np.int64)
    data = MapData(feature, x, y, density, clusters, open_store)
    data.encoded = dict(x=typed(x), y=typed(y))
    data.y_order = np.argsort(y, kind="stable")
    if open_store is not None:  # open the store while the browser draws (seconds at 65k)
        threading.Thread(target=_warm, args=(open_store,), daemon=True).start()
    return data


def _warm(open_store: Callable) -> None:
    try:
        open_store()
    except UserError:  # e.g. a store of another SAE: the hover that needs it says so
        pass


def typed(values: np.ndarray) -> dict:
    """plotly.js's typed-array form: {"dtype", "bdata"} (base64 of little-endian bytes), a
    quarter of the size of JSON numbers and decoded without parsing."""
    values = np.asarray(values)
    if values.dtype.kind == "f":
        dtype = "f4"
    elif values.min(initial=0) >= 0:
        top = int(values.max(initial=0))
        dtype = "u1" if top < 2**8 else "u2" if top < 2**16 else "u4"
    else:
        low, top = int(values.min()), int(values.max())
        dtype = (
            "i1"
            if -(2**7) <= low and top < 2**7
            else "i2"
            if -(2**15) <= low and top < 2**15
            else "i4"
        )
    raw = np.ascontiguousarray(values.astype("<" + dtype))
    return {"dtype": dtype, "bdata": base64.b64encode(raw.tobytes()).decode("ascii")}


def decode(array: dict) -> np.ndarray:
    """The numpy array behind a typed-array dict."""
    return np.frombuffer(base64.b64decode(array["bdata"]), dtype="<" + array["dtype"])


# -- search -------------------------------------------------------------------------------------


def matches(store, text: str) -> np.ndarray:
    """(n_latents,) bool: latents whose label contains `text`, or whose top examples fire on a
    token that is `text` (ignoring case and spaces; else tokens that contain it, as the
    feature browser's search does)."""
    if not (text or "").strip():
        raise UserError("The search text is empty; type a word, e.g. Paris.")
    return store.label_contains(text) | store.fires_on(text)


def inside(data: MapData, selection: dict | None) -> np.ndarray:
    """Point indices inside a box (`range`) or lasso (`lassoPoints`) selection, in map order."""
    if not isinstance(selection, dict):
        return np.zeros(0, dtype=np.int64)
    x, y = data.x, data.y
    box, lasso = selection.get("range"), selection.get("lassoPoints")
    try:
        if isinstance(box, dict) and "x" in box and "y" in box:
            (x0, x1), (y0, y1) = sorted(map(float, box["x"])), sorted(map(float, box["y"]))
            return np.flatnonzero((x >= x0) & (x <= x1) & (y >= y0) & (y <= y1))
        if isinstance(lasso, dict) and "x" in lasso and "y" in lasso:
            px, py = np.asarray(lasso["x"], float), np.asarray(lasso["y"], float)
        else:
            return np.zeros(0, dtype=np.int64)
    except (TypeError, ValueError):
        raise UserError("The selection is not a box or a lasso of numbers.") from None
    if len(px) < 3 or len(px) != len(py):
        return np.zeros(0, dtype=np.int64)
    # Even-odd rule: a point is inside if a ray to its right crosses the lasso's edges an odd
    # number of times. Each edge is tested only against the points within its height: a slice
    # of the points sorted by y.
    order = data.y_order
    ys = y[order]
    odd = np.zeros(len(x), dtype=bool)
    for ax, ay, bx, by in zip(px, py, np.roll(px, -1), np.roll(py, -1)):
        if ay == by:
            continue  # a flat edge: never crossed by a horizontal ray
        lo, hi = min(ay, by), max(ay, by)
        span = order[np.searchsorted(ys, lo, "left") : np.searchsorted(ys, hi, "left")]
        at = ax + (y[span] - ay) * (bx - ax) / (by - ay)  # where the edge meets each point's row
        odd[span] ^= x[span] < at
    return np.flatnonzero(odd)


def labels(data: MapData, features) -> list[str]:
    """The store's labels of some latents ('' where the run has no store)."""
    features = np.asarray(features, dtype=np.int64)
    store = data.store
    if store is None:
        return [""] * len(features)
    return store.labels(features)


def point_feature(data: MapData, event: dict | None) -> int | None:
    """The latent of the first point of a plotly click or hover event. Dash's event data loses
    the customdata of typed arrays, so the main trace's points are found by their number."""
    points = (event or {}).get("points") or []
    point = points[0] if points and isinstance(points[0], dict) else {}
    try:
        if point.get("curveNumber") == 0:
            number = int(point["pointNumber"])
            return int(data.feature[number]) if 0 <= number < len(data.feature) else None
        return int(point["customdata"])
    except (KeyError, TypeError, ValueError):
        return None
