"""The feature store on disk: its files, format version and example kinds.

    RUN/features/
      manifest.json     format, version, sha256 of the SAE weights it was built for, token and
                        window counts, settings (written last: no manifest, no store)
      features.parquet  one row per latent: density, mean/max activation, histogram, logit
                        effects, decoder neighbours, co-occurring latents (Jaccard, shared
                        blocks, and whether that count saw every block or is extrapolated inside
                        exact bounds), its active-block count, label, and where its examples are
                        (row group, offset, counts)
      examples.parquet  one row per example, sorted by (feature, kind, bin, rank); each row group
                        holds FEATURES_PER_GROUP latents, so one latent's examples are one small
                        row-group read
      vocab.parquet     display string of every token id
    RUN/sparsity.safetensors   SAELens-style log10(density + 1e-10), key "sparsity"

Example rows: kind 0 = top activating (rank 0 = strongest), kind 1 = interval sample (bin b of
the equal-width bins on [0, hist_max]); `tokens`/`acts` are the context window (ids and this
latent's activation per token) and `index` is the example token's place in it.
"""

FORMAT, VERSION = "saewb-features", 2
FEATURES_PER_GROUP = 32  # latents per examples.parquet row group (~2k rows at K=20 + 50)
TOP, INTERVAL = 0, 1  # example kinds
