import pytest
import torch

from hooks.errors import UserError
from hooks.sites import Capture, list_sites, outlier_mask, resolve_site, token_mask


def _blocks(model):
    for path in ("model.layers", "transformer.h", "gpt_neox.layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is not None:
            return obj
    raise AssertionError


def _ids(model, batch=2, seq=12):
    g = torch.Generator().manual_seed(1)
    return torch.randint(4, model.config.vocab_size, (batch, seq), generator=g)


def test_resid_post_equals_hidden_states(tiny_model):
    ids = _ids(tiny_model)
    n = tiny_model.config.num_hidden_layers
    hidden = tiny_model(ids, output_hidden_states=True).hidden_states  # n + 1 entries
    for layer in range(n - 1):  # the last entry has the final norm applied by transformers
        with Capture(tiny_model, [f"resid_post.{layer}", f"resid_pre.{layer}"]) as cap:
            acts = cap(ids)
        torch.testing.assert_close(acts[f"resid_post.{layer}"], hidden[layer + 1])
        torch.testing.assert_close(acts[f"resid_pre.{layer}"], hidden[layer])


def test_early_exit_changes_no_value_and_skips_later_blocks(tiny_model):
    ids = _ids(tiny_model)
    sites = ["mlp_out.1", "mlp_in.1", "attn_out.1", "resid_post.1", "resid_pre.0"]
    with Capture(tiny_model, sites, early_exit=False) as cap:
        full = cap(ids)
    calls = [0] * len(_blocks(tiny_model))
    handles = [
        block.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, block in enumerate(_blocks(tiny_model))
    ]
    try:
        with Capture(tiny_model, sites) as cap:
            early = cap(ids)
    finally:
        for h in handles:
            h.remove()
    for site in sites:
        torch.testing.assert_close(early[site], full[site], rtol=0, atol=0)
    assert calls[:2] == [1, 1]
    assert calls[2:] == [0] * (len(calls) - 2), calls  # no block after the deepest site ran


def test_mlp_in_stops_before_the_mlp_it_feeds(tiny_model):
    """mlp_in.1 is the deepest site: block 1's MLP and every later block never run."""
    ids = _ids(tiny_model)
    mlp = resolve_site(tiny_model, "mlp_in.1").module_path
    modules = dict(tiny_model.named_modules())
    ran = []
    handles = [modules[mlp].register_forward_hook(lambda *_: ran.append("mlp.1"))]
    handles.append(_blocks(tiny_model)[2].register_forward_pre_hook(lambda *_: ran.append(2)))
    try:
        with Capture(tiny_model, ["mlp_in.1"]) as cap:
            early = cap(ids)["mlp_in.1"]
        assert ran == []
        with Capture(tiny_model, ["mlp_in.1"], early_exit=False) as cap:
            full = cap(ids)["mlp_in.1"]
        assert ran == ["mlp.1", 2]
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(early, full, rtol=0, atol=0)
    assert early.shape == ids.shape + (tiny_model.config.hidden_size,)


def test_raw_module_path_and_unknown_sites(tiny_model):
    names = list_sites(tiny_model)
    assert f"resid_post.{tiny_model.config.num_hidden_layers - 1}" in names
    path = resolve_site(tiny_model, "mlp_out.2").module_path
    assert resolve_site(tiny_model, path).depth == 2
    ids = _ids(tiny_model)
    with Capture(tiny_model, [path, "mlp_out.2"]) as cap:
        acts = cap(ids)
    torch.testing.assert_close(acts[path], acts["mlp_out.2"])
    with pytest.raises(UserError, match=r"resid_plus\.1.*valid sites are \{[a-z_|]*mlp_in"):
        resolve_site(tiny_model, "resid_plus.1")
    with pytest.raises(UserError, match=r"layers run 0\.\.3"):
        resolve_site(tiny_model, "resid_post.4")


def test_token_mask_drops_padding_specials_first_and_outliers():
    ids = torch.tensor([[1, 5, 6, 2, 7, 3], [1, 8, 9, 10, 3, 3]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    keep = token_mask(ids, attention, special_ids={1, 2, 3})
    assert keep.tolist() == [
        [False, True, True, False, True, False],
        [False, True, True, True, False, False],
    ]
    keep_first = token_mask(ids, attention, special_ids=set(), drop_first=False)
    assert keep_first[:, 0].all()
    acts = torch.ones(2, 6, 4)
    acts[0, 2] *= 50  # one huge-norm token, like an attention sink
    out = outlier_mask(acts, keep, factor=4.0)
    assert not out[0, 2] and out[0, 1] and out.sum() == keep.sum() - 1


def test_a_plain_forward_inside_the_block_runs_whole(tiny_model):
    ids = _ids(tiny_model)
    with Capture(tiny_model, ["resid_post.1"]) as cap:
        logits = tiny_model(ids).logits  # no StopForward escapes into the user's own call
        assert logits.shape[:2] == ids.shape
        torch.testing.assert_close(cap.acts["resid_post.1"], cap(ids)["resid_post.1"])


@pytest.mark.parametrize(
    "site", ["resid_pre.1", "resid_post.1", "mlp_in.1", "mlp_out.0", "attn_out.2"]
)
def test_splice_identity_changes_nothing_and_zero_changes_logits(tiny_model, site):
    from hooks.sites import Splice

    ids = _ids(tiny_model)
    clean = tiny_model(ids).logits
    with Splice(tiny_model, site, lambda x: x.clone()):
        same = tiny_model(ids).logits
    with Splice(tiny_model, site, torch.zeros_like):
        ablated = tiny_model(ids).logits
    torch.testing.assert_close(same, clean)
    assert (ablated - clean).abs().max() > 1e-4
