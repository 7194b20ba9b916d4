"""Getting hidden states out of language models: models, text, hook sites, capture, buffers, caches."""

from hooks.errors import UserError

__all__ = ["UserError"]
