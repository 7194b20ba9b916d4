"""The geometry codes pass: the cached sparse codes equal the SAE's dense encoding of the tokens."""

import numpy as np
import pytest
import torch

from analysis.geometry.codes import CODES_FILE, collect_codes
from analysis.geometry.results import Result, is_done, read_summary, read_table, write_result
from analysis.run import open_run
from hooks.errors import UserError


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory, tokenizer):
    from conftest import build_planted_run

    path, ids = build_planted_run(tmp_path_factory.mktemp("planted"), tokenizer)
    return open_run(path), ids


def test_codes_match_a_dense_encoding_and_are_cached(planted_run):
    run, ids = planted_run
    codes = collect_codes(run, 1500, batch_windows=4, progress=False)
    assert codes.n_tokens == 1500
    # Reference: the planted site is the token embedding, so the SAE's input is emb[token].
    loaded = run.load_model(progress=False)
    x = loaded.model.get_input_embeddings().weight[torch.from_numpy(codes.tokens)].detach()
    with torch.no_grad():
        enc = run.sae.encode(x)
    ref = torch.zeros(len(x), run.sae.cfg.n_latents).scatter_(1, enc.top_idx, enc.top_acts).numpy()
    np.testing.assert_allclose(codes.acts.toarray(), ref, atol=1e-5)
    assert codes.acts[np.flatnonzero(codes.tokens == ids["paris"])][:, 0].min() > 9  # planted 10
    assert (codes.offset > 0).all() and (codes.doc >= 0).all()  # position 0 and BOS dropped
    again = collect_codes(run, 1000, progress=False)  # a shorter request reads the cache
    assert (run.path / "geometry" / CODES_FILE).exists()
    assert (again.acts != codes.acts[:1000]).nnz == 0 and (
        again.tokens == codes.tokens[:1000]
    ).all()


def test_blocks_never_cross_documents(planted_run):
    codes = collect_codes(planted_run[0], 1000, progress=False)
    blocks = codes.blocks(8)
    for b in np.unique(blocks)[:50]:
        members = blocks == b
        assert len(np.unique(codes.doc[members])) == 1
        assert np.ptp(codes.pos[members] // 8) == 0
    with pytest.raises(UserError, match="--block"):
        codes.blocks(0)


def test_results_are_written_whole_and_replaced_only_when_complete(tmp_path):
    folder = tmp_path / "geometry" / "thing"
    write_result(folder, Result({"a": 1.0, "b": float("nan")}, {"t": {"x": np.arange(3)}}))
    assert is_done(folder) and read_summary(folder) == {"a": 1.0, "b": None}
    assert list(read_table(folder, "t")["x"]) == [0, 1, 2]

    class Broken:
        def to_json(self):
            raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_result(folder, Result({"a": 2.0}, figures={"f": Broken()}))
    assert read_summary(folder)["a"] == 1.0  # the finished result is still there
