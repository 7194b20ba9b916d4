"""The feature store: everything a feature page shows, per latent, from one streaming pass.

build.py       the `analyze` pass and its checkpoints (its subcommand: saewb_cli/measure.py)
accumulate.py  FeatureAccumulator: fixed-size per-latent statistics, fed batch by batch
cooccur.py     co-occurring latents (Jaccard over token blocks)
ops.py         the vectorised helpers both use
windows.py     WindowLog: the pass's window tokens on disk
encode.py      sparse codes, logit effects, decoder neighbours, token strings
layout.py      the store's files and format
write.py       writing the store;  read.py: FeatureStore, the dashboard's reader
"""
