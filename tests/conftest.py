"""Shared fixtures: tiny random models of three architectures and a tokenizer, built in-process."""

from __future__ import annotations

import pytest
import torch

ARCHS = ("gpt2", "llama", "neox")

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


def make_model(arch: str, vocab_size: int, n_layers: int = 4, d: int = 32):
    import transformers as tf

    torch.manual_seed(0)
    if arch == "gpt2":
        config = tf.GPT2Config(
            vocab_size=vocab_size, n_positions=256, n_embd=d, n_layer=n_layers, n_head=4
        )
    elif arch == "llama":
        config = tf.LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=d,
            intermediate_size=2 * d,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
    elif arch == "neox":
        config = tf.GPTNeoXConfig(
            vocab_size=vocab_size,
            hidden_size=d,
            intermediate_size=2 * d,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            max_position_embeddings=256,
        )
    else:
        raise ValueError(arch)
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
