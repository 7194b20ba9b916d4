"""Crystals: word-pair analogies as parallelograms in the site's activations, before and after LDA
removes distractor directions, and parallelogram / trapezoid quadruples among the SAE's features.

Word pairs come from the Google analogy set (`questions-words.txt`, shipped in gensim's test
data). Each word is read as " {word}" after the run's BOS (as the training windows start), and
its state is the site's activation at the word's last token: the function-vector and crystal
papers read the last token, where a multi-token word is assembled, and the leading space gives
the word-initial form it has in running text. A pair's difference is state(a) - state(b), for
the activations and for their SAE reconstructions.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from analysis.geometry.codes import Inputs
from analysis.geometry.results import Result
from analysis.run import Run
from analysis.store.encode import decoder_neighbours
from hooks.errors import UserError
from hooks.sites import Capture, resolve_site
from hooks.windows import special_id

QUESTIONS = "questions-words.txt"


# -- the analogy set -------------------------------------------------------------------------


def questions_words_path() -> Path:
    """gensim's copy of the analogy set, found without importing gensim (slow to import)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise UserError(
            f"Crystals need {QUESTIONS} from the gensim package, which is not installed; "
            "run `pip install gensim`."
        )
    return Path(spec.origin).parent / "test" / "test_data" / QUESTIONS


def parse_questions_words(path: Path) -> dict[str, list[tuple[str, str]]]:
    """{relation: unique (a, b) pairs in file order}: each ': section' opens a relation and each
    line `a b c d` (a is to b as c is to d) gives the pairs (a, b) and (c, d)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"The analogy file {path} does not exist; reinstall gensim (>= 4.3).")
    relations: dict[str, dict[tuple[str, str], None]] = {}
    current = None
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        words = line.split()
        if not words:
            continue
        if words[0] == ":":
            current = relations.setdefault(" ".join(words[1:]) or f"section-{number}", {})
            continue
        if current is None or len(words) != 4:
            raise UserError(
                f"Line {number} of {path} is not an analogy 'a b c d' under a ': relation' "
                f"header: {line[:80]!r}."
            )
        current[(words[0], words[1])] = current[(words[2], words[3])] = None
    relations = {name: list(pairs) for name, pairs in relations.items() if pairs}
    if not relations:
        raise UserError(f"{path} holds no ': relation' sections with analogies.")
    return relations


def choose_pairs(
    relations: dict[str, list[tuple[str, str]]], which: str, max_pairs: int, seed: int
) -> tuple[list[tuple[str, str]], np.ndarray, list[str]]:
    """(pairs, (P,) relation index, relation names): up to max_pairs seeded pairs per relation."""
    names = list(relations) if which == "all" else [r.strip() for r in which.split(",")]
    unknown = [r for r in names if r not in relations]
    if unknown:
        raise UserError(
            f"Unknown relation '{unknown[0]}'; use 'all' or a comma-separated list of "
            f"{', '.join(relations)}."
        )
    if max_pairs < 2:
        raise UserError(f"--option crystals.max_pairs must be at least 2, got {max_pairs}.")
    rng = np.random.default_rng(seed)
    pairs, labels = [], []
    for r, name in enumerate(names):
        chosen = rng.permutation(len(relations[name]))[:max_pairs]
        pairs += [relations[name][i] for i in sorted(chosen)]
        labels += [r] * len(chosen)
    return pairs, np.asarray(labels), names


# -- the model's states ------------------------------------------------------------------------


@torch.no_grad()
def word_states(run: Run, loaded, words: list[str], batch: int = 64, progress: bool = True):
    """((W, d) site activations, (W, d) SAE reconstructions, (W,) token counts) of each word,
    read at its last token. Words of one token length share a batch, so nothing is padded."""
    if run.sae.cfg.is_transcoder:
        raise UserError(
            f"Crystals compare a word's state at {run.site} with its reconstruction; this run is "
            f"a transcoder to {run.target}, which reconstructs another site."
        )
    model, tokenizer = loaded.model, loaded.tokenizer
    site = resolve_site(model, run.site).name
    bos = special_id(tokenizer, "bos") if run.selection.bos == "prepend" else None
    ids = [([bos] if bos is not None else []) + tokenizer(f" {w}", add_special_tokens=False)[
        "input_ids"] for w in words]  # fmt: skip
    lengths = np.array([len(i) for i in ids])
    device = next(model.parameters()).device
    sae = run.sae.to(device).eval()
    states = torch.zeros(len(words), sae.cfg.d_in)
    groups = [np.flatnonzero(lengths == n) for n in np.unique(lengths)]
    chunks = [g[s : s + batch] for g in groups for s in range(0, len(g), batch)]
    with Capture(model, [site]) as capture:
        for rows in tqdm(chunks, desc="word states", disable=not progress):
            tokens = torch.tensor([ids[i] for i in rows], device=device)  # (B, T)
            states[torch.from_numpy(rows)] = capture(tokens)[site][:, -1].float().cpu()
    recon = sae.reconstruct(states.to(device))[0].float().cpu()
    return states.numpy(), recon.numpy(), lengths - (bos is not None)


# -- parallelogram quality ---------------------------------------------------------------------


def _unit(X: np.ndarray) -> np.ndarray:
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def parallelogram_quality(diffs: np.ndarray, labels: np.ndarray) -> dict:
    """How well each relation's differences line up: the mean cosine of distinct same-relation
    pairs (against the mean cosine across relations), the within/between spread ratio
    tr(S_w)/tr(S_b) (lower is better) and the silhouette by relation (Euclidean, as the paper)."""
    from sklearn.metrics import silhouette_samples

    U = _unit(diffs.astype(np.float64))
    cos = U @ U.T  # (P, P)
    same = labels[:, None] == labels[None, :]
    off = ~np.eye(len(U), dtype=bool)
    centre = diffs.mean(0)
    sil = silhouette_samples(diffs, labels) if len(np.unique(labels)) > 1 else np.zeros(len(U))
    per = {}
    within_total = between_total = 0.0
    for r in np.unique(labels):
        m = labels == r
        mean_r = diffs[m].mean(0)
        within = float(((diffs[m] - mean_r) ** 2).sum())
        between = float(m.sum() * ((mean_r - centre) ** 2).sum())
        within_total, between_total = within_total + within, between_total + between
        block = cos[np.ix_(m, m)][off[np.ix_(m, m)]]
        per[int(r)] = dict(
            n=int(m.sum()),
            same_cos=float(block.mean()) if block.size else float("nan"),
            spread_ratio=within / max(between, 1e-12),
            silhouette=float(sil[m].mean()),
        )
    return dict(
        same_cos=float(np.nanmean([p["same_cos"] for p in per.values()])),
        cross_cos=float(cos[~same].mean()) if (~same).any() else float("nan"),
        spread_ratio=within_total / max(between_total, 1e-12),
        silhouette=float(sil.mean()),
        per_relation=per,
    )


def split_pairs(labels: np.ndarray, test_share: float, seed: int) -> np.ndarray:
    """(P,) bool, True for held-out pairs: a seeded, per-relation split."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for r in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == r))
        test[idx[: max(1, int(round(test_share * len(idx))))]] = True
    return test


def lda_projection(diffs, labels, test, n_lda: int, shrinkage: str):
    """(P, n) every pair projected by an LDA fit on the training pairs only, so the held-out
    pairs' quality shows whether removing the within-relation directions generalises."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    n = max(1, min(n_lda, len(np.unique(labels[~test])) - 1, diffs.shape[1]))
    if shrinkage == "none":  # the paper's default LDA
        lda = LinearDiscriminantAnalysis(n_components=n)
    else:
        value = "auto" if shrinkage == "auto" else float(shrinkage)
        lda = LinearDiscriminantAnalysis(n_components=n, solver="eigen", shrinkage=value)
    lda.fit(diffs[~test], labels[~test])
    return lda.transform(diffs)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    norm = np.sqrt((x**2).sum() * (y**2).sum())
    return float((x * y).sum() / norm) if norm > 1e-12 else float("nan")


def length_distractor(diffs: np.ndarray, length_diff: np.ndarray, n_pcs: int = 5) -> dict:
    """Pearson r of each top PC of the standardised differences with the length difference; the
    paper found PC0 tracks word length. A constant PC or length gives r = NaN (null)."""
    from sklearn.decomposition import PCA

    Z = (diffs - diffs.mean(0)) / np.maximum(diffs.std(0), 1e-12)
    pcs = PCA(n_components=min(n_pcs, *Z.shape), svd_solver="full").fit_transform(Z)
    r = np.array([_pearson(pcs[:, i], length_diff) for i in range(pcs.shape[1])])
    if np.isnan(r).all():
        return dict(r_pc0=float("nan"), best_pc=None, best_r=float("nan"), r_by_pc=r.tolist())
    best = int(np.nanargmax(np.abs(r)))
    return dict(r_pc0=float(r[0]), best_pc=best, best_r=float(r[best]), r_by_pc=r.tolist())


def pair_quality(diffs, labels, test, length_diff, n_lda: int, shrinkage: str) -> dict:
    """Quality on the held-out pairs before and after the LDA fit on the training pairs."""
    proj = lda_projection(diffs, labels, test, n_lda, shrinkage)
    return dict(
        before=parallelogram_quality(diffs[test], labels[test]),
        after=parallelogram_quality(proj[test], labels[test]),
        length=length_distractor(diffs, length_diff),
        length_after=length_distractor(proj, length_diff),
        projection=proj,
    )


# -- quadruples among the SAE's features ------------------------------------------------------


def _oriented_pairs(W: np.ndarray, neighbours: int) -> np.ndarray:
    """(E, 2) each row's nearest rows by cosine, both orientations (j - i and i - j), so a
    parallelogram whose sides point opposite ways in index order still meets itself."""
    ids, _ = decoder_neighbours(torch.from_numpy(W), top=neighbours)  # (n, m)
    i = np.repeat(np.arange(len(W)), ids.shape[1])
    pairs = np.unique(np.sort(np.stack([i, ids.numpy().ravel()], 1), axis=1), axis=0)
    return np.concatenate([pairs, pairs[:, ::-1]])


def find_quadruples(
    W: np.ndarray,
    kind: str = "parallelogram",
    neighbours: int = 8,
    cluster_size: int = 64,
    min_quality: float = 0.7,
    seed: int = 0,
    progress: bool = False,
) -> tuple[dict[str, np.ndarray], dict]:
    """Quadruples (i, j, k, l) of rows with w_j - w_i ~ w_l - w_k, found by clustering the
    differences of each row with its nearest rows (seeded k-means; Euclidean on the raw
    differences for parallelograms, on unit differences, i.e. cosine, for trapezoids), then
    checking every two members of a cluster exactly. The quality is 1 - |d1 - d2| / mean(|d1|,
    |d2|) for parallelograms (1: exact) and cos(d1, d2) for trapezoids.

    Returns ({i, j, k, l, cluster, quality} columns, {n_differences, n_clusters})."""
    from sklearn.cluster import MiniBatchKMeans

    if kind not in ("parallelogram", "trapezoid"):
        raise UserError(f"Unknown quadruple kind '{kind}'; use parallelogram or trapezoid.")
    W = np.asarray(W, dtype=np.float32)
    pairs = _oriented_pairs(W, min(neighbours, len(W) - 1))  # (E, 2)
    D = W[pairs[:, 1]] - W[pairs[:, 0]]  # (E, d)
    if kind == "trapezoid":
        D = _unit(D)
    rng = np.random.default_rng(seed)
    # k-means only blocks candidates, so a seeded Gaussian projection to 64 dims is enough
    proj = rng.standard_normal((W.shape[1], min(64, W.shape[1]))).astype(np.float32)
    n_clusters = max(1, min(len(D) // cluster_size, 4096))
    labels = MiniBatchKMeans(
        n_clusters=n_clusters, random_state=seed, n_init=1, batch_size=4096
    ).fit_predict(D @ proj)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(n_clusters + 1))
    found = {k: [] for k in ("a", "b", "cluster", "quality")}
    for c in tqdm(range(n_clusters), desc=f"{kind}s", disable=not progress):
        members = order[bounds[c] : bounds[c + 1]]  # (s,)
        if len(members) < 2:
            continue
        Dc = D[members].astype(np.float64)  # (s, d)
        norm = np.linalg.norm(Dc, axis=1)
        for start in range(0, len(members), 1024):  # (1024, s) blocks: a big cluster stays small
            top = Dc[start : start + 1024]
            if kind == "parallelogram":
                sq = norm[start : start + 1024, None] ** 2 + norm[None] ** 2 - 2 * top @ Dc.T
                scale = np.maximum((norm[start : start + 1024, None] + norm[None]) / 2, 1e-12)
                quality = 1 - np.sqrt(np.maximum(sq, 0)) / scale
            else:
                quality = top @ Dc.T
            a, b = np.nonzero(quality >= min_quality)
            a, keep = a + start, b > a + start  # each unordered pair of members once
            a, b, q = members[a[keep]], members[b[keep]], quality[a[keep] - start, b[keep]]
            ea, eb = pairs[a], pairs[b]
            disjoint = (ea[:, :, None] != eb[:, None, :]).all((1, 2))
            found["a"].append(a[disjoint])
            found["b"].append(b[disjoint])
            found["cluster"].append(np.full(disjoint.sum(), c))
            found["quality"].append(q[disjoint])
    cat = {k: np.concatenate(v) if v else np.zeros(0) for k, v in found.items()}
    ea, eb = pairs[cat["a"].astype(int)], pairs[cat["b"].astype(int)]
    quads = np.concatenate([ea, eb], 1).reshape(-1, 4)  # (Q, 4): i, j, k, l
    # one key per shape, best first: a parallelogram by its two diagonals {i, l}, {j, k}; a
    # trapezoid by its two sides, up to swapping them and flipping both (mirrors are in the set)
    seen, keep = set(), []
    for row in np.argsort(-cat["quality"], kind="stable"):
        i, j, k, m = (int(v) for v in quads[row])  # w_j - w_i ~ w_m - w_k
        if kind == "parallelogram":
            key = tuple(sorted((tuple(sorted((i, m))), tuple(sorted((j, k))))))
        else:
            key = min(((i, j), (k, m)), ((k, m), (i, j)), ((j, i), (m, k)), ((m, k), (j, i)))
        if key not in seen:
            seen.add(key)
            keep.append(row)
    keep = np.asarray(keep, dtype=np.int64)
    q = quads[keep]
    table = dict(
        i=q[:, 0], j=q[:, 1], k=q[:, 2], l=q[:, 3],
        cluster=cat["cluster"][keep].astype(np.int64), quality=cat["quality"][keep],
    )  # fmt: skip
    return table, dict(n_differences=len(D), n_clusters=n_clusters)


def feature_quadruples(
    W: np.ndarray,
    max_rows: int,
    seed: int,
    progress: bool,
    min_quality: dict[str, float],
    **options,
):
    """Both searches over a seeded subset of at most max_rows decoder rows, each beside the same
    search on as many random unit rows (the null: how many quadruples chance alone gives).
    min_quality: {kind: threshold}."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.permutation(len(W))[:max_rows]) if len(W) > max_rows else np.arange(len(W))
    null = _unit(rng.standard_normal((len(rows), W.shape[1])).astype(np.float32))
    tables, summary = {}, {"n_rows": len(rows)}
    for kind, threshold in min_quality.items():
        options["min_quality"] = threshold
        table, info = find_quadruples(W[rows], kind, seed=seed, progress=progress, **options)
        for col in ("i", "j", "k", "l"):
            table[col] = rows[table[col]]  # back to latent ids
        null_table, _ = find_quadruples(null, kind, seed=seed, **options)
        tables[kind] = table
        summary[kind] = dict(
            info, n_found=len(table["i"]), n_null=len(null_table["i"]),
            top=[dict(latents=[int(table[c][t]) for c in "ijkl"],
                      quality=float(table["quality"][t])) for t in range(min(10, len(table["i"])))],
        )  # fmt: skip
    return tables, summary


def _figure(pairs_table: dict, kinds: list[str]):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    titles = [f"{k}: {v}" for k in kinds for v in ("PCA", "LDA (held-out pairs)")]
    fig = make_subplots(rows=len(kinds), cols=2, subplot_titles=titles)
    relations = list(dict.fromkeys(pairs_table["relation"]))
    for row, kind in enumerate(kinds, 1):
        for col, axes in enumerate(("pc", "lda"), 1):
            for r, name in enumerate(relations):
                m = pairs_table["relation"] == name
                if axes == "lda":
                    m &= pairs_table["held_out"]
                text = [f"{a} - {b}" for a, b in zip(pairs_table["a"][m], pairs_table["b"][m])]
                fig.add_trace(
                    go.Scatter(
                        x=pairs_table[f"{kind}_{axes}0"][m], y=pairs_table[f"{kind}_{axes}1"][m],
                        mode="markers", name=name, legendgroup=name, text=text,
                        showlegend=row == 1 and col == 1, marker=dict(color=r, size=5),
                    ),
                    row=row, col=col,
                )  # fmt: skip
    fig.update_layout(title="Word-pair differences by relation", height=420 * len(kinds))
    return fig


def crystals(
    run: Run,
    inputs: Inputs | None = None,
    *,
    relations: str = "all",
    max_pairs: int = 50,
    n_lda: int = 8,
    shrinkage: str = "auto",
    test_share: float = 0.3,
    max_rows: int = 16384,
    neighbours: int = 8,
    cluster_size: int = 64,
    min_parallelogram: float = 0.7,
    min_trapezoid: float = 0.9,
    seed: int = 0,
    progress: bool = True,
) -> Result:
    """Parallelogram quality of the analogy pairs (activations and SAE reconstructions), before
    and after LDA, the word-length distractor, and quadruples among the SAE's decoder rows.

    n_lda is the paper's saved n_components (8). shrinkage 'auto' (Ledoit-Wolf) keeps the LDA
    from fitting noise when pairs are fewer than dimensions; 'none' is the paper's plain LDA."""
    inputs = inputs or Inputs(run)
    if not 0 < test_share < 1:
        raise UserError(f"--option crystals.test_share must be in (0, 1), got {test_share}.")
    pairs, labels, names = choose_pairs(
        parse_questions_words(questions_words_path()), relations, max_pairs, seed
    )
    words = list(dict.fromkeys(w for pair in pairs for w in pair))
    where = {w: i for i, w in enumerate(words)}
    states, recon, n_tok = word_states(run, inputs.loaded, words, progress=progress)
    a = np.array([where[p[0]] for p in pairs])
    b = np.array([where[p[1]] for p in pairs])
    test = split_pairs(labels, test_share, seed)
    length = dict(tokens=(n_tok[a] - n_tok[b]).astype(float),
                  chars=np.array([len(p[0]) - len(p[1]) for p in pairs], dtype=float))  # fmt: skip
    table = dict(
        relation=np.array([names[r] for r in labels]), a=np.array([p[0] for p in pairs]),
        b=np.array([p[1] for p in pairs]), held_out=test, tokens_a=n_tok[a], tokens_b=n_tok[b],
    )  # fmt: skip
    summary = dict(relations=names, n_pairs=len(pairs), n_held_out=int(test.sum()), n_lda=n_lda,
                   shrinkage=shrinkage, context="BOS + ' {word}', last token")  # fmt: skip
    from sklearn.decomposition import PCA

    for kind, X in (("activation", states), ("reconstruction", recon)):
        diffs = (X[a] - X[b]).astype(np.float64)  # (P, d)
        q = pair_quality(diffs, labels, test, length["tokens"], n_lda, shrinkage)
        q["length_chars"] = length_distractor(diffs, length["chars"])
        proj = q.pop("projection")
        for part in ("before", "after"):
            q[part]["per_relation"] = {names[r]: v for r, v in q[part]["per_relation"].items()}
        summary[kind] = q
        pcs = PCA(n_components=2, random_state=seed).fit_transform(diffs)
        table |= {f"{kind}_pc0": pcs[:, 0], f"{kind}_pc1": pcs[:, 1]}
        table |= {f"{kind}_lda0": proj[:, 0],
                  f"{kind}_lda1": proj[:, 1] if proj.shape[1] > 1 else np.zeros(len(proj))}  # fmt: skip
    W = run.sae.W_dec.detach().float().cpu().numpy()
    thresholds = dict(parallelogram=min_parallelogram, trapezoid=min_trapezoid)
    quads, summary["quadruples"] = feature_quadruples(
        W, max_rows, seed, progress, thresholds, neighbours=neighbours, cluster_size=cluster_size
    )
    tables = {"pairs": table}
    tables |= {f"{k}s": v for k, v in quads.items()}
    return Result(summary, tables, {"pairs": _figure(table, ["activation", "reconstruction"])})
