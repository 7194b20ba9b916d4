"""What the dashboard reads: the run directories under the served folder, their logs, eval and
feature store, plus each run's model and SAE for live text. Nothing here takes a file path from a
request: pages ask for a run by the name this module gave it, and unknown names are not found."""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from analysis.geometry.results import SUMMARY, read_summary, read_table
from analysis.steering.metrics import Cancelled  # what a cancelled job raises
from analysis.store.read import FeatureStore
from hooks.errors import UserError
from sae.formats import weights_file

log = logging.getLogger("saewb.dashboard")

MAX_DEPTH = 4  # run folders are found this many levels below the served folder at most
SKIP = {"state", "features", "__pycache__", "node_modules"}
ANALYSIS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")  # galaxy, multidim-cutoff0.3
RESCAN_SECONDS = 2.0  # runs appear while training: look again, but not on every request


class NotFound(UserError):
    """A run or feature the served folder does not have."""


def is_run_dir(path: Path) -> bool:
    """A folder `saewb train` wrote (run.json), or any folder holding an SAE with its cfg.json."""
    if (path / "run.json").is_file():
        return True
    return (path / "cfg.json").is_file() and weights_file(path) is not None


def mtime(path: Path) -> int | None:
    """The file's modification time in ns, None where it is missing: a cache key part."""
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_train_log(path: Path) -> list[dict]:
    """train_log.jsonl's records; a line being written (or damaged) is skipped."""
    records = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return records
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "tokens" in record:
            records.append(record)
    return records


class Jobs:
    """Background work for callbacks: submit returns an id at once, the page polls for the
    result. Threads, not processes, so a model loaded once stays loaded for every later call.
    At most `limit` jobs wait or run at once, so no page can queue unbounded work; a
    cancellable job gets a threading.Event as its `cancel` keyword and should stop when set."""

    def __init__(self, workers: int = 2, keep: int = 64, limit: int = 4):
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="saewb-job")
        self._jobs: OrderedDict[str, Future] = OrderedDict()
        self._cancel: dict[str, threading.Event] = {}
        self._ids = itertools.count()
        self._keep, self._limit = keep, limit
        self._lock = threading.Lock()

    def submit(self, fn: Callable, *args, cancellable: bool = False) -> str:
        with self._lock:
            pending = sum(not f.done() for f in self._jobs.values())
            if pending >= self._limit:
                raise UserError(
                    f"The server is busy with {pending} requests (the limit is {self._limit}); "
                    "wait for one to finish or cancel it."
                )
            job = f"job-{next(self._ids)}"
            if cancellable:
                event = self._cancel[job] = threading.Event()
                self._jobs[job] = self._pool.submit(fn, *args, cancel=event)
            else:
                self._jobs[job] = self._pool.submit(fn, *args)
            while len(self._jobs) > self._keep:
                old, _ = self._jobs.popitem(last=False)
                self._cancel.pop(old, None)
        return job

    def cancel(self, job: str) -> bool:
        """Ask a cancellable job to stop; False if it is unknown, finished or not cancellable."""
        event = self._cancel.get(job) if isinstance(job, str) else None
        future = self._jobs.get(job) if isinstance(job, str) else None
        if event is None or future is None or future.done():
            return False
        event.set()
        future.cancel()  # a job still queued never starts
        return True

    def poll(self, job: str) -> tuple[bool, object]:
        """(done, result). A failed job raises its exception here; an unknown id is NotFound."""
        future = self._jobs.get(job) if isinstance(job, str) else None
        if future is None:
            raise NotFound("That request expired; run it again.")
        if not future.done():
            return False, None
        if future.cancelled():
            raise Cancelled("Cancelled before it started.")
        return True, future.result()


class Workspace:
    """The served folder: a single run directory or a folder with runs somewhere below it."""

    def __init__(self, root: Path | str, device: str = "cpu"):
        root = Path(root).expanduser()
        if not root.is_dir():
            raise UserError(
                f"{root} is not a folder; pass a run directory or a folder of runs "
                "(e.g. checkpoints)."
            )
        self.root = root.resolve()
        self.device = device
        self.jobs = Jobs()
        self._runs: dict[str, Path] = {}
        self._scanned = -1e9
        self._stores: dict[str, tuple[float, FeatureStore]] = {}
        self._opening: dict[str, threading.Lock] = {}  # per store: opening one takes seconds
        self._token_html: dict[str, tuple[FeatureStore, tuple[list[str], list[str]]]] = {}
        self._probes: dict[str, object] = {}
        self._models: dict[tuple[str, str], object] = {}  # (model, model dtype)
        self._results: dict[str, tuple[float, GeometryResult]] = {}
        self._summaries: dict[str, tuple[tuple, dict]] = {}
        self._lock = threading.Lock()
        self._probe_lock = threading.Lock()

    # -- runs -------------------------------------------------------------------------------

    def runs(self) -> dict[str, Path]:
        """{name: folder} of every run, named by its path below the served folder."""
        with self._lock:
            if time.monotonic() - self._scanned > RESCAN_SECONDS:
                self._runs = self._scan()
                self._scanned = time.monotonic()
            return dict(self._runs)

    def _scan(self) -> dict[str, Path]:
        found = {}
        for folder, dirs, _ in os.walk(self.root):  # symlinks are not followed out of the root
            path = Path(folder)
            depth = len(path.relative_to(self.root).parts)
            dirs[:] = sorted(
                d for d in dirs if d not in SKIP and not d.startswith(".") and depth < MAX_DEPTH
            )
            if is_run_dir(path):
                name = path.relative_to(self.root).as_posix()
                found[self.root.name if name == "." else name] = path
        return found

    def path(self, run: str | None) -> Path:
        """The folder of a run given by name; None picks the only run there is."""
        runs = self.runs()
        if run is None or run == "":
            if len(runs) == 1:
                return next(iter(runs.values()))
            raise NotFound("Choose a run: this folder holds " + _count(len(runs), "run") + ".")
        if not isinstance(run, str) or run not in runs:
            raise NotFound(f"There is no run named {str(run)[:80]!r} in {self.root}.")
        return runs[run]

    def name(self, run: str | None) -> str:
        """The canonical name of a run (resolving None to the only run)."""
        path = self.path(run)
        return next(name for name, p in self.runs().items() if p == path)

    def summary(self, run: str) -> dict:
        """Model, site, kind, shape, tokens and which parts (log, eval, store) the run has so far,
        read again only when one of its files changes (training appends to the log)."""
        path = self.path(run)
        files = ("run.json", "cfg.json", "train_log.jsonl", "eval.json", "features/manifest.json")
        stamp = tuple(mtime(path / f) for f in files) + (weights_file(path),)
        with self._lock:
            cached = self._summaries.get(str(path))
        if cached is None or cached[0] != stamp:
            cached = stamp, self._read_summary(run, path)
            with self._lock:
                self._summaries[str(path)] = cached
        return cached[1]

    def _read_summary(self, run: str, path: Path) -> dict:
        info = _read_json(path / "run.json") or {}
        cfg = _read_json(path / "cfg.json") or {}
        log_records = read_train_log(path / "train_log.jsonl")
        evaluation = _read_json(path / "eval.json")
        tokens = info.get("tokens") or cfg.get("tokens")
        if log_records:
            tokens = max(tokens or 0, log_records[-1]["tokens"])
        return dict(
            name=self.name(run),
            model=info.get("model") or cfg.get("model") or cfg.get("model_name") or "?",
            site=info.get("site") or cfg.get("site") or _saelens_site(cfg) or "?",
            # topk ... relu; a transcoder also has a target, the site it predicts from `site`
            architecture=info.get("architecture") or cfg.get("architecture"),
            target=info.get("target") or cfg.get("target") or None,
            latents=info.get("n_latents") or cfg.get("n_latents") or cfg.get("d_sae"),
            k=info.get("k") or cfg.get("k"),
            tokens=tokens,
            tokens_planned=info.get("tokens_planned"),
            has_sae=weights_file(path) is not None,
            log=log_records,
            eval=evaluation,
            has_store=(path / "features" / "manifest.json").is_file(),
        )

    # -- feature store ------------------------------------------------------------------------

    def store(self, run: str | None) -> FeatureStore:
        """The run's feature store, opened once (and again when `saewb analyze` rewrites it)."""
        path = self.path(run)
        manifest = path / "features" / "manifest.json"
        if not manifest.is_file():
            raise NotFound(
                f"Run {self.name(run)!r} has no feature store yet; run "
                f"`saewb analyze {path}` to build it."
            )
        stamp = manifest.stat().st_mtime
        with self._lock:
            opening = self._opening.setdefault(str(path), threading.Lock())
        with opening:  # one open per store, and requests for other runs need not wait for it
            cached = self._stores.get(str(path))
            if cached is None or cached[0] != stamp:
                cached = stamp, FeatureStore(path / "features")
                self._stores[str(path)] = cached
            return cached[1]

    def token_html(self, run: str | None) -> tuple[list[str], list[str]]:
        """The run's vocabulary escaped for the pages, once per store (see token_html)."""
        from dashboard.components import token_html

        store = self.store(run)
        with self._lock:
            cached = self._token_html.get(str(store.path))
            if cached is None or cached[0] is not store:  # a rebuilt store: escape again
                cached = store, token_html(store.vocab)
                self._token_html[str(store.path)] = cached
            return cached[1]

    # -- geometry and steering outputs --------------------------------------------------------

    def analyses(self, run: str | None) -> dict[str, Path]:
        """{name: folder} of every finished analysis under RUN/geometry: 'galaxy', 'map', ...,
        and variants written with options ('multidim-cutoff0.3'), each with its summary.json."""
        folder = self.path(run) / "geometry"
        if not folder.is_dir():
            return {}
        return {
            p.name: p
            for p in sorted(folder.iterdir())
            if p.is_dir() and not p.name.startswith(".") and (p / SUMMARY).is_file()
        }

    def result(self, run: str | None, name: str) -> GeometryResult:
        """One analysis's outputs, read once (and again when `saewb geometry` rewrites them).
        A missing one is NotFound, naming the command that makes it."""
        name = str(name)
        folder = self.path(run) / "geometry" / name
        # A plain folder name (never a path from the URL) whose summary marks it done.
        if not ANALYSIS_NAME.fullmatch(name) or not (folder / SUMMARY).is_file():
            base = name.split("-")[0]
            made_by = (
                f"saewb compare {self.name(run)} OTHER_RUN"
                if base == "compare"
                else f"saewb geometry {self.name(run)} --only {base}"
            )
            raise NotFound(f"Run {self.name(run)!r} has no {name} analysis yet; run `{made_by}`.")
        stamp = (folder / SUMMARY).stat().st_mtime
        with self._lock:
            cached = self._results.get(str(folder))
            if cached is None or cached[0] != stamp:
                cached = stamp, GeometryResult(folder)
                self._results[str(folder)] = cached
            return cached[1]

    def steering(self, run: str | None) -> dict[str, list[str]]:
        """Names of the run's saved steering outputs: CAA vectors, frontiers (`saewb steer
        --sweep`), single runs (`saewb steer`) and LF-Steering results (`saewb lf-steer`)."""
        folder = self.path(run) / "steering"

        def stems(sub: str, suffix: str = ".json") -> list[str]:
            where = folder / sub
            if not where.is_dir():
                return []
            return sorted(p.stem for p in where.iterdir() if p.name.endswith(suffix))

        lf = [p.stem for p in sorted(folder.glob("lf_steering*.json"))] if folder.is_dir() else []
        return dict(
            vectors=stems("vectors", ".safetensors"),
            frontiers=stems("frontiers"),
            runs=stems("runs"),
            lf=lf,
        )

    def steering_record(self, run: str | None, kind: str, name: str) -> dict:
        """One saved steering JSON by kind ('frontiers', 'runs', 'lf') and name, as listed."""
        if kind not in ("frontiers", "runs", "lf") or name not in self.steering(run)[kind]:
            raise NotFound(f"Run {self.name(run)!r} has no saved steering {kind} named {name!r}.")
        folder = self.path(run) / "steering"
        path = folder / f"{name}.json" if kind == "lf" else folder / kind / f"{name}.json"
        record = _read_json(path)
        if record is None:
            raise NotFound(f"{path.name} under {self.name(run)!r} is not a readable JSON object.")
        return record

    # -- live text ----------------------------------------------------------------------------

    def probe(self, run: str):
        """The run's model and SAE for live text, loaded on first use and then kept."""
        from analysis.probe import TextProbe
        from analysis.run import open_run

        path = self.path(run)
        with self._probe_lock:  # one load at a time; later calls find it loaded
            if str(path) not in self._probes:
                opened = open_run(path, device=self.device)
                key = (opened.model, opened.selection.model_dtype)  # one copy per dtype
                if key not in self._models:  # (the model, the lock for every hook on it)
                    loaded = opened.load_model(self.device, progress=False)
                    self._models[key] = loaded, threading.Lock()
                loaded, lock = self._models[key]
                self._probes[str(path)] = TextProbe(opened, loaded, self.device, lock)
            return self._probes[str(path)]


class GeometryResult:
    """RUN/geometry/<name>/ as written by analysis.geometry.results: the summary, and its tables
    and plotly figures read on first use and then kept."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.name = folder.name
        self.summary = read_summary(folder)
        self._tables: dict[str, dict] = {}
        self._figures: dict[str, dict] = {}
        self._built: dict = {}
        self._lock = threading.Lock()

    def memo(self, key, build: Callable):
        """What a page builds from this result (a figure, the map's arrays), built once per read
        of it: `saewb geometry` rewriting the analysis makes a new result, which misses here."""
        with self._lock:
            if key in self._built:
                return self._built[key]
        value = build()  # outside the lock: building reads this result's tables
        with self._lock:
            return self._built.setdefault(key, value)

    def has(self, name: str) -> bool:
        return (self.folder / f"{name}.parquet").is_file() or (
            self.folder / f"{name}.json"
        ).is_file()

    def table(self, name: str) -> dict:
        """{column: numpy array} of <name>.parquet."""
        with self._lock:
            if name not in self._tables:
                if not (self.folder / f"{name}.parquet").is_file():
                    raise NotFound(f"The {self.name} analysis has no table {name!r}.")
                self._tables[name] = read_table(self.folder, name)
            return self._tables[name]

    def figure(self, name: str) -> dict:
        """The plotly figure <name>.json as a plain dict (typed arrays kept base64-encoded)."""
        with self._lock:
            if name not in self._figures:
                figure = _read_json(self.folder / f"{name}.json")
                if figure is None:
                    raise NotFound(f"The {self.name} analysis has no figure {name!r}.")
                self._figures[name] = figure
            return self._figures[name]


def _saelens_site(cfg: dict) -> str | None:
    """A SAELens folder's site: ours where we exported it, else its hook name (SAELens >= 6 keeps
    both under `metadata`), TransformerLens names read as ours."""
    from hooks.sites import canonical_site

    meta = cfg.get("metadata") or {}
    name = meta.get("saewb_site") or meta.get("hook_name") or cfg.get("hook_name")
    return canonical_site(name) if name else None


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")
