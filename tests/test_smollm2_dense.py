"""The built-in model's dense copy reads back as the GGUF it was made from, on this transformers.

transformers releases that misread the saved folder (4.56-4.57 ignore its `rope_parameters`, so
rope_theta falls back to 10000) load it without a warning; only the numbers show it. Building
the copy checks it against the GGUF model (transformers' GGUF reader, straight from the verified
file) and keeps that model's logits beside it; here a load is compared with them once more.
"""

import pytest
import safetensors.torch
import torch
from test_smollm2 import user_cache

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    from hooks.models import load_model, smollm2_dir

    with user_cache():
        folder = smollm2_dir(progress=False)
        return load_model("smollm2-135m", progress=False), folder


def test_dense_copy_has_smollm2s_rope_theta(dense):
    loaded = dense[0]
    config = loaded.model.config
    theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
    assert (theta or getattr(config, "rope_theta", None)) == 100000
    head_dim = config.hidden_size // config.num_attention_heads  # 64
    expect = 1.0 / 100000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    torch.testing.assert_close(loaded.model.model.rotary_emb.inv_freq.float(), expect)


@torch.no_grad()
def test_dense_copy_reproduces_the_gguf_logits(dense):
    from hooks.models import GGUF_REFERENCE, PROBE_TEXT

    loaded, folder = dense
    reference = safetensors.torch.load_file(folder / GGUF_REFERENCE)
    ids = loaded.tokenizer(PROBE_TEXT, return_tensors="pt")["input_ids"]
    assert ids.tolist() == reference["input_ids"].tolist()
    ours = loaded.model(ids).logits
    assert ours.shape == reference["logits"].shape == (1, ids.shape[1], 49152)
    torch.testing.assert_close(ours, reference["logits"], rtol=1e-4, atol=1e-4)


def test_a_folder_read_back_wrongly_is_refused(dense, monkeypatch):
    """What 4.57 did: the folder's rope_theta read as 10000. The build's check refuses it."""
    import transformers

    from hooks.errors import UserError
    from hooks.models import _check_dense_copy

    loaded, folder = dense
    real = transformers.AutoModelForCausalLM.from_pretrained

    def misread(path, **kw):
        model = real(path, **kw)
        rotary = model.model.rotary_emb
        rotary.inv_freq.copy_(1.0 / 10000 ** (torch.arange(0, 64, 2).float() / 64))
        return model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", misread)
    with pytest.raises(UserError, match="reads the saved SmolLM2 folder wrongly"):
        _check_dense_copy(loaded.model, loaded.tokenizer, folder)
