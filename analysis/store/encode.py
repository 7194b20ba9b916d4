"""What the store computes from the SAE and the model rather than from data: the sparse code of
activations, each latent's logit effects, decoder neighbours, and the tokens' display strings."""

from __future__ import annotations

import torch
from torch import Tensor

from sae.config import THRESHOLD_KINDS


@torch.no_grad()
def encode_codes(
    sae, x: Tensor, encode_dtype: torch.dtype | None = None, W_T: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(acts, idx), each (N, K): the SAE's sparse code of raw x (N, d), K = cfg.inference_width
    (k for topk; for the other kinds up to 4k latents above their thresholds, zero-padded, so a
    token's L0 is its count of nonzero acts). A transcoder's x is its input site's activation.

    With encode_dtype=bf16 the top-k search over all latents runs in bf16 (faster where the CPU
    has bf16 matmul units) and the chosen latents' activations are then recomputed in fp32 (K dot
    products per token, not n), so the values are exact; only latents tied with the k-th place
    (or with their threshold) up to bf16 rounding can differ. W_T: W_enc transposed and
    contiguous, (n, d)."""
    enc = sae.encode(x, encode_dtype=encode_dtype)
    if encode_dtype in (None, torch.float32):
        return enc.top_acts, enc.top_idx
    idx = enc.top_idx
    # jumprelu and relu pad a token's slots with act 0 at latent 0: recomputed, a padding slot
    # would give latent 0's pre-activation, a second copy of it or a latent that never fired.
    # Their real slots are nonzero (above a threshold >= 0), so the bf16 code marks them.
    found = enc.top_acts != 0 if sae.cfg.architecture in THRESHOLD_KINDS else None  # (N, K)
    xs = x.float() * sae.input_scale  # (N, d)
    if not sae.cfg.is_transcoder:  # centred as in encode
        xs = xs - sae.b_dec
    W_T = sae.W_enc.T if W_T is None else W_T
    acts = torch.empty(idx.shape, device=x.device)
    for lo in range(0, len(x), 256):  # (256, k, d) gathered rows at a time
        rows = W_T[idx[lo : lo + 256]]
        pre = torch.bmm(rows, xs[lo : lo + 256, :, None]).squeeze(-1)
        acts[lo : lo + 256] = pre + sae.b_enc[idx[lo : lo + 256]]
    acts.relu_()
    if sae.cfg.architecture != "topk":  # the kinds that encode as JumpReLU, as in SAE.encode
        acts *= acts > sae.latent_threshold()[idx]
    if found is not None:
        acts *= found
    return acts, idx


def final_norm_gain(model: torch.nn.Module, d: int) -> tuple[Tensor, bool]:
    """(gain (d,), centred) of the final norm before the unembedding.

    Like sae_vis on TransformerLens (which folds ln_final's weight into W_U, and centres W_U for
    LayerNorm models), the logit effect of a direction v is (centre(v) * gain) @ W_U^T. The 1/rms
    scale depends on the input, so it is left out: it rescales all logits of a token alike."""
    from hooks.sites import base_model

    base = base_model(model)
    for path in ("norm", "ln_f", "final_layer_norm", "final_layernorm", "decoder.final_layer_norm"):
        module = base
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, torch.nn.Module):
            weight = getattr(module, "weight", None)
            gain = torch.ones(d) if weight is None else weight.detach().float().cpu()
            if "gemma" in type(module).__name__.lower():
                gain = 1 + gain  # Gemma's RMSNorm scales by (1 + weight)
            return gain, isinstance(module, torch.nn.LayerNorm)
    return torch.ones(d), False


@torch.no_grad()
def logit_effects(
    W_dec: Tensor, model: torch.nn.Module, top: int = 10, chunk: int = 256
) -> dict[str, Tensor] | None:
    """Top and bottom `top` tokens of W_dec[f] . W_U per latent (ids and values, each (n, top)),
    in chunks of latents so the (chunk, vocab) logits stay small. None if the site's width is
    not the model's (e.g. a raw module path inside an MLP)."""
    head = model.get_output_embeddings()
    if head is None or head.weight.shape[1] != W_dec.shape[1]:
        return None
    dirs = W_dec.detach().float()  # on the SAE's device: ~2 TFLOP at 32k latents x 49k tokens
    W_U = head.weight.detach().to(dirs.device, torch.float32)  # (V, d)
    gain, centred = final_norm_gain(model, W_dec.shape[1])
    if centred:
        dirs = dirs - dirs.mean(1, keepdim=True)
    dirs = dirs * gain.to(dirs.device)
    top = min(top, W_U.shape[0])
    out = {k: [] for k in ("top_ids", "top_values", "bottom_ids", "bottom_values")}
    for start in range(0, len(dirs), chunk):
        logits = dirs[start : start + chunk] @ W_U.T  # (chunk, V)
        hi, lo = logits.topk(top, dim=1), logits.topk(top, dim=1, largest=False)
        out["top_ids"].append(hi.indices)
        out["top_values"].append(hi.values)
        out["bottom_ids"].append(lo.indices)
        out["bottom_values"].append(lo.values)
    return {k: torch.cat(v).cpu() for k, v in out.items()}


@torch.no_grad()
def decoder_neighbours(W_dec: Tensor, top: int = 10, chunk: int = 512) -> tuple[Tensor, Tensor]:
    """(ids, cosines), each (n, top): nearest other latents by decoder cosine, in row chunks so the
    (chunk, n) similarities stay small (never the n x n matrix)."""
    W = W_dec.detach().float()
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-8)
    n = W.shape[0]
    top = min(top, n - 1)
    ids, cos = [], []
    for start in range(0, n, chunk):
        sims = W[start : start + chunk] @ W.T  # (chunk, n)
        rows = torch.arange(sims.shape[0], device=W.device)
        sims[rows, rows + start] = -torch.inf  # not yourself
        best = sims.topk(top, dim=1)
        ids.append(best.indices.cpu())
        cos.append(best.values.cpu())
    return torch.cat(ids), torch.cat(cos)


def token_strings(tokenizer, vocab_size: int) -> list[str]:
    """Display string of every token id (ids past the tokenizer's vocabulary: '<id>')."""
    known = min(len(tokenizer), vocab_size)
    strings = tokenizer.batch_decode([[i] for i in range(known)])
    return strings + [f"<{i}>" for i in range(known, vocab_size)]
