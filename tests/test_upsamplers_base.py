"""The lazy attention answers argmax, A @ G and rows exactly as the dense matrix would."""

import pytest
import torch

from segbook.upsamplers import BilinearUpsampler, LazyAttention, distance_attention


def _dense_attention(out_size, grid, sigma):
    H, W = out_size
    h, w = grid
    py, px = torch.meshgrid((torch.arange(H) + 0.5) * h / H, (torch.arange(W) + 0.5) * w / W,
                            indexing="ij")
    ty, tx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    d2 = (py.reshape(-1, 1) - ty.reshape(1, -1)) ** 2 + (px.reshape(-1, 1) - tx.reshape(1, -1)) ** 2
    return torch.softmax(-d2 / (2 * sigma**2), dim=1)


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_lazy_attention_matches_dense(chunk):
    A = distance_attention((24, 20), (6, 5), sigma=0.5, chunk=chunk)
    D = _dense_attention((24, 20), (6, 5), 0.5)
    assert A.shape == (480, 30)
    assert torch.allclose(A.dense(), D, atol=1e-6)
    G = torch.nn.functional.one_hot(torch.arange(30) % 4, 4).float()
    assert torch.allclose(A @ G, D @ G, atol=1e-6)
    assert torch.equal(A.argmax().reshape(-1), D.argmax(dim=1))
    assert torch.allclose(A.rows([0, 5, 479]), D[[0, 5, 479]], atol=1e-6)


@pytest.mark.parametrize("out_size,grid,sigma", [((25, 19), (6, 5), 0.3), ((7, 33), (3, 11), 1.5)])
def test_separable_attention_equals_the_direct_softmax(out_size, grid, sigma):
    # distance_attention factorises the softmax into a row part and a column part: same rows
    # as the direct softmax over all h w tokens, at sizes that do not divide
    A = distance_attention(out_size, grid, sigma=sigma, chunk=13)
    D = _dense_attention(out_size, grid, sigma)
    assert torch.allclose(A.dense(), D, atol=1e-6)
    assert torch.allclose(A.dense().sum(1), torch.ones(len(D)), atol=1e-6)


def test_argmax_is_the_token_under_the_pixel():
    # 4 x 4 pixels per token: the nearest token centre is the cell the pixel lies in.
    A = distance_attention((24, 20), (6, 5))
    expected = torch.arange(30).reshape(6, 5).repeat_interleave(4, 0).repeat_interleave(4, 1)
    assert torch.equal(A.argmax(), expected)


def test_bilinear_upsampler_and_guards():
    low = torch.randn(8, 6, 5)
    out = BilinearUpsampler()(None, low, (24, 20))
    assert out.features.shape == (8, 24, 20) and out.size == (24, 20)
    assert torch.allclose(out.attention.dense().sum(1), torch.ones(480), atol=1e-5)
    with pytest.raises(ValueError, match="n_keys=30"):
        out.attention @ torch.ones(29, 2)
    with pytest.raises(MemoryError, match="argmax"):
        out.attention.dense(limit=100)
    with pytest.raises(IndexError):
        out.attention.rows([480])
    with pytest.raises(ValueError, match="lowres"):
        BilinearUpsampler()(None, torch.randn(6, 5), (24, 20))


def test_rows_fn_called_per_chunk_only():
    calls = []

    def rows_fn(a, b):
        calls.append(b - a)
        return torch.full((b - a, 3), 1 / 3)

    A = LazyAttention(rows_fn, (10, 10), (1, 3), chunk=32)
    A.argmax()
    assert max(calls) == 32 and sum(calls) == 100
