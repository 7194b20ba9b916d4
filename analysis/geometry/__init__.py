"""Feature geometry of one SAE, and the comparison of two.

codes.py     the shared activation pass: sparse SAE codes of held-out tokens, cached
common.py    decoder geometry the analyses share: unit rows, angular affinity, spectral clustering
results.py   one analysis's folder on disk (summary.json, parquet tables, plotly figures)
map.py       2-D UMAP / t-SNE of the decoder directions
lobes.py     co-occurrence lobes against geometric clusters (AMI, z-score, logistic probe)
galaxy.py    the decoder covariance's eigenvalue spectrum, power-law slope, clustering entropy
crystals.py  parallelograms of word-pair differences, before and after LDA, and among features
multidim.py  multi-dimensional features: clusters, PCA, irreducibility, calendar circles
compare.py   two dictionaries: Hungarian match, SVCCA, CKA, relative representations, Procrustes
pipeline.py  `saewb geometry`: the chosen analyses into RUN/geometry/, skipping those done
"""
