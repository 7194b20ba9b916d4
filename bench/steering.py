"""Steering benchmark: steered `generate` against unsteered `generate` on the same prompts.

    python bench/steering.py [--model tiny|smollm2-135m] [--prompts 4] [--max-new 32]
                             [--repeats 3] [--threads 1] [--clock wall|cpu]

Side by side in one process, in interleaved rounds (machine noise hits every variant alike), on
the same prompts and the same greedy decoding with the KV cache:
  unsteered      analysis.steering.metrics.generate with no steering
  add vector     one raw direction added at every position (what CAA does)
  add feature    one SAE latent's decoder row added
  clamp feature  one latent clamped with the error term kept: an SAE encode every forward
Reports the median over rounds of seconds per generated token, and each variant's ratio to
unsteered (target <= 1.1x).
The default model is a tiny random Llama built here (no download); `--model smollm2-135m` loads
SmolLM2-135M from the local cache. The SAE is random, `--latents` wide (16 x d), at `--site`.
Writes bench/out/steering.json. `--lf-run RUN` also times LF-Steering on the built-in set with that run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from common import ROOT, clock

sys.path.insert(0, str(ROOT))


def tiny_model(vocab: int = 512, layers: int = 4, d: int = 64):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=vocab, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=None, bos_token_id=None,
    )  # fmt: skip
    return tf.AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)


def prompts_for(args, model) -> list[torch.Tensor]:
    """(1, T) prompt ids: random ids for the tiny model, built-in corpus windows for a real one."""
    g = torch.Generator().manual_seed(0)
    if args.model == "tiny":
        return [
            torch.randint(4, model.config.vocab_size, (1, 16), generator=g)
            for _ in range(args.prompts)
        ]
    from hooks.models import load_model
    from hooks.selection import Selection

    tokenizer = load_model(args.model, progress=False).tokenizer
    stream = Selection(context_size=24).windows(tokenizer, "eval")
    return [next(stream).tokens[None, :24].long() for _ in range(args.prompts)]


def variants(model, site: str, sae) -> dict:
    """name -> Steering or None (unsteered); one intervention each."""
    from analysis.steering.interventions import Intervention, Steering

    d = sae.cfg.d_in
    direction = torch.randn(d, generator=torch.Generator().manual_seed(1))
    return {
        "unsteered": None,
        "add vector": Steering(model, site, [Intervention("add", vector=direction, value=4.0)]),
        "add feature": Steering(model, site, [Intervention("add", feature=3, value=4.0)], sae),
        "clamp feature": Steering(model, site, [Intervention("clamp", feature=3, value=4.0)], sae),
    }


def time_generate(model, prompts, steering, max_new: int, tick) -> tuple[float, int]:
    """Seconds and generated tokens for greedy generation on every prompt."""
    from analysis.steering.metrics import generate

    start, tokens = tick(), 0
    for ids in prompts:
        out = generate(model, ids, steering, max_new=max_new)
        tokens += out.shape[1] - ids.shape[1]
    return tick() - start, tokens


def lf_steering_timing(args) -> dict | None:
    """LF-Steering on the built-in paraphrase set, latent search included (target < 5 min on
    the 2-core CPU), with the trained run `--lf-run` (its model and SAE); the model's loading
    is not counted. None without --lf-run."""
    if not args.lf_run:
        return None
    import time

    from analysis.run import open_run
    from analysis.steering.lf import lf_steering
    from analysis.steering.paraphrases import builtin_groups

    run = open_run(args.lf_run)
    loaded = run.load_model(progress=False)
    start = time.perf_counter()
    result = lf_steering(
        loaded.model, loaded.tokenizer, run.sae, run.site, builtin_groups(), progress=False
    )
    seconds = time.perf_counter() - start
    return {"run": args.lf_run, "seconds": seconds, "groups": result["data"]["groups"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny", choices=["tiny", "smollm2-135m"])
    parser.add_argument("--site", default=None, help="default resid_post.1 (tiny), .14 (SmolLM2)")
    parser.add_argument("--latents", type=int, default=None, help="default 16 x d (9216 SmolLM2)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-new", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    parser.add_argument("--lf-run", help="a trained run: also time LF-Steering on it")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tick = clock(args.clock)

    from sae.config import SAEConfig
    from sae.model import SAE

    if args.model == "tiny":
        model, site = tiny_model(), args.site or "resid_post.1"
    else:
        from hooks.models import load_model

        model, site = (
            load_model(args.model, progress=False).model.eval(),
            args.site or "resid_post.14",
        )
    d = model.config.hidden_size
    args.latents = args.latents or 16 * d
    sae = SAE(SAEConfig(d_in=d, n_latents=args.latents, k=32, site=site))
    sae.reset_parameters(torch.Generator().manual_seed(0))
    sae.eval().requires_grad_(False)
    prompts = prompts_for(args, model)
    cases = variants(model, site, sae)
    for steering in cases.values():  # warm-up
        time_generate(model, prompts[:1], steering, 4, tick)
    rounds = {name: [] for name in cases}  # seconds per generated token, one a round
    tokens = {name: 0 for name in cases}
    names = list(cases)
    for r in range(args.repeats):  # each round starts at another variant: no order favours one
        for name in names[r % len(names) :] + names[: r % len(names)]:
            s, n = time_generate(model, prompts, cases[name], args.max_new, tick)
            rounds[name].append(s / max(n, 1))
            tokens[name] += n
    per_token = {name: statistics.median(rounds[name]) for name in cases}
    base = per_token["unsteered"]

    print(f"\n{args.model}, {site}, {args.threads} thread(s), {args.clock} clock, "
          f"{args.prompts} prompts x {args.max_new} new tokens, {args.repeats} interleaved rounds\n")  # fmt: skip
    print(f"{'variant':16s} {'ms/token':>9s} {'tokens':>7s} {'vs unsteered':>13s}")
    for name in cases:
        ratio = per_token[name] / base
        print(f"{name:16s} {1000 * per_token[name]:9.2f} {tokens[name]:7d} {ratio:12.3f}x")
    worst = max(per_token[n] / base for n in cases if n != "unsteered")
    print(f"\nworst steered / unsteered: {worst:.3f}x (target <= 1.1x)")
    lf = lf_steering_timing(args)
    print("LF-Steering timing: " + (json.dumps(lf) if lf else "not measured here yet"))
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "steering.json").write_text(
        json.dumps(
            {
                "model": args.model,
                "site": site,
                "threads": args.threads,
                "clock": args.clock,
                "prompts": args.prompts,
                "max_new": args.max_new,
                "repeats": args.repeats,
                "latents": args.latents,
                "seconds_per_token": per_token,
                "seconds_per_token_rounds": rounds,
                "tokens": tokens,
                "ratio_to_unsteered": {n: per_token[n] / base for n in cases},
                "lf_steering": lf,
                "torch": torch.__version__,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
