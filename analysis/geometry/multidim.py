"""Multi-dimensional features ("Not All Language Model Features Are Linear"): cluster the decoder
directions, reconstruct each cluster's activations from its latents alone, PCA them, rank the
clusters by how irreducibly 2-D their top two PCs are, and look for weekday and month circles
with a built-in calendar probe.

    multidim(run, clustering="graph", cutoff=0.5, ...) -> Result
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import connected_components
from tqdm import tqdm

from analysis.geometry.calendar import SETS, carrying_cluster, circle_fit, encode_probes
from analysis.geometry.codes import Inputs
from analysis.geometry.common import angular_affinity, spectral_labels, unit_decoder
from analysis.geometry.irreducibility import (
    cluster_pca,
    irreducibility,
    mixture_index,
    separability_index,
)
from analysis.geometry.results import Result
from analysis.run import Run
from analysis.store.encode import decoder_neighbours
from hooks.errors import UserError

PCS = 5  # the paper's PCA depth; the pcs table always has pc1..pc5 (NaN past a cluster's rank)


def canonical(labels: np.ndarray, min_size: int, max_size: int) -> np.ndarray:
    """(n,) labels renumbered largest cluster first (ties: smallest member first); clusters
    outside min_size..max_size and items labelled -1 become -1."""
    ids, first, inverse, sizes = np.unique(
        labels, return_index=True, return_inverse=True, return_counts=True
    )
    keep = (ids >= 0) & (sizes >= min_size) & (sizes <= max_size)
    order = np.flatnonzero(keep)[np.lexsort((first[keep], -sizes[keep]))]
    new = np.full(len(ids), -1, dtype=np.int32)
    new[order] = np.arange(len(order))
    return new[inverse.ravel()]


def graph_clusters(
    W: np.ndarray, cutoff: float = 0.5, top_k: int = 3, min_size: int = 2, max_size: int = 1000
) -> np.ndarray:
    """(n,) connected components of the graph joining each unit row to its top_k nearest rows
    with cosine above cutoff (edges made symmetric), -1 outside min_size..max_size. The
    neighbours come in row chunks, so no n x n matrix is formed."""
    n = len(W)
    ids, cos = decoder_neighbours(torch.from_numpy(W), top=min(top_k, n - 1))  # (n, top_k)
    ids, cos = ids.numpy(), cos.numpy()
    on = cos > cutoff
    rows = np.repeat(np.arange(n), ids.shape[1])[on.ravel()]
    graph = sp.csr_matrix((np.ones(len(rows)), (rows, ids.ravel()[on.ravel()])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)  # treats each edge as undirected
    return canonical(labels, min_size, max_size)


@dataclass
class ClusterScores:
    """Per cluster (indexed by cluster id): what rank_clusters measured; NaN where not scored."""

    size: np.ndarray  # (K,)
    n_tokens: np.ndarray  # (K,) tokens on which at least one of its latents fires
    mixture: np.ndarray  # (K,) epsilon-mixture index M of PCs 1-2
    separability: np.ndarray  # (K,) separability index S of PCs 1-2 (nats)
    score: np.ndarray  # (K,) S * (1 - M)
    explained: np.ndarray  # (K, PCS) explained variance ratio of the PCs
    order: np.ndarray  # (K,) cluster ids ranked by score (unscored last)
    samples: dict  # cluster -> (token rows (m,), PC scores (m, k)) of the scored clusters
    transforms: dict  # cluster -> maps (m, c) activations of its latents to PC scores


def members(labels: np.ndarray) -> list[np.ndarray]:
    """The latents of each cluster 0..K-1, ascending (one sort, not a scan per cluster)."""
    if not (labels >= 0).any():
        return []
    order = np.argsort(labels, kind="stable")[(labels < 0).sum() :]  # the -1s sort first
    return np.split(order, np.cumsum(np.bincount(labels[labels >= 0]))[:-1])


def cluster_tokens(acts_csc: sp.csc_matrix, latents: np.ndarray, limit: int, rng) -> tuple:
    """(rows (m,), F (m, c)): up to `limit` seeded tokens on which a latent of the cluster fires."""
    sub = acts_csc[:, latents].tocsr()  # (N, c)
    rows = np.flatnonzero(np.diff(sub.indptr) > 0)
    if len(rows) > limit:
        rows = np.sort(rng.choice(rows, limit, replace=False))
    return rows, sub[rows].toarray()


def rank_clusters(
    acts: sp.csr_matrix,
    W_dec: np.ndarray,
    labels: np.ndarray,
    *,
    n_components: int = PCS,
    sample_limit: int = 20_000,
    score_limit: int = 2_000,
    epsilon: float = 0.1,
    max_scored: int = 500,
    seed: int = 0,
    progress: bool = True,
) -> ClusterScores:
    """Reconstruct, PCA and score the clusters of `labels` (n_latents,) over the codes `acts`
    (N, n_latents) with decoder rows W_dec (n_latents, d).

    Each cluster's PCA uses up to sample_limit seeded tokens where one of its latents fires; its
    indices use up to score_limit of those (seeded). The `max_scored` largest clusters are
    scored (all when there are fewer); the rest keep NaN and rank last."""
    groups = members(labels)
    K = len(groups)
    size = np.array([len(g) for g in groups], dtype=np.int64)
    n_tokens = np.zeros(K, np.int64)
    mixture, separability, score = (np.full(K, np.nan) for _ in range(3))
    explained = np.full((K, PCS), np.nan)
    samples, transforms = {}, {}
    acts_csc = acts.tocsc()
    scored = np.lexsort((np.arange(K), -size))[:max_scored]  # largest first, ties by id
    for c in tqdm(np.sort(scored), desc="multidim", disable=not progress):
        rng = np.random.default_rng([seed, int(c)])
        rows, F = cluster_tokens(acts_csc, groups[c], sample_limit, rng)
        n_tokens[c] = len(rows)
        if len(rows) < 3:
            continue
        pcs, ratio, transforms[c] = cluster_pca(F, W_dec[groups[c]], n_components)
        explained[c, : len(ratio)] = ratio
        samples[c] = (rows, pcs)
        if pcs.shape[1] < 2:
            continue
        pick = rng.choice(len(pcs), min(score_limit, len(pcs)), replace=False)
        top2 = pcs[np.sort(pick), :2]
        mixture[c] = mixture_index(top2, epsilon, seed=seed * 1_000_003 + int(c))
        separability[c] = separability_index(top2)
        score[c] = irreducibility(mixture[c], separability[c])
    order = np.lexsort((np.arange(K), -np.nan_to_num(score, nan=-np.inf)))
    return ClusterScores(
        size, n_tokens, mixture, separability, score, explained, order, samples, transforms
    )


def multidim(
    run: Run,
    inputs: Inputs | None = None,
    *,
    clustering: str = "graph",
    cutoff: float = 0.5,
    top_k: int = 3,
    n_clusters: int = 1000,
    min_size: int = 2,
    max_size: int = 1000,
    sample_limit: int = 20_000,
    score_limit: int = 2_000,
    max_scored: int = 500,
    n_components: int = PCS,
    epsilon: float = 0.1,
    top_clusters: int = 10,
    plot_points: int = 2_000,
    calendar: bool = True,
    circle_r2: float = 0.5,
    seed: int = 0,
    progress: bool = True,
) -> Result:
    """Cluster the SAE's active decoder directions, rank the clusters by irreducibility and fit
    weekday and month circles. See the module docstring of each step for the procedure."""
    if clustering not in ("graph", "spectral"):
        raise UserError(f"multidim.clustering must be 'graph' or 'spectral', got {clustering!r}.")
    if not 1 <= n_components <= PCS:
        raise UserError(f"multidim.n_components must be 1 to {PCS}, got {n_components}.")
    inputs = inputs or Inputs(run, progress=progress)
    codes = inputs.codes
    n_latents = run.sae.cfg.n_latents
    active = np.flatnonzero(np.diff(codes.acts.tocsc().indptr) > 0)  # latents that ever fire
    if len(active) < max(2 * min_size, 10):
        raise UserError(
            f"Only {len(active)} latents of {run.path} fire on the {codes.n_tokens} held-out "
            f"tokens, too few active features to cluster (at least {max(2 * min_size, 10)} are "
            "needed); analyze more tokens or use an SAE with more live latents."
        )
    W = unit_decoder(run.sae, active)  # (a, d)
    if clustering == "graph":
        sub = graph_clusters(W, cutoff, top_k, min_size, max_size)
    else:
        k = min(n_clusters, len(active) // 2)
        sub = canonical(spectral_labels(angular_affinity(W), k, seed), min_size, max_size)
    labels = np.full(n_latents, -1, dtype=np.int32)
    labels[active] = sub
    if not (labels >= 0).any():
        raise UserError(
            f"No cluster of {min_size} to {max_size} active latents came out of the {clustering} "
            f"clustering (cosine cutoff {cutoff}, top {top_k} neighbours): too few features to "
            "cluster; lower multidim.cutoff or raise multidim.top_k."
        )
    W_dec = run.sae.W_dec.detach().float().cpu().numpy()
    scores = rank_clusters(
        codes.acts, W_dec, labels, n_components=n_components, sample_limit=sample_limit,
        score_limit=score_limit, epsilon=epsilon, max_scored=max_scored, seed=seed,
        progress=progress,
    )  # fmt: skip
    settings = dict(
        clustering=clustering, cutoff=cutoff, top_k=top_k, min_size=min_size, max_size=max_size,
        sample_limit=sample_limit, score_limit=score_limit, max_scored=max_scored,
        n_components=n_components, epsilon=epsilon, seed=seed, n_tokens=codes.n_tokens,
        separability="10 x 10 histogram, 100 angles in [0, pi/2), radius 3 RMS",
        mixture="Adam lr 0.1, 150 steps, 8 seeded starts, T from 1 to 0.01",
        score="S * (1 - M) on PCs 1-2",
        calendar_rule="among clusters firing on >= half the set's tokens, the highest lift "
        "(mean mass on the set's tokens over mean mass per held-out token)",
    )  # fmt: skip
    if clustering == "spectral":
        settings["n_clusters"] = min(n_clusters, len(active) // 2)
    findings, probe = ({}, None)
    if calendar:
        findings, probe = calendar_findings(
            run, inputs, labels, scores, W_dec, n_components, sample_limit, seed, progress
        )
    tokenizer = inputs.loaded.tokenizer
    return build_result(
        settings, labels, scores, codes.tokens, tokenizer, findings, probe, top_clusters,
        plot_points, circle_r2, seed,
    )  # fmt: skip


def cluster_transform(scores, acts_csc, W_dec, latents, c, n_components, limit, seed):
    """The PC map of cluster c: the one rank_clusters made, or the same fit made now."""
    if c not in scores.transforms:
        rows, F = cluster_tokens(acts_csc, latents, limit, np.random.default_rng([seed, int(c)]))
        if len(rows) < 3:
            return None
        scores.transforms[c] = cluster_pca(F, W_dec[latents], n_components)[2]
    return scores.transforms[c]


def calendar_findings(
    run, inputs, labels, scores, W_dec, n_components, sample_limit, seed, progress
) -> tuple[dict, dict]:
    """Per calendar set: the cluster that carries it and the circle fit of its PCs at the probe
    tokens; and the pcs-table rows of those probe tokens."""
    from scipy.stats import spearmanr

    codes = inputs.codes
    groups = members(labels)
    K, n = len(groups), len(labels)
    member = sp.csr_matrix(
        (np.ones((labels >= 0).sum()), (np.flatnonzero(labels >= 0), labels[labels >= 0])),
        shape=(n, K),
    )  # (n_latents, K) indicator
    baseline = np.asarray((codes.acts @ member).sum(0)).ravel() / codes.n_tokens  # (K,)
    pc = encode_probes(run, inputs.loaded, inputs.device, progress=progress)
    acts_csc = codes.acts.tocsc()
    findings, rows = {}, {k: [] for k in ("cluster", "set", "item", "token", "text", "pcs")}
    for name, (items, period) in SETS.items():
        here = np.flatnonzero(pc.set == name)
        c, coverage, lift = carrying_cluster((pc.acts[here] @ member).toarray(), baseline)
        found = dict(cluster=c, coverage=coverage, lift=lift, n_probe_tokens=len(here))
        transform = None if c < 0 else cluster_transform(
            scores, acts_csc, W_dec, groups[c], c, n_components, sample_limit, seed
        )  # fmt: skip
        if transform is not None:
            F = pc.acts[here][:, groups[c]].toarray()  # (P, c)
            fired = F.sum(1) > 0
            P = transform(F[fired])  # (m, k)
            index = pc.item[here][fired]
            found |= dict(
                size=len(groups[c]), features=groups[c][:50].tolist(), fired=int(fired.sum())
            )
            if period is not None and P.shape[1] >= 2 and len(np.unique(index)) >= 3:
                fit = circle_fit(P, index, period)
                found |= dict(
                    pcs=[fit["pair"][0] + 1, fit["pair"][1] + 1], r2=fit["r2"],
                    neighbour_share=fit["neighbour_share"], n_items=len(fit["items"]),
                    item_angles=dict(zip([items[i] for i in fit["items"]], fit["angles"])),
                )  # fmt: skip
            elif period is None and len(np.unique(index)) >= 3:
                rho = [abs(spearmanr(P[:, j], index)[0]) for j in range(P.shape[1])]
                found |= dict(
                    spearman_pc=int(np.nanargmax(rho)) + 1, spearman=float(np.nanmax(rho))
                )
            rows["cluster"].append(np.full(len(P), c))
            rows["set"].append(np.full(len(P), name))
            rows["item"].append(index)
            rows["token"].append(pc.token[here][fired])
            rows["text"].append(pc.text[here][fired])
            rows["pcs"].append(padded(P))
        findings[name] = found
    probe = {k: np.concatenate(v) if v else np.zeros(0) for k, v in rows.items()}
    return findings, probe


def padded(P: np.ndarray) -> np.ndarray:
    """(m, PCS) scores with NaN past the cluster's number of PCs."""
    out = np.full((len(P), PCS), np.nan)
    out[:, : P.shape[1]] = P
    return out


def build_result(
    settings, labels, scores, tokens, tokenizer, findings, probe, top_clusters, plot_points,
    circle_r2, seed,
) -> Result:  # fmt: skip
    """The summary, the clusters / scores / pcs tables and the figures of one multidim run."""
    K = len(scores.size)
    rank = np.empty(K, dtype=np.int64)
    rank[scores.order] = np.arange(K)
    top = [int(c) for c in scores.order[:top_clusters] if np.isfinite(scores.score[c])]
    groups = members(labels)
    ranked = [
        dict(
            cluster=c, size=int(scores.size[c]), n_tokens=int(scores.n_tokens[c]),
            mixture=scores.mixture[c], separability=scores.separability[c],
            score=scores.score[c], explained=scores.explained[c].tolist(),
            features=groups[c][:50].tolist(),
        )
        for c in top
    ]  # fmt: skip
    # pcs table: a seeded subset of each top cluster's sampled tokens, then the probe tokens.
    cols = {k: [] for k in ("cluster", "source", "set", "item", "token", "pcs")}
    for c in top:
        rows, P = scores.samples[c]
        pick = np.sort(np.random.default_rng([seed, c, 1]).permutation(len(rows))[:plot_points])
        for key, value in (("cluster", np.full(len(pick), c)), ("source", np.full(len(pick), "sample")),
                           ("set", np.full(len(pick), "")), ("item", np.full(len(pick), -1)),
                           ("token", tokens[rows[pick]]), ("pcs", padded(P[pick]))):  # fmt: skip
            cols[key].append(value)
    if probe is not None and len(probe["cluster"]):
        n = len(probe["cluster"])
        for key in ("cluster", "set", "item", "token", "pcs"):
            cols[key].append(probe[key])
        cols["source"].append(np.full(n, "probe"))
    cat = {
        k: np.concatenate(v) if v else np.zeros((0, PCS) if k == "pcs" else 0)
        for k, v in cols.items()
    }
    pcs = cat.pop("pcs")
    cat["token"] = cat["token"].astype(np.int64)
    pcs_table = dict(cluster=cat["cluster"].astype(np.int64), source=cat["source"].astype(str),
                     set=cat["set"].astype(str), item=cat["item"].astype(np.int64),
                     token=cat["token"], text=np.array(token_texts(tokenizer, cat["token"]), dtype=str))  # fmt: skip
    pcs_table |= {f"pc{j + 1}": pcs[:, j] for j in range(PCS)}
    score_table = dict(
        cluster=np.arange(K), size=scores.size, n_tokens=scores.n_tokens,
        mixture=scores.mixture, separability=scores.separability, score=scores.score, rank=rank,
    )  # fmt: skip
    score_table |= {f"explained{j + 1}": scores.explained[:, j] for j in range(PCS)}
    summary = dict(
        settings=settings, n_latents=len(labels), n_clustered=int((labels >= 0).sum()),
        n_clusters=K, n_scored=int(np.isfinite(scores.score).sum()),
        largest_cluster=int(scores.size.max()) if K else 0, top=ranked, calendar=findings,
    )  # fmt: skip
    figures = {}
    if top:
        figures["top_cluster"] = scatter(
            pcs_table, top[0], (0, 1), f"Cluster {top[0]}: the most irreducible"
        )
    for name, found in findings.items():
        if found.get("r2", 0) >= circle_r2:
            figures[f"circle_{name}"] = scatter(
                pcs_table, found["cluster"], tuple(p - 1 for p in found["pcs"]),
                f"{name} circle in cluster {found['cluster']} (R^2 {found['r2']:.2f})", name,
            )  # fmt: skip
    return Result(summary, dict(clusters=dict(feature=np.arange(len(labels)), cluster=labels),
                                scores=score_table, pcs=pcs_table), figures)  # fmt: skip


def token_texts(tokenizer, ids: np.ndarray) -> list[str]:
    unique, inverse = np.unique(ids, return_inverse=True)
    shown = tokenizer.batch_decode([[int(i)] for i in unique]) if len(unique) else []
    return [shown[i] for i in inverse]


def scatter(
    pcs: dict, cluster: int, pair: tuple[int, int], title: str, probe_set: str | None = None
):
    """Plotly scatter of one cluster's PC pair: its sampled tokens in grey, probe tokens by item."""
    import plotly.graph_objects as go

    p, q = (f"pc{j + 1}" for j in pair)
    mine = pcs["cluster"] == cluster
    fig = go.Figure()
    for source in ("sample", "probe"):
        on = mine & (pcs["source"] == source)
        if probe_set is not None:
            on &= (pcs["set"] == probe_set) | (pcs["source"] == "sample")
        if not on.any():
            continue
        marker = dict(size=4, color="lightgrey") if source == "sample" else dict(
            size=8, color=pcs["item"][on], colorscale="HSV", showscale=True
        )  # fmt: skip
        fig.add_trace(go.Scatter(x=pcs[p][on], y=pcs[q][on], mode="markers", name=source,
                                 marker=marker, text=pcs["text"][on], hoverinfo="text"))  # fmt: skip
    fig.update_layout(title=title, xaxis_title=p.upper(), yaxis_title=q.upper())
    return fig
