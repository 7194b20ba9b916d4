"""Side-by-side CPU timings of the TopK SAE kernels (sae/kernels/) against plain PyTorch.

    python bench/kernels.py [--reps 5] [--tokens 4096] [--threads 2] [--clock wall|cpu]

Runs on --threads threads (2) at N=4096, d=576, n=9216, k=32 in fp32 and bf16, prints a table of ms and
ratios, and writes bench/out/kernels.json. The cases run in interleaved rounds (each case once a
round), and each reports the minimum (the least disturbed round) and the median, since other
processes on a shared machine inflate single runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import clock, matmul_variants

from sae import kernels
from sae.kernels import sparse_decode, topk_encode

D_IN, N_LATENTS, K, K_AUX = 576, 9216, 32, 256


class SparsifyEncoder(torch.autograd.Function):
    """sparsify's FusedEncoder: dense pre-activations -> topk; index_add over an (N*k, d) temporary
    in backward. Weight in its native [n, d] layout. It drops AuxK's gradient, so no AuxK here."""

    @staticmethod
    def forward(ctx, x, weight, bias, k):
        values, idx = F.relu(F.linear(x, weight, bias)).topk(k, dim=1, sorted=False)
        ctx.save_for_backward(x, weight, idx)
        return values, idx

    @staticmethod
    def backward(ctx, grad_values, _grad_idx):
        x, weight, idx = ctx.saved_tensors
        flat = idx.flatten()
        dx = F.embedding_bag(idx, weight, per_sample_weights=grad_values, mode="sum")
        contributions = (grad_values[:, :, None] * x[:, None, :]).reshape(-1, x.shape[1])
        dW = torch.zeros_like(weight).index_add_(0, flat, contributions)
        db = torch.zeros_like(weight[:, 0]).index_add_(0, flat, grad_values.flatten())
        return dx, dW, db, None


def interleaved(cases: dict, reps: int, now=time.perf_counter) -> dict[str, dict[str, float]]:
    """Time every case once per round, `reps` rounds, so that a busy spell on the shared
    machine hits every case alike instead of a few cases entirely."""
    for fn in cases.values():
        fn()  # warm-up: allocator, MKL and OpenMP thread pools
    times: dict[str, list[float]] = {case: [] for case in cases}
    for _ in range(reps):
        for case, fn in cases.items():
            start = now()
            fn()
            times[case].append((now() - start) * 1e3)
    return {c: {"min_ms": min(t), "median_ms": statistics.median(t)} for c, t in times.items()}


def argsort_order(idx: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The latent order of kernels._latent_order by torch.argsort instead of numpy's radix sort."""
    flat = idx.reshape(-1)
    order = torch.argsort(flat.int(), stable=True)
    crow = torch.zeros(n + 1, dtype=torch.long)
    torch.cumsum(torch.bincount(flat, minlength=n), 0, out=crow[1:])
    return crow, order


def cases(N: int, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D_IN, generator=g).to(dtype).requires_grad_()  # centred: needs dx for b_dec
    W_enc = (torch.randn(D_IN, N_LATENTS, generator=g) / D_IN**0.5).to(dtype).requires_grad_()
    b_enc = torch.zeros(N_LATENTS, dtype=dtype, requires_grad=True)
    W_nd = W_enc.detach().t().contiguous().requires_grad_()  # sparsify's layout
    W_dec = W_enc.detach().t().contiguous().requires_grad_()
    dead_mask = torch.rand(N_LATENTS, generator=g) < 0.1
    grad_acts = torch.randn(N, K, dtype=dtype)
    grad_aux = torch.randn(N, K_AUX, dtype=dtype)
    grad_out = torch.randn(N, D_IN, dtype=dtype)
    top = topk_encode(x.detach(), W_enc.detach(), b_enc.detach(), K)
    acts = top.top_acts.detach().requires_grad_()

    def ours(chunk_size=None):
        def run():
            out = topk_encode(x, W_enc, b_enc, K, chunk_size=chunk_size)
            torch.autograd.backward(out.top_acts, grad_acts)

        return run

    def ours_auxk():
        out = topk_encode(x, W_enc, b_enc, K, dead_mask, K_AUX)
        torch.autograd.backward([out.top_acts, out.aux_acts], [grad_acts, grad_aux])

    def sparsify():
        values, _ = SparsifyEncoder.apply(x, W_nd, b_enc, K)
        torch.autograd.backward(values, grad_acts)

    def decode_ours():
        torch.autograd.backward(sparse_decode(acts, top.top_idx, W_dec), grad_out)

    def decode_embedding_bag():
        out = F.embedding_bag(top.top_idx, W_dec, per_sample_weights=acts, mode="sum")
        torch.autograd.backward(out, grad_out)

    with torch.no_grad():
        pre = torch.addmm(b_enc, x, W_enc)
    mm = matmul_variants(x.detach(), W_enc.detach())

    order = {}
    if dtype == torch.float32:  # the sort does not depend on the dtype
        small = top.top_idx[: max(1, 16384 // K)]
        for name, i in (
            (f"N*k={top.top_idx.numel()}", top.top_idx),
            (f"N*k={small.numel()}", small),
        ):
            order[f"latent order, numpy radix (ours), {name}"] = lambda i=i: kernels._latent_order(
                i, N_LATENTS
            )
            order[f"latent order, torch.argsort, {name}"] = lambda i=i: argsort_order(i, N_LATENTS)
    return {
        "matmul x @ W_enc, preallocated output": mm["out"],
        "matmul x @ W_enc, 512-token chunks": mm["chunk512"],
        "matmul x @ W_enc, fresh output": mm["alloc"],
        "topk torch (N, n)": lambda: pre.topk(K, dim=1, sorted=False),
        "topk ours two-stage (N, n)": lambda: kernels._topk(pre, K),
        "encoder ours fwd+bwd": ours(),
        **{f"encoder ours fwd+bwd chunk={c}": ours(c) for c in (256, 1024, N)},
        f"encoder ours + AuxK (10% dead, k_aux={K_AUX})": ours_auxk,
        "encoder sparsify-style fwd+bwd": sparsify,
        "decoder ours fwd+bwd": decode_ours,
        "decoder embedding_bag fwd+bwd": decode_embedding_bag,
        **order,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", default="float32,bfloat16", help="bfloat16 needs bf16 units")
    parser.add_argument("--clock", default="wall", choices=("wall", "cpu"), help="see common.clock")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "kernels.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results = {}
    for dtype in (getattr(torch, name) for name in args.dtypes.split(",")):
        name = str(dtype).removeprefix("torch.")
        results[name] = interleaved(cases(args.tokens, dtype), args.reps, clock(args.clock))
        r = results[name]
        matmul = r["matmul x @ W_enc, preallocated output"]["min_ms"]
        print(
            f"\n{name}: N={args.tokens} d={D_IN} n={N_LATENTS} k={K}, {args.threads} threads, "
            f"{args.reps} rounds, {args.clock} clock"
        )
        print(f"{'case':<52} {'min ms':>8} {'median':>8} {'/matmul':>8}")
        for case, t in r.items():
            print(
                f"{case:<52} {t['min_ms']:8.2f} {t['median_ms']:8.2f} {t['min_ms'] / matmul:8.2f}"
            )
        ratios = {
            "sparsify-style / ours (encoder)": r["encoder sparsify-style fwd+bwd"]["min_ms"]
            / r["encoder ours fwd+bwd"]["min_ms"],
            "embedding_bag / ours (decoder)": r["decoder embedding_bag fwd+bwd"]["min_ms"]
            / r["decoder ours fwd+bwd"]["min_ms"],
            "torch / two-stage (topk)": r["topk torch (N, n)"]["min_ms"]
            / r["topk ours two-stage (N, n)"]["min_ms"],
            **{
                f"argsort / radix (latent order, {c.split(', ')[-1]})": r[c]["min_ms"]
                / r[c.replace("torch.argsort", "numpy radix (ours)")]["min_ms"]
                for c in r
                if "torch.argsort" in c
            },
        }
        for label, ratio in ratios.items():
            print(f"speed-up {label:<40} {ratio:8.2f}x")
        r["speedups"] = ratios

    results["config"] = dict(
        tokens=args.tokens, d_in=D_IN, n_latents=N_LATENTS, k=K, k_aux=K_AUX,
        threads=args.threads, clock=args.clock, reps=args.reps, torch=torch.__version__, default_chunk_size=kernels.DEFAULT_CHUNK_SIZE,
    )  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
