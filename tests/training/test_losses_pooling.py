"""The LRFL regulariser and the text pooling, checked against direct computations."""

from __future__ import annotations

import pytest
import torch

from mavl_cli.encoders.pooling import cls_pool, mean_pool
from mavl_cli.training.losses import masked_bce_with_logits, truncated_nuclear_norm


@pytest.mark.parametrize("shape,keep", [((64, 16), 4), ((8, 32), 3), ((128, 64), 16), ((10, 10), 0)])
def test_truncated_nuclear_norm_equals_tail_of_svdvals(shape, keep):
    g = torch.Generator().manual_seed(0)
    f = torch.randn(*shape, generator=g)
    expected = torch.linalg.svdvals(f)[keep:].sum()
    assert torch.allclose(truncated_nuclear_norm(f, keep), expected, rtol=1e-5)


def test_truncated_nuclear_norm_is_not_the_top_singular_values():
    """The notebook's mistake was to penalise the *top* directions; ours leaves them free."""
    f = torch.diag(torch.tensor([10.0, 5.0, 0.1, 0.01]))
    assert truncated_nuclear_norm(f, 2).item() == pytest.approx(0.11, rel=1e-5)
    assert truncated_nuclear_norm(f, 4).item() == 0.0


def test_truncated_nuclear_norm_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(12, 6, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: truncated_nuclear_norm(x, 2), (f,))


def test_regulariser_lowers_the_rank_when_minimised():
    g = torch.Generator().manual_seed(2)
    f = torch.randn(32, 8, generator=g, requires_grad=True)
    opt = torch.optim.SGD([f], lr=0.05)
    before = torch.linalg.svdvals(f.detach())
    for _ in range(200):
        opt.zero_grad()
        truncated_nuclear_norm(f, 2).backward()
        opt.step()
    after = torch.linalg.svdvals(f.detach())
    assert after[2:].sum() < 0.2 * before[2:].sum()
    assert after[:2].sum() > 0.8 * before[:2].sum()  # the kept directions survive


def test_masked_bce_ignores_masked_entries():
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    m = torch.tensor([[True, False], [True, True]])
    full = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
    assert masked_bce_with_logits(logits, y, m).item() == pytest.approx(full[m].mean().item())
    y2 = y.clone()
    y2[0, 1] = 1.0  # changing a masked target changes nothing
    assert masked_bce_with_logits(logits, y2, m).item() == pytest.approx(full[m].mean().item())


def test_mean_pool_equals_manual_masked_mean():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(3, 5, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    out = mean_pool(h, mask)
    for i in range(3):
        n = int(mask[i].sum())
        assert torch.allclose(out[i], h[i, :n].mean(0), atol=1e-6)
    assert torch.equal(cls_pool(h, mask), h[:, 0])


def test_padding_never_changes_a_sentence_embedding(tiny_bert):
    """A short sentence embeds the same alone and padded next to a long one."""
    from mavl_cli.encoders.hf_text import encode_texts, load_text_encoder

    tok, model = load_text_encoder(str(tiny_bert))
    short = "fluid in the pleural space"
    long = "the heart is enlarged with a cardiothoracic ratio above one half and bilateral perihilar haze"
    alone = encode_texts([short], tok, model, mean_pool).vectors
    padded = encode_texts([short, long], tok, model, mean_pool).vectors
    assert torch.allclose(torch.from_numpy(alone[0]), torch.from_numpy(padded[0]), atol=1e-5)
