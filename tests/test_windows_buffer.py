import torch
from conftest import TEXT

from hooks.activations import CaptureOptions, Rows, live_rows
from hooks.buffer import MixingBuffer
from hooks.text import Document
from hooks.windows import WindowSpec, holdout_split, iter_windows, shuffled


def _docs(n=12):
    words = TEXT.split()
    return [Document(i, f"d{i}", " ".join(words[i * 7 : i * 7 + 40])) for i in range(n)]


def test_windows_have_fixed_size_bos_and_traceable_provenance(tokenizer):
    docs = _docs()
    windows = list(iter_windows(docs, tokenizer, WindowSpec(context_size=16)))
    assert len(windows) > 5
    doc_tokens = {d.doc_id: tokenizer(d.text, add_special_tokens=False)["input_ids"] for d in docs}
    for w in windows:
        assert w.tokens.shape == (16,)
        assert w.tokens[0] == tokenizer.bos_token_id and w.doc[0] == -1
        for tok, doc, pos in zip(w.tokens.tolist(), w.doc.tolist(), w.pos.tolist()):
            if doc >= 0:
                assert doc_tokens[doc][pos] == tok  # every token traces back to its text
            else:
                assert tok in (tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert [w.index for w in windows] == list(range(len(windows)))
    again = list(iter_windows(docs, tokenizer, WindowSpec(context_size=16)))
    assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(windows, again))
    no_bos = next(iter_windows(docs, tokenizer, WindowSpec(context_size=16, bos="none")))
    assert no_bos.doc[0] == 0 and no_bos.pos[0] == 0


def test_shuffle_is_seeded_and_holdout_is_disjoint(tokenizer):
    windows = list(iter_windows(_docs(), tokenizer, WindowSpec(context_size=8)))
    a = [w.index for w in shuffled(windows, seed=3, buffer=8)]
    b = [w.index for w in shuffled(windows, seed=3, buffer=8)]
    c = [w.index for w in shuffled(windows, seed=4, buffer=8)]
    assert a == b and a != c and sorted(a) == list(range(len(windows)))
    docs = [Document(i, "", "x") for i in range(100)]
    train = {d.doc_id for d in holdout_split(docs, "train")}
    held = {d.doc_id for d in holdout_split(docs, "eval")}
    assert len(held) == 5 and not train & held and len(train | held) == 100


def _fake_source(n_windows=64, per_window=32, d=4):
    """Rows whose activation encodes their window, so mixing can be measured exactly."""
    for w in range(n_windows):
        window = torch.full((per_window,), w, dtype=torch.int64)
        acts = window[:, None].float().expand(per_window, d).clone()
        yield (
            w + 1,
            Rows(
                acts={"s": acts, "t": -acts},
                token=torch.arange(per_window, dtype=torch.int32),
                doc=window.int(),
                pos=torch.arange(per_window, dtype=torch.int32),
                window=window,
            ),
        )


def test_mixing_buffer_batches_mix_many_windows_and_cover_each_row_once():
    # 2048 rows = 64 windows of 32 neighbouring tokens; batches of 128 drawn from a 1024-row
    # buffer. A uniform draw of 128 rows from the >= 32 windows present hits ~31 of them on
    # average; a run of neighbours would hit 4. We demand at least 16 (half the windows held).
    buffer = MixingBuffer(_fake_source(), size=1024, batch_size=128, seed=0)
    seen = []
    for batch in buffer:
        assert len(batch) == 128
        assert torch.equal(batch.acts["t"], -batch.acts["s"])  # sites stay row-aligned
        assert torch.equal(batch.acts["s"][:, 0].long(), batch.window)
        assert batch.window.unique().numel() >= min(128, 16)
        seen.append(batch.window * 100 + batch.pos)
    seen = torch.cat(seen)
    assert seen.numel() == 2048 and seen.unique().numel() == 2048


def test_mixing_buffer_is_reproducible_and_resumes_exactly():
    def run(seed, stop=None, state=None):
        buffer = MixingBuffer(_fake_source(), size=512, batch_size=64, seed=seed)
        if state is not None:
            buffer.source = _skip(_fake_source(), state["cursor"])
            buffer.load_state_dict(state, ["s", "t"])
        out = []
        for i, batch in enumerate(buffer):
            out.append(batch.window * 100 + batch.pos)
            if stop is not None and i + 1 == stop:
                return out, buffer.state_dict()
        return out, None

    full, _ = run(0)
    again, _ = run(0)
    other, _ = run(1)
    assert all(torch.equal(a, b) for a, b in zip(full, again))
    assert not torch.equal(full[0], other[0])
    head, state = run(0, stop=7)
    tail, _ = run(0, state=state)
    assert len(head) + len(tail) == len(full)
    assert all(torch.equal(a, b) for a, b in zip(head + tail, full))


def _skip(source, n):
    for cursor, rows in source:
        if cursor > n:
            yield cursor, rows


def test_live_rows_drop_first_and_special_tokens(tiny_llama):
    docs = _docs()
    windows = list(iter_windows(docs, tiny_llama.tokenizer, WindowSpec(context_size=16)))
    rows = [r for _, r in live_rows(tiny_llama, ["resid_post.1"], iter(windows), batch_windows=4)]
    rows = Rows.cat(rows)
    specials = {tiny_llama.tokenizer.bos_token_id, tiny_llama.tokenizer.eos_token_id}
    assert not set(rows.token.tolist()) & specials
    assert (rows.pos >= 0).all() and (rows.doc >= 0).all()
    kept_all = Rows.cat(
        [
            r
            for _, r in live_rows(
                tiny_llama,
                ["resid_post.1"],
                iter(windows),
                4,
                CaptureOptions(drop_special=False, drop_first=False),
            )
        ]
    )
    assert len(kept_all) == 16 * len(windows) > len(rows)
