"""Architecture-independent hook sites and capture with early exit.

Site names are the same on every model:
  resid_pre.L   input of block L            (the residual stream before the block)
  resid_post.L  output of block L           (equals output_hidden_states[L+1], except for the
                                              last block, where transformers applies the final norm)
  mlp_out.L     output of block L's MLP
  attn_out.L    output of block L's attention
A raw module path from `model.named_modules()` (e.g. `model.layers.6.mlp`) works too.

Capture raises `StopForward` from the deepest requested site, so later blocks never run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from hooks.errors import UserError

SITE_KINDS = ("resid_pre", "resid_post", "mlp_out", "attn_out")
_SITE_RE = re.compile(r"^(resid_pre|resid_post|mlp_out|attn_out)\.(\d+)$")

# Where each family keeps its blocks, and each block its attention and MLP.
_LAYOUTS = (
    # (path of the block list, attention attribute, mlp attribute)
    ("model.layers", "self_attn", "mlp"),  # Llama, SmolLM2, Qwen2, Mistral, Gemma, Phi-3 ...
    ("transformer.h", "attn", "mlp"),  # GPT-2, GPT-J
    ("gpt_neox.layers", "attention", "mlp"),  # GPT-NeoX, Pythia
    ("model.decoder.layers", "self_attn", "fc2"),  # OPT
)


class StopForward(Exception):
    """Raised by the deepest hook: everything after it is wasted work."""


@dataclass(frozen=True)
class Site:
    name: str  # what the user asked for
    module_path: str  # the module whose output (or input, for resid_pre) is recorded
    use_input: bool  # resid_pre reads the block's input
    depth: int  # block index that must run; -1 for a module outside the blocks (no early exit)


def _blocks(model: nn.Module) -> tuple[str, nn.ModuleList, str, str]:
    for path, attn, mlp in _LAYOUTS:
        module = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList):
            return path, module, attn, mlp
    raise UserError(
        f"Model class {type(model).__name__} has no known block list; named sites work for the "
        "Llama family, GPT-2, GPT-NeoX and OPT, and raw module paths work for any model."
    )


def list_sites(model: nn.Module) -> list[str]:
    _, blocks, _, _ = _blocks(model)
    return [f"{kind}.{i}" for i in range(len(blocks)) for kind in SITE_KINDS]


def resolve_site(model: nn.Module, name: str) -> Site:
    """Map a site name (or raw module path) to the module to hook; unknown names list valid ones."""
    match = _SITE_RE.match(name)
    modules = dict(model.named_modules())
    if match:
        kind, layer = match.group(1), int(match.group(2))
        path, blocks, attn, mlp = _blocks(model)
        if layer >= len(blocks):
            raise UserError(
                f"Unknown site '{name}': this model has {len(blocks)} blocks, so layers run "
                f"0..{len(blocks) - 1} (e.g. {kind}.{len(blocks) - 1})."
            )
        block = f"{path}.{layer}"
        if kind in ("resid_pre", "resid_post"):
            return Site(name, block, kind == "resid_pre", layer)
        return Site(name, f"{block}.{attn if kind == 'attn_out' else mlp}", False, layer)
    if name in modules and name:
        return Site(name, name, False, _depth_of(model, name))
    try:
        valid = list_sites(model)
        hint = f"{', '.join(valid[:4])} ... {valid[-1]}"
    except UserError:
        hint = "a module path from model.named_modules()"
    raise UserError(
        f"Unknown site '{name}'; valid sites are {{{'|'.join(SITE_KINDS)}}}.L such as {hint}, "
        "or a raw module path such as 'model.layers.0.mlp' (see `saewb sites --model M`)."
    )


def _depth_of(model: nn.Module, module_path: str) -> int:
    try:
        path, _, _, _ = _blocks(model)
    except UserError:
        return -1
    match = re.match(re.escape(path) + r"\.(\d+)(\.|$)", module_path)
    return int(match.group(1)) if match else -1


def _first_tensor(value) -> torch.Tensor:
    """Blocks return a tensor or a tuple whose first item is the hidden state."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, tuple | list) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise UserError(
        f"The hooked module returned {type(value).__name__}, not a hidden-state tensor."
    )


def base_model(model: nn.Module) -> nn.Module:
    """The transformer without its LM head: capture never needs logits."""
    return getattr(model, "base_model", model)


class Capture:
    """Record several sites in one forward pass, stopping after the deepest one.

    with Capture(model, ["resid_post.3", "mlp_out.2"]) as capture:
        acts = capture(input_ids, attention_mask)   # {site: (B, T, d)}
    """

    def __init__(self, model: nn.Module, sites: list[str], early_exit: bool = True):
        if not sites:
            raise UserError("No site was given; pass at least one, e.g. resid_post.3.")
        self.model = model
        self.sites = [resolve_site(model, s) for s in dict.fromkeys(sites)]
        # A site outside the block list (e.g. the final norm) needs the whole forward.
        self.early_exit = early_exit and all(s.depth >= 0 for s in self.sites)
        self.acts: dict[str, torch.Tensor] = {}
        self._handles: list = []
        self._stopping = False  # only our own forward stops early; a user's model(...) runs whole

    def __enter__(self) -> Capture:
        modules = dict(self.model.named_modules())
        for site in self.sites:
            module = modules[site.module_path]
            if site.use_input:
                handle = module.register_forward_pre_hook(self._pre_hook(site), with_kwargs=True)
            else:
                handle = module.register_forward_hook(self._post_hook(site))
            self._handles.append(handle)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _record(self, site: Site, value: torch.Tensor) -> None:
        self.acts[site.name] = value.detach()
        if self._stopping and len(self.acts) == len(self.sites):
            raise StopForward

    def _pre_hook(self, site: Site):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self._record(site, hidden)

        return hook

    def _post_hook(self, site: Site):
        def hook(module, args, output):
            self._record(site, _first_tensor(output))

        return hook

    @torch.no_grad()
    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Run the model on (B, T) ids; returns {site: (B, T, d)}."""
        if not self._handles:
            raise RuntimeError("Capture must be used inside its `with` block.")
        self.acts = {}
        self._stopping = self.early_exit
        try:
            base_model(self.model)(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            )
        except StopForward:
            pass
        finally:
            self._stopping = False
        missing = [s.name for s in self.sites if s.name not in self.acts]
        if missing:
            raise RuntimeError(f"Sites {missing} were never reached in the forward pass.")
        return {s.name: self.acts[s.name] for s in self.sites}


def token_mask(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    special_ids: set[int] | frozenset[int] = frozenset(),
    drop_first: bool = True,
) -> torch.Tensor:
    """Which (B, T) positions to keep: no padding, no special tokens, and by default not position 0.

    Position 0 is an attention sink in SmolLM2 (residual norm ~8x the rest at layer 3, whatever
    its token), so it is excluded from SAE data and statistics unless asked for.
    """
    keep = torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask is not None:
        keep &= attention_mask.bool()
    if special_ids:
        keep &= ~torch.isin(input_ids, torch.tensor(sorted(special_ids), device=input_ids.device))
    if drop_first:
        keep[:, 0] = False
    return keep


def outlier_mask(acts: torch.Tensor, keep: torch.Tensor, factor: float) -> torch.Tensor:
    """Also drop tokens whose norm exceeds factor x the median norm of the kept tokens."""
    norms = acts.float().norm(dim=-1)  # (B, T)
    if keep.any():
        limit = factor * norms[keep].median()
        keep = keep & (norms <= limit)
    return keep


def special_token_ids(tokenizer) -> frozenset[int]:
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    return frozenset(i for i in ids if i is not None)


class Splice:
    """Replace a site's activation with fn(activation) during every forward inside the block.

        with Splice(model, "resid_post.3", lambda x: sae_reconstruction(x)):
            logits = model(ids).logits

    fn gets and returns a (B, T, d) tensor. Used for spliced evaluation and steering.
    """

    def __init__(self, model: nn.Module, site: str, fn):
        self.model, self.site, self.fn = model, resolve_site(model, site), fn
        self._handle = None

    def __enter__(self) -> Splice:
        module = dict(self.model.named_modules())[self.site.module_path]
        if self.site.use_input:
            self._handle = module.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        else:
            self._handle = module.register_forward_hook(self._post_hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def _pre_hook(self, module, args, kwargs):
        if args:
            return (self.fn(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self.fn(kwargs["hidden_states"])}

    def _post_hook(self, module, args, output):
        if isinstance(output, torch.Tensor):
            return self.fn(output)
        return (self.fn(output[0]), *output[1:])
