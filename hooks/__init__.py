"""Getting hidden states out of language models: models, text, hook sites, capture, buffers, caches.

    from hooks import load_model, Capture
    loaded = load_model("smollm2-135m")
    with Capture(loaded.model, ["resid_post.3"]) as capture:
        acts = capture(input_ids)["resid_post.3"]  # (B, T, d_model)

The names below load on first use, so `import hooks` stays cheap for the command line.
"""

from hooks.errors import UserError

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


def __getattr__(name: str):
    if name in _LAZY:
        module = __import__(_LAZY[name], fromlist=[name])
        return getattr(module, name)
    raise AttributeError(f"module 'hooks' has no attribute {name!r}")


__all__ = ["UserError", *_LAZY]
