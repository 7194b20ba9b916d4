"""The built-in model's dense copy reads back as the GGUF it was made from, on this transformers.

transformers releases that misread the saved folder (4.56-4.57 ignore its `rope_parameters`, so
rope_theta falls back to 10000) load it without a warning; only the numbers show it.
"""

import pytest
import torch
from test_smollm2 import user_cache

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is Paris. Monday comes before"


@pytest.fixture(scope="module")
def dense_and_gguf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hooks.models import load_model, smollm2_gguf

    with user_cache():
        loaded = load_model("smollm2-135m", progress=False)
        gguf = smollm2_gguf(progress=False)
    # The independent reference: transformers' own GGUF reader, straight from the verified file.
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    reference = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    return loaded, tokenizer, reference


def test_dense_copy_has_smollm2s_rope_theta(dense_and_gguf):
    loaded = dense_and_gguf[0]
    config = loaded.model.config
    theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
    assert (theta or getattr(config, "rope_theta", None)) == 100000
    head_dim = config.hidden_size // config.num_attention_heads  # 64
    expect = 1.0 / 100000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    torch.testing.assert_close(loaded.model.model.rotary_emb.inv_freq.float(), expect)


@torch.no_grad()
def test_dense_copy_reproduces_the_gguf_logits(dense_and_gguf):
    loaded, tokenizer, reference = dense_and_gguf
    ids = loaded.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    assert ids.tolist() == tokenizer(PROMPT, return_tensors="pt")["input_ids"].tolist()
    ours = loaded.model(ids).logits
    theirs = reference(ids).logits.float()
    assert ours.shape == theirs.shape == (1, ids.shape[1], 49152)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
