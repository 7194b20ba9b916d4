"""Steering: change a model's hidden state at a site along SAE features or raw vectors.

interventions.py  the edits (add, clamp, ablate, cap, replace) and the context manager that
                  applies them during forward and generate, KV cache included
caa.py            contrastive activation addition: a steering vector from pairs of prompts
metrics.py        generation and the scores of a steering run: KL, target shift, perplexity
steer_prompt.py   one prompt generated with and without steering, with those scores
frontier.py       effect on a target against side effect, over a sweep of strengths
paraphrases.py    paraphrase groups (the built-in set and users' jsonl) for LF-Steering
lf.py             LF-Steering: latents that make answers consistent across paraphrases
"""
