"""Getting hidden states out of language models: models, text, hook sites, capture, buffers, caches.

    from hooks import load_model, Capture
    loaded = load_model("smollm2-135m")
    with Capture(loaded.model, ["resid_post.3"]) as capture:
        acts = capture(input_ids)["resid_post.3"]  # (B, T, d_model)

The names below load on first use, so `import hooks` stays cheap for the command line.
"""

from hooks.errors import UserError
from hooks.lazy import lazy_exports

_LAZY = {
    "load_model": "hooks.models",
    "load_tokenizer": "hooks.models",
    "LoadedModel": "hooks.models",
    "Capture": "hooks.sites",
    "resolve_site": "hooks.sites",
    "list_sites": "hooks.sites",
    "Selection": "hooks.selection",
    "ActivationCache": "hooks.cache",
    "harvest": "hooks.cache",
    "iter_documents": "hooks.text",
}


__getattr__ = lazy_exports("hooks", _LAZY)

__all__ = ["UserError", *_LAZY]
