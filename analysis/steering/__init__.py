"""Steering: change a model's hidden state at a site along SAE features or raw vectors.

interventions.py  the edits (add, clamp, ablate, cap, replace) and the context manager that
                  applies them during forward and generate, KV cache included
caa.py            contrastive activation addition: a steering vector from pairs of prompts
"""
