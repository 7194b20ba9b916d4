"""The SAE itself: model, fused kernels, trainer and checkpoint formats.

    from sae import load_sae, SAE
    sae = load_sae("checkpoints/l3")        # ours, SAELens's or sparsify's folder
    acts, idx = sae.encode(x)[:2]           # (N, k) each

The names below load on first use, so `import sae` stays cheap for the command line.
"""

from hooks.lazy import lazy_exports

__version__ = "0.1.0"

_LAZY = {
    "SAE": "sae.model",
    "SAEConfig": "sae.config",
    "load_sae": "sae.formats",
    "save_sae": "sae.formats",
    "export_saelens": "sae.formats",
    "export_sparsify": "sae.formats",
    "TrainConfig": "sae.train",
    "Trainer": "sae.train",
}


__getattr__ = lazy_exports("sae", _LAZY)

__all__ = ["__version__", *_LAZY]
