"""`saewb steer`: a run's model with and without feature steering, side by side, with metrics."""

from __future__ import annotations

import argparse

from hooks.errors import UserError

MODES = ("add", "clamp", "ablate", "cap", "replace")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("steer", help="generate with SAE features turned up or down")
    p.add_argument("run", help="run directory with a trained SAE")
    p.add_argument("--prompt", required=True)
    p.add_argument(
        "--feature",
        action="append",
        required=True,
        metavar="ID:VALUE",
        help="a latent and its strength, e.g. 123:8; repeat for several",
    )
    p.add_argument("--mode", default="add", choices=MODES)
    p.add_argument("--positions", default="all", choices=["all", "prompt", "generated"])
    p.add_argument("--max-new", type=int, default=40, help="tokens to generate")
    p.add_argument("--sample", action="store_true", help="sample (seeded) instead of greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(handler=cmd_steer)


def parse_feature(text: str) -> tuple[int, float]:
    """'123:8' -> (123, 8.0); 'ablate' and the like need no value: '123' -> (123, 0.0)."""
    head, _, tail = text.partition(":")
    try:
        return int(head), float(tail) if tail else 0.0
    except ValueError:
        raise UserError(
            f"--feature must look like 123:8 (a latent id and a strength), got '{text}'."
        ) from None


def cmd_steer(args: argparse.Namespace) -> None:
    import itertools

    from analysis.run import open_run
    from analysis.steering.interventions import Intervention, Steering
    from analysis.steering.metrics import generate, next_token_kl, perplexity
    from hooks.windows import stack

    if args.max_new <= 0:
        raise UserError(f"--max-new must be a positive number of tokens, got {args.max_new}.")
    edits = [
        Intervention(args.mode, feature=f, value=v) for f, v in map(parse_feature, args.feature)
    ]
    run = open_run(args.run, device=args.device)
    loaded = run.load_model(args.device, progress=False)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"].to(args.device)  # (1, T)
    steering = Steering(model, run.site, edits, run.sae.eval(), args.positions, ids.shape[1])
    kw = dict(max_new=args.max_new, sample=args.sample, seed=args.seed)
    texts, fluency = {}, {}
    for name, steer in (("baseline", None), ("steered", steering)):
        out = generate(model, ids, steer, **kw)
        texts[name] = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        fluency[name] = perplexity(model, out, ids.shape[1])
    neutral = list(itertools.islice(run.heldout_windows(tokenizer), 4))
    kl = next_token_kl(model, stack(neutral)[0].to(args.device), steering) if neutral else None
    print(f"prompt    {args.prompt}")
    for name in texts:
        print(f"{name:9s} {texts[name].strip()}")
    print(f"perplexity (fluency, unsteered model): baseline {fluency['baseline']:.2f}, "
          f"steered {fluency['steered']:.2f}")  # fmt: skip
    print(f"KL on {len(neutral)} held-out windows: " + (f"{kl:.4f}" if kl is not None else "n/a"))
