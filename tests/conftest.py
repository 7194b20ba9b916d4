"""Shared fixtures: tiny random models of three architectures and a tokenizer, built in-process."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

ARCHS = ("gpt2", "llama", "neox")

# Tests download nothing. huggingface_hub reads these once, at import, so they are set before
# any test imports it (a monkeypatch inside a test comes too late: a hub name would then retry
# an unreachable host for ~45 s before failing).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"


class _KilledPoolWorkers(logging.Filter):
    """dash_duo's teardown stops every thread started while it served by raising SystemExit in
    it, so an idle dashboard job worker logs 'Exception in worker' with that SystemExit at exit:
    the harness stopping it, not a failure. Any other exception in a worker is still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], SystemExit))


logging.getLogger("concurrent.futures").addFilter(_KilledPoolWorkers())


def pytest_configure(config):
    """Browser tests run headless in Debian's Chromium (dash[testing] reads these)."""
    if hasattr(config.option, "headless"):
        config.option.headless = True
    for path in ("/usr/bin/chromium", "/usr/bin/chromium-browser"):
        if os.path.exists(path):
            os.environ.setdefault("DASH_TEST_CHROMEPATH", path)
            break


TEXT = (
    "The cat sat on the mat. The dog ran in the park. Paris is the capital of France. "
    "Monday comes before Tuesday, and January before February. Numbers like 1 2 3 4 5 count up. "
) * 4


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """No test writes to the user's cache; the real-model tests opt back in explicitly."""
    monkeypatch.setenv("SAEWB_CACHE", str(tmp_path_factory.getbasetemp() / "saewb-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<bos>", "<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def _config(name: str, **fixed):
    """A config builder: (transformers, vocab, layers, width, **extra) -> config."""

    def build(tf, v, n, d, **extra):
        sizes = {key: value(v, n, d) for key, value in fixed.items() if callable(value)}
        return getattr(tf, name)(**{**fixed, **sizes, **extra})

    return build


def _variant(base: str, **extra):
    """The `base` architecture with a few settings changed."""
    return lambda tf, v, n, d: CONFIGS[base](tf, v, n, d, **extra)


# Sizes depend on (vocab, layers, width); everything else is fixed. name -> config builder.
_V, _N, _D, _D2 = (
    (lambda v, n, d: v),
    (lambda v, n, d: n),
    (lambda v, n, d: d),
    (lambda v, n, d: 2 * d),
)
_LLAMA = dict(vocab_size=_V, hidden_size=_D, intermediate_size=_D2, num_hidden_layers=_N,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
_NEOX = dict(vocab_size=_V, hidden_size=_D, intermediate_size=_D2, num_hidden_layers=_N,
             num_attention_heads=4, max_position_embeddings=256)  # fmt: skip
CONFIGS = {
    "gpt2": _config("GPT2Config", vocab_size=_V, n_positions=256, n_embd=_D, n_layer=_N, n_head=4),
    "llama": _config("LlamaConfig", **_LLAMA),
    "neox": _config("GPTNeoXConfig", **_NEOX),
    "neox-seq": _variant("neox", use_parallel_residual=False),
    "gptj": _config(
        "GPTJConfig", vocab_size=_V, n_positions=256, n_embd=_D, n_layer=_N, n_head=4, rotary_dim=4
    ),  # fmt: skip
    "opt": _config(
        "OPTConfig",
        vocab_size=_V,
        hidden_size=_D,
        ffn_dim=_D2,
        num_hidden_layers=_N,
        num_attention_heads=4,
        max_position_embeddings=256,
        word_embed_proj_dim=_D,
    ),  # fmt: skip
    "opt-postnorm": _variant("opt", do_layer_norm_before=False),
    "bloom": _config("BloomConfig", vocab_size=_V, hidden_size=_D, n_layer=_N, n_head=4),
    "bloom-postln": _variant("bloom", apply_residual_connection_post_layernorm=True),
    "falcon": _config(
        "FalconConfig", vocab_size=_V, hidden_size=_D, num_hidden_layers=_N, num_attention_heads=4
    ),  # fmt: skip
    "falcon-seq": _variant("falcon", parallel_attn=False, bias=True),
    "phi": _config("PhiConfig", **_NEOX),
    "mistral": _config("MistralConfig", **_LLAMA),
    "qwen2": _config("Qwen2Config", **_LLAMA),
    "qwen3": _config("Qwen3Config", **_LLAMA, head_dim=8),
    "gemma2": _config("Gemma2Config", **_LLAMA, head_dim=8),
    "olmo": _config("OlmoConfig", **_LLAMA),
    "olmo2": _config("Olmo2Config", **_LLAMA),
    "stablelm": _config("StableLmConfig", **_LLAMA),
}


def make_model(arch: str, vocab_size: int, n_layers: int = 4, d: int = 32):
    import transformers as tf

    torch.manual_seed(0)
    if arch not in CONFIGS:
        raise ValueError(arch)
    config = CONFIGS[arch](tf, vocab_size, n_layers, d)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    return model.requires_grad_(False)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session", params=ARCHS)
def tiny_model(request, tokenizer):
    return make_model(request.param, len(tokenizer))


@pytest.fixture(scope="session")
def tiny_llama(tokenizer):
    from hooks.models import LoadedModel

    return LoadedModel(
        name="tiny-llama", model=make_model("llama", len(tokenizer)), tokenizer=tokenizer
    )


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer):
    """A tiny Llama saved as a local HF directory, loadable by name like any user model."""
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    make_model("llama", len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def single_token(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, (text, ids)
    return ids[0]


def build_planted_run(root, tokenizer, docs: int = 1600):
    """A run whose features are known: site resid_pre.0 is the token embedding, so hand-set
    embedding coordinates make latent 0 fire 10 on ' Paris' and 6 on ' France', and latents 1 and
    2 fire 4 together on ' Monday'. Returns (run folder, {name: token id})."""
    import json

    from hooks.selection import Selection
    from sae.config import SAEConfig
    from sae.formats import save_sae
    from sae.model import SAE

    ids = {
        name: single_token(tokenizer, text)
        for name, text in (
            ("paris", " Paris"),
            ("france", " France"),
            ("monday", " Monday"),
            ("up", " dog"),
            ("down", " cat"),
        )
    }
    model = make_model("llama", len(tokenizer))
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[:, :6] = 0
        emb[ids["paris"], 0], emb[ids["france"], 0] = 11, 7
        emb[ids["monday"], 1], emb[ids["monday"], 2] = 5, 5
        head = model.get_output_embeddings().weight
        head[:, 0] = 0
        head[ids["up"], 0], head[ids["down"], 0] = 50, -50  # latent 0 promotes ' dog', not ' cat'
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    sae = SAE(SAEConfig(d_in=32, n_latents=16, k=2))
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        W_dec = torch.zeros(16, 32)
        W_dec[:, 6:] = torch.randn(16, 26, generator=g)  # unplanted rows: orthogonal to e_0..e_5
        W_dec[0], W_dec[1], W_dec[2] = torch.eye(32)[0], torch.eye(32)[1], torch.eye(32)[2]
        W_dec[3] = torch.eye(32)[1] + 0.1 * torch.eye(32)[5]  # latent 1's nearest neighbour
        sae.W_dec.copy_(W_dec / W_dec.norm(dim=1, keepdim=True))
        sae.W_enc.zero_()
        sae.W_enc[0, 0] = sae.W_enc[1, 1] = sae.W_enc[2, 2] = 1.0
        sae.b_enc.fill_(-1.0)
    save_sae(sae, root / "run")
    texts = []
    for i in range(docs):  # every 20th document is held out; every 10th of those has Paris
        city = " Paris is in France." if i % 200 == 199 else " France is big."
        texts.append(f"The cat sat on the mat.{city} Monday comes before Tuesday. The dog ran {i}.")
    (root / "text.txt").write_text("\n\n".join(texts))
    run_json = dict(model=str(root / "model"), site="resid_pre.0")
    run_json["selection"] = Selection(dataset=str(root / "text.txt"), context_size=32).to_dict()
    (root / "run" / "run.json").write_text(json.dumps(run_json))
    return root / "run", ids


def tiny_train_argv(model_dir, text, out, k: int = 4, tokens: int = 4096, log_every: int = 1):
    """`saewb train` arguments for a few seconds of live training on a tiny model."""
    return ["train", "--model", str(model_dir), "--site", "resid_post.1", "--latents", "64",
            "--k", str(k), "--tokens", str(tokens), "--batch", "512", "--dataset", str(text),
            "--context", "32", "--log-every", str(log_every), "--out", str(out),
            "--buffer-tokens", "2048"]  # fmt: skip


# -- the dashboard in a real browser (Debian's chromium and chromium-driver; .ci/run installs
# them): every dashboard test file's browser tests use these ----------------------------------

_CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
browser_only = pytest.mark.skipif(
    not (_CHROMIUM and shutil.which("chromedriver")),
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)",
)
SHOTS = Path(os.environ.get("SAEWB_SCREENSHOTS", Path(__file__).parent / "screenshots"))


def serve_in_browser(dash_duo, ws):
    """dash_duo serving the dashboard of a Workspace (or folder) at 1280 x 900."""
    from dashboard.app import create_app

    dash_duo.driver.set_window_size(1280, 900)
    dash_duo.start_server(create_app(ws))
    return dash_duo


def screenshot_path(name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    return SHOTS / f"{name}.png"


def screenshot(duo, name: str) -> None:
    duo.driver.save_screenshot(str(screenshot_path(name)))


def component_json(component) -> str:
    """A Dash component tree as the JSON the browser gets (Dash's own encoder, numpy arrays
    included), with non-ASCII text and '/' left readable, for asserting on what a page shows."""
    import json

    from dash._utils import to_json

    return json.dumps(json.loads(to_json(component)), ensure_ascii=False)


def assert_no_console_errors(duo) -> None:
    errors = [e for e in duo.get_logs() or [] if e.get("level") == "SEVERE"]
    assert errors == [], errors
