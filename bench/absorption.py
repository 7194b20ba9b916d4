"""First-letter absorption of several runs at one site, side by side (analysis/absorption.py).

    python bench/absorption.py RUN [RUN ...] [--words 8000] [--seed 0]

Every run must be an SAE of the same model and site. The words' activations are computed once;
each run then gets the same probe, split and words. FVU and L0 come from each run's eval.json
(`saewb eval RUN` first). Prints a table; writes bench/out/absorption.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from analysis.absorption import absorption_scores, dense_codes, spelling_words, word_activations
    from analysis.run import open_run

    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="+")
    p.add_argument("--words", type=int, default=8000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(2)
    runs = [open_run(r) for r in args.runs]
    sites = {r.site for r in runs}
    if len(sites) != 1:
        raise SystemExit(f"the runs read different sites: {sorted(sites)}")
    loaded = runs[0].load_model("cpu")
    ids, words = spelling_words(loaded.tokenizer)
    pick = np.sort(np.random.default_rng(args.seed).choice(len(ids), min(args.words, len(ids)),
                                                           replace=False))  # fmt: skip
    ids, words = [ids[i] for i in pick], [words[i] for i in pick]
    site = runs[0].site
    acts = word_activations(loaded, site, ids)
    letters = np.array([ord(w[0]) - ord("a") for w in words])
    results = {}
    for run in runs:
        sae = run.sae.eval()
        scores = absorption_scores(acts, letters, dense_codes(sae, acts), sae.W_dec, args.seed)
        evaluation = run.path / "eval.json"
        metrics = json.loads(evaluation.read_text())["metrics"] if evaluation.exists() else {}
        scores |= {k: metrics.get(k) for k in ("fvu", "l0", "ce_loss_recovered")}
        scores["architecture"] = sae.cfg.architecture
        results[str(run.path)] = scores
    print(f"\n{len(words)} words at {site}; probe accuracy "
          f"{next(iter(results.values()))['probe_accuracy']:.3f}")  # fmt: skip
    print(f"{'run':<40} {'kind':<11} {'FVU':>6} {'L0':>6} {'absorption':>11} {'full':>6} "
          f"{'main':>5}")  # fmt: skip
    for path, s in results.items():
        fvu = f"{s['fvu']:.3f}" if s["fvu"] is not None else "-"
        l0 = f"{s['l0']:.1f}" if s["l0"] is not None else "-"
        print(f"{Path(path).name:<40} {s['architecture']:<11} {fvu:>6} {l0:>6} "
              f"{s['mean_absorption_fraction']:>11.3f} {s['mean_full_absorption']:>6.3f} "
              f"{s['mean_main_latents']:>5.2f}")  # fmt: skip
    out = Path(__file__).parent / "out" / "absorption.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"site": site, "words": len(words), "runs": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
