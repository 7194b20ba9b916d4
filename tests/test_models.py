"""Loading models: a transformers below the floor is refused in one sentence."""

import pytest

from hooks.errors import UserError


@pytest.mark.parametrize("version", ["4.57.6", "4.46.0"])
def test_transformers_below_the_floor_is_refused(tiny_dir, monkeypatch, version):
    import transformers

    from hooks.models import load_model, load_tokenizer

    monkeypatch.setattr(transformers, "__version__", version)
    with pytest.raises(UserError, match=rf"transformers {version} is installed.*>= 5\.0"):
        load_model(str(tiny_dir))
    with pytest.raises(UserError, match=r">= 5\.0"):
        load_tokenizer(str(tiny_dir))
    monkeypatch.setattr(transformers, "__version__", "5.0.0")
    assert load_model(str(tiny_dir)).n_layers == 4
