"""Architecture-independent hook sites and capture with early exit.

Site names are the same on every model:
  resid_pre.L   input of block L            (the residual stream before the block)
  resid_post.L  output of block L           (equals output_hidden_states[L+1], except for the
                                              last block, where transformers applies the final norm)
  mlp_in.L      input of block L's MLP      (after its norm: the MLP module's first input, which
                                              a transcoder reads to predict mlp_out.L)
  mlp_out.L     output of block L's MLP
  attn_out.L    output of block L's attention
attn_out.L and mlp_out.L are what each branch adds to the residual stream (after Gemma 2's
post-norms, without Bloom's in-module residual add), so in every block that has that form
resid_pre.L + attn_out.L + mlp_out.L == resid_post.L, parallel-attention blocks included; where
the residual stream is not built that way (OPT-350m's norm after the add), they are refused.
mlp_in.L is the input of the MLP module itself (Gemma 2's `mlp`, after pre_feedforward_layernorm,
not its post-norm; OPT's fc1, on (B*T, d) rows reshaped to (B, T, d); in parallel-attention
blocks the normed input that attention shares), so it resolves wherever such a module is found,
post-norm blocks included. TransformerLens's names (blocks.L.hook_resid_pre, hook_resid_post,
hook_attn_out, hook_mlp_out, ln2.hook_normalized) are aliases.
A raw module path from `model.named_modules()` (e.g. `model.layers.6.mlp`) works too.

Capture raises `StopForward` from the deepest requested site, so later blocks never run.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

import torch
from torch import nn

from hooks.errors import UserError

SITE_KINDS = ("resid_pre", "resid_post", "mlp_in", "mlp_out", "attn_out")
_SITE_RE = re.compile(rf"^({'|'.join(SITE_KINDS)})\.(\d+)$")
# TransformerLens hook names, which most SAELens pretrained SAEs record as their `hook_name`
# (SAELens transcoders: blocks.L.ln2.hook_normalized in, blocks.L.hook_mlp_out out), -> our kind.
# ln2.hook_normalized is the same place as mlp_in, but TransformerLens records it before the
# norm's weight and bias (from_pretrained folds them into the MLP), so the two agree only where
# those are 1 and 0. hook_resid_mid and hook_mlp_in (the residual before ln2) have no
# counterpart and are refused.
_TL_KINDS = {
    "hook_resid_pre": "resid_pre",
    "hook_resid_post": "resid_post",
    "ln2.hook_normalized": "mlp_in",
    "hook_mlp_out": "mlp_out",
    "hook_attn_out": "attn_out",
    "hook_resid_mid": None,
    "hook_mlp_in": None,
}
_TL_RE = re.compile(rf"^blocks\.(\d+)\.({'|'.join(map(re.escape, _TL_KINDS))})$")

# Block children that hold the attention and the MLP, in the names transformers uses.
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward")
# Config flags under which a block's attention and MLP outputs do not add up to
# resid_post - resid_pre: (attribute, the value that says so).
_NOT_ADDITIVE_FLAGS = (
    ("do_layer_norm_before", False),  # OPT-350m: the norm comes after each residual add
    ("apply_residual_connection_post_layernorm", True),  # Bloom: the residual is the normed input
)


class StopForward(Exception):
    """Raised by the deepest hook: everything after it is wasted work."""


@dataclass(frozen=True)
class Site:
    name: str  # canonical name: resid_post.3 for blocks.3.hook_resid_post; a raw path as given
    module_path: str  # the module whose output (or input, for resid_pre/mlp_in) is recorded
    use_input: bool  # resid_pre and mlp_in read the module's first input, not its output
    depth: int  # block index that must run; -1 for a module outside the blocks (no early exit)
    minus_arg: str | None = None  # forward argument the module adds to its own output (Bloom)
    rows_of: str | None = None  # block whose (B, T, d) input shape the module's (B*T, d) rows take


@dataclass(frozen=True)
class Layout:
    """Where a model keeps its blocks, and which block children write into the residual."""

    blocks: str  # path of the block list from the model's root
    n_blocks: int
    attn: str | None  # block child whose output is attention's residual contribution
    mlp: str | None  # block child whose output is the MLP's residual contribution
    mlp_in: str | None  # block child whose first input is the MLP's input (the MLP itself, fc1)
    mlp_rows: bool  # the MLP sees tokens flattened to (B*T, d) rows (OPT)
    not_additive: str | None  # why attn_out + mlp_out is not the residual update, if it is not


def canonical_site(name: str) -> str:
    """Our name for a TransformerLens hook name (blocks.3.hook_resid_post -> resid_post.3).

    Every other name (our sites, raw module paths such as model.layers.3) comes back unchanged;
    blocks.L.hook_resid_mid and hook_mlp_in too, which resolve_site refuses with its own sentence.
    """
    match = _TL_RE.match(name)
    kind = _TL_KINDS[match.group(2)] if match else None
    return name if kind is None else f"{kind}.{match.group(1)}"


def _n_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    n = getattr(config, "num_hidden_layers", None)
    return int(n) if isinstance(n, int) else None


def layout(model: nn.Module) -> Layout:
    """Find the block list and, in its first block, the attention and MLP children.

    The block list is the shallowest nn.ModuleList of identical modules, one per layer in the
    config; raw module paths need none of this and work for any model.
    """
    n = _n_layers(model)
    found = [
        (path.count("."), path, m)
        for path, m in model.named_modules()
        if isinstance(m, nn.ModuleList)
        and len(m) > 0
        and (n is None or len(m) == n)
        and len({type(b) for b in m}) == 1
    ]
    if not found:
        raise UserError(
            f"Model class {type(model).__name__} has no block list saewb recognises (an "
            "nn.ModuleList with one module per layer), so named sites such as resid_post.0 do "
            "not resolve; pass a raw module path from model.named_modules() instead."
        )
    _, path, blocks = min(found, key=lambda f: f[0])
    children = dict(blocks[0].named_children())
    attn = next((c for c in _ATTN_NAMES if c in children), None)
    mlp = mlp_in = next((c for c in _MLP_NAMES if c in children), None)
    mlp_rows = mlp is None and "fc1" in children and "fc2" in children
    if mlp_rows:  # OPT keeps its MLP in the block and runs it on (B*T, d) rows
        mlp_in, mlp = "fc1", "fc2"
    if "post_feedforward_layernorm" in children and "post_attention_layernorm" in children:
        # Gemma 2/3 and OLMo 2 norm each branch before it joins the residual.
        attn, mlp = "post_attention_layernorm", "post_feedforward_layernorm"
    config = getattr(model, "config", None)
    not_additive = next(
        (
            f"{flag}={value}"
            for flag, value in _NOT_ADDITIVE_FLAGS
            if getattr(config, flag, not value) is value
        ),
        None,
    )
    return Layout(path, len(blocks), attn, mlp, mlp_in, mlp_rows, not_additive)


def list_sites(model: nn.Module) -> list[str]:
    """Every named site this model resolves: attn_out/mlp_out only where they are residual
    updates, mlp_in wherever the blocks have an MLP module."""
    lay = layout(model)
    return [f"{kind}.{i}" for i in range(lay.n_blocks) for kind in _kinds(lay)]


def _kinds(lay: Layout) -> list[str]:
    """The site kinds that resolve on every block of a model with this layout."""
    branches = lay.not_additive is None
    return [
        k
        for k in SITE_KINDS
        if k.startswith("resid") or (_child(lay, k) is not None and (branches or k == "mlp_in"))
    ]


def _child(lay: Layout, kind: str) -> str | None:
    return {"attn_out": lay.attn, "mlp_in": lay.mlp_in}.get(kind, lay.mlp)


def resolve_site(model: nn.Module, name: str) -> Site:
    """Map a site name, TransformerLens hook name or raw module path to the module to hook."""
    name = canonical_site(name)
    if _TL_RE.match(name):  # only blocks.L.hook_resid_mid and hook_mlp_in are left
        raise UserError(
            f"Site '{name}' (TransformerLens's residual between attention and MLP, before ln2) "
            "has no saewb counterpart; use resid_pre.L, attn_out.L, mlp_in.L (the MLP's input "
            "after its norm), mlp_out.L or resid_post.L (blocks.L.hook_resid_pre/attn_out, "
            "blocks.L.ln2.hook_normalized, blocks.L.hook_mlp_out/resid_post)."
        )
    match = _SITE_RE.match(name)
    modules = dict(model.named_modules())
    if match:
        kind, layer = match.group(1), int(match.group(2))
        lay = layout(model)
        if layer >= lay.n_blocks:
            raise UserError(
                f"Unknown site '{name}': this model has {lay.n_blocks} blocks, so layers run "
                f"0..{lay.n_blocks - 1} (e.g. {kind}.{lay.n_blocks - 1})."
            )
        block = f"{lay.blocks}.{layer}"
        if kind in ("resid_pre", "resid_post"):
            return Site(name, block, kind == "resid_pre", layer)
        cls = type(model).__name__
        if kind == "mlp_in":
            return _mlp_in_site(name, layer, lay, block, modules, cls)
        child = _child(lay, kind)
        if child is None or f"{block}.{child}" not in modules:
            raise UserError(
                f"Site '{name}' does not resolve on {cls}: its blocks have no "
                f"{kind[:-4]} module saewb recognises (children: "
                f"{', '.join(dict(modules[block].named_children()))}); pass a raw module path "
                f"such as '{block}.<child>' instead."
            )
        if lay.not_additive is not None:
            raise UserError(
                f"Site '{name}' is refused on {cls} with {lay.not_additive}, where attention "
                "and MLP outputs do not add up to the residual update; pass the raw module path "
                f"'{block}.{child}' to read the module's output anyway."
            )
        module = modules[f"{block}.{child}"]
        # Bloom's attention and MLP take the residual and return residual + their own output.
        minus = "residual" if "residual" in inspect.signature(module.forward).parameters else None
        rows_of = block if kind == "mlp_out" and lay.mlp_rows else None
        return Site(name, f"{block}.{child}", False, layer, minus, rows_of)
    if name in modules and name:
        return Site(name, name, False, _depth_of(model, name))
    try:
        valid = list_sites(model)
        hint = f"{', '.join(valid[:4])} ... {valid[-1]}"
    except UserError:
        hint = "a module path from model.named_modules()"
    raise UserError(
        f"Unknown site '{name}'; valid sites are {{{'|'.join(SITE_KINDS)}}}.L such as {hint} "
        "(or TransformerLens's blocks.L.hook_resid_post etc.), or a raw module path such as "
        "'model.layers.0.mlp' (see `saewb sites --model M`)."
    )


def _mlp_in_site(name: str, layer: int, lay: Layout, block: str, modules: dict, cls: str) -> Site:
    """mlp_in.L: the first input of the MLP module, on (B*T, d) rows where the MLP sees rows."""
    if lay.mlp_in is None or f"{block}.{lay.mlp_in}" not in modules:
        raise UserError(
            f"Site '{name}' does not resolve on {cls}: its blocks have no MLP module saewb "
            f"recognises (a child named {' or '.join(_MLP_NAMES)}, or fc1 and fc2; children: "
            f"{', '.join(dict(modules[block].named_children()))}), so it has no MLP input; "
            f"valid sites here are {{{'|'.join(_kinds(lay))}}}.L, or a raw module path, which "
            "reads that module's output."
        )
    rows_of = block if lay.mlp_rows else None
    return Site(name, f"{block}.{lay.mlp_in}", True, layer, None, rows_of)


def _depth_of(model: nn.Module, module_path: str) -> int:
    try:
        path = layout(model).blocks
    except UserError:
        return -1
    match = re.match(re.escape(path) + r"\.(\d+)(\.|$)", module_path)
    return int(match.group(1)) if match else -1


def _first_input(module: nn.Module, args: tuple, kwargs: dict) -> tuple[str | None, torch.Tensor]:
    """A module's hidden-state input and, when it came by keyword, that keyword's name."""
    if args:
        return None, args[0]
    if "hidden_states" in kwargs:
        return "hidden_states", kwargs["hidden_states"]
    name = next(iter(inspect.signature(module.forward).parameters))  # e.g. an MLP's `x`
    return name, kwargs[name]


def _shape_hook(store: dict, key: str):
    """A pre-hook that remembers the (B, T, d) shape of a block's hidden-state input."""

    def hook(module, args, kwargs):
        store[key] = (args[0] if args else kwargs["hidden_states"]).shape

    return hook


def _argument(module: nn.Module, args: tuple, kwargs: dict, name: str) -> torch.Tensor:
    """The value a module's forward got for parameter `name`, passed by position or keyword."""
    return inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments[name]


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
        self.requested = list(dict.fromkeys(sites))
        resolved = [resolve_site(model, s) for s in self.requested]
        self._canonical = {asked: site.name for asked, site in zip(self.requested, resolved)}
        self.sites = list({site.name: site for site in resolved}.values())  # aliases hook once
        # A site outside the block list (e.g. the final norm) needs the whole forward.
        self.early_exit = early_exit and all(s.depth >= 0 for s in self.sites)
        self.acts: dict[str, torch.Tensor] = {}
        self._handles: list = []
        self._stopping = False  # only our own forward stops early; a user's model(...) runs whole
        self._shapes: dict[str, torch.Size] = {}  # block input shapes, for sites that see rows

    def __enter__(self) -> Capture:
        modules = dict(self.model.named_modules())
        for site in self.sites:
            module = modules[site.module_path]
            if site.rows_of is not None:
                hook = _shape_hook(self._shapes, site.rows_of)
                self._handles.append(
                    modules[site.rows_of].register_forward_pre_hook(hook, with_kwargs=True)
                )
            if site.use_input:
                handle = module.register_forward_pre_hook(self._pre_hook(site), with_kwargs=True)
            else:
                handle = module.register_forward_hook(self._post_hook(site), with_kwargs=True)
            self._handles.append(handle)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _record(self, site: Site, value: torch.Tensor) -> None:
        # A copy: some blocks add into a branch's output in place (Falcon's mlp_output += attn).
        self.acts[site.name] = value.detach().clone()
        if self._stopping and len(self.acts) == len(self.sites):
            raise StopForward

    def _pre_hook(self, site: Site):
        def hook(module, args, kwargs):
            _, hidden = _first_input(module, args, kwargs)
            if site.rows_of is not None:
                hidden = hidden.reshape(self._shapes[site.rows_of])  # (B*T, d) -> (B, T, d)
            self._record(site, hidden)

        return hook

    def _post_hook(self, site: Site):
        def hook(module, args, kwargs, output):
            value = _first_tensor(output)
            if site.minus_arg is not None:
                value = value - _argument(module, args, kwargs, site.minus_arg)
            if site.rows_of is not None:
                value = value.view(self._shapes[site.rows_of])  # (B*T, d) -> (B, T, d)
            self._record(site, value)

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
        return {asked: self.acts[self._canonical[asked]] for asked in self.requested}


def token_mask(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    special_ids: set[int] | frozenset[int] = frozenset(),
    drop_first: bool = True,
) -> torch.Tensor:
    """Which (B, T) positions to keep: no padding, no special tokens, and by default not position 0.

    Position 0 is an attention sink in SmolLM2 (residual norm about 9x the rest at layer 3,
    whatever its token; bench/harvest.py), so it is excluded from SAE data unless asked for.
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

    fn gets and returns a (B, T, d) tensor. Used for spliced evaluation and steering. `site` may
    be a resolved Site, so that a loop of splices inspects the model once.
    """

    def __init__(self, model: nn.Module, site: str | Site, fn):
        self.model, self.fn = model, fn
        self.site = site if isinstance(site, Site) else resolve_site(model, site)
        self._handles: list = []
        self._shapes: dict[str, torch.Size] = {}

    def __enter__(self) -> Splice:
        modules = dict(self.model.named_modules())
        module = modules[self.site.module_path]
        if self.site.rows_of is not None:
            hook = _shape_hook(self._shapes, self.site.rows_of)
            block = modules[self.site.rows_of]
            self._handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
        if self.site.use_input:
            handle = module.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        else:
            handle = module.register_forward_hook(self._post_hook, with_kwargs=True)
        self._handles.append(handle)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _fn(self):
        """self.fn on what the module sees: (B, T, d), or (B*T, d) rows viewed as (B, T, d)."""
        if self.site.rows_of is None:
            return self.fn
        shape = self._shapes[self.site.rows_of]
        return lambda rows: self.fn(rows.reshape(shape)).reshape(rows.shape)

    def _pre_hook(self, module, args, kwargs):
        keyword, hidden = _first_input(module, args, kwargs)
        value = self._fn()(hidden)
        if keyword is None:
            return (value, *args[1:]), kwargs
        return args, {**kwargs, keyword: value}

    def _post_hook(self, module, args, kwargs, output):
        value = _first_tensor(output)
        fn = self._fn()
        if self.site.minus_arg is not None:  # the module adds the residual itself: splice its part
            residual = _argument(module, args, kwargs, self.site.minus_arg)
            value = residual + fn(value - residual)
        else:
            value = fn(value)
        if isinstance(output, torch.Tensor):
            return value
        return (value, *output[1:])
