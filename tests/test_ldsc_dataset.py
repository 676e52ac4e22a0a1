"""Dataset-level layer-distributed spectral clustering (paper 2, sections 3.3 and 4.2)."""

import numpy as np
import pytest
import torch

from segbook.errors import GraphError
from segbook.graphs.knn import dataset_knn_graph, dense_knn_graph
from segbook.groupers.ldsc_dataset import (
    DatasetSpectralClustering,
    GraphLayer,
    TokenLayer,
    TokenSource,
    build_graphs,
    coordinate_regression,
    dataset_eigenvector_images,
    dataset_loss,
    evaluate_tables,
    kmeans_feature_labels,
    planted_token_source,
    score_clusters,
    spatial_split_labels,
    table_features,
)


def planted_labels(n_images=8, size=32, n_classes=4, seed=0):
    """Two classes per image, split by a random vertical line; classes shared across images."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_images):
        a, b = rng.choice(n_classes, 2, replace=False)
        cut = 4 * int(rng.integers(size // 16, 3 * size // 16))     # on the 8 x 8 grid too
        lab = np.full((size, size), a, dtype=np.int64)
        lab[:, cut:] = b
        out.append(lab)
    return out


def small_model(**kw):
    args = dict(graph="vv", n_channels=12, batch_size=4, iterations=6, inner_steps=2,
                k_intra=6, k_inter=6, chunk=50, ema=0.5, seed=3, progress=False)
    args.update(kw)
    return DatasetSpectralClustering(**args)


def test_loss_matches_a_dense_computation(one_torch_thread):
    labels = planted_labels(3)
    src = planted_token_source(labels, grids=(8, 4), dim=8)
    graphs = build_graphs([src(i, 0) for i in range(3)], "vv", k_intra=5, k_inter=5, chunk=7)
    Z = torch.softmax(torch.randn(3, 6, 8, 8), 1)
    got = dataset_loss(Z, graphs)
    eig, ortho = [], []
    for layer in graphs:
        side = layer.grid[0]
        X = torch.nn.functional.adaptive_avg_pool2d(Z, side).permute(0, 2, 3, 1).reshape(-1, 6)
        X = X / X.norm(dim=0)
        A = layer.graph.to_dense()
        w = 8 / side
        eig.append((w * (torch.diag(X.T @ A @ X) - 1)).abs())
        G = X.T @ X
        ortho.append(w * G[~torch.eye(6, dtype=bool)] ** 2)
    want = torch.cat(eig).mean() + torch.cat(ortho).mean()
    torch.testing.assert_close(got.loss, want)


def test_sparse_matmul_gradient_matches_dense():
    x = torch.randn(40, 5)
    g = dataset_knn_graph(x, tokens_per_image=10, k_intra=3, k_inter=4, threshold=-1)
    X = torch.randn(40, 3, requires_grad=True)
    (g.matmul(X) * X).sum().backward()
    A = dense_knn_graph(x, tokens_per_image=10, k_intra=3, k_inter=4, threshold=-1)
    torch.testing.assert_close(X.grad, (A + A.T) @ X.detach(), rtol=1e-4, atol=1e-5)


def test_vv_recovers_planted_classes_and_qk_positions(one_torch_thread):
    labels = planted_labels(8)
    src = planted_token_source(labels, grids=(8, 4), dim=16, noise=0.3)
    vv = small_model(iterations=30, batch_size=8, n_channels=16, inner_steps=5, ema=0.5).fit(src)
    scores = evaluate_tables(vv.ema, labels, num_classes=4, dims=8, n_init=10)
    assert scores["greedy"].miou > 0.85 and scores["hungarian"].miou > 0.85
    qk = small_model(graph="qk", iterations=30, batch_size=8, n_channels=16, inner_steps=5,
                     ema=0.5).fit(src)
    f_vv, _ = table_features(vv.ema, 8)
    f_qk, _ = table_features(qk.ema, 8)
    # Q-K channels know where a token is; V-V channels much less
    assert coordinate_regression(f_qk)["mse"] < 0.7 * coordinate_regression(f_vv)["mse"]


def test_resume_gives_the_uninterrupted_result(tmp_path, one_torch_thread):
    src = planted_token_source(planted_labels(8), grids=(8, 4), dim=8)
    whole = small_model(iterations=6).fit(src)
    ck = tmp_path / "last.pt"
    part = small_model(iterations=6).fit(src, checkpoint=ck, stop_after=3)
    assert part.iterations == 3 and ck.exists()
    resumed = small_model(iterations=6).fit(src, checkpoint=ck)
    assert resumed.resumed_from == 3 and resumed.iterations == 6
    assert torch.equal(resumed.tables, whole.tables) and torch.equal(resumed.ema, whole.ema)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history]
    with pytest.raises(ValueError, match="other settings"):
        small_model(iterations=6, lr=0.5).fit(src, checkpoint=ck)
    fewer = planted_token_source(planted_labels(4), grids=(8, 4), dim=8)
    with pytest.raises(ValueError, match="holds 8 images"):
        small_model(iterations=6).fit(fewer, checkpoint=ck)


def test_shards_are_independent(one_torch_thread):
    src = planted_token_source(planted_labels(8), grids=(8, 4), dim=8)
    a = small_model(iterations=3).fit(src, shard=(0, 2))
    b = small_model(iterations=3).fit(src, shard=(1, 2))
    assert a.images == [0, 2, 4, 6] and b.images == [1, 3, 5, 7]
    with pytest.raises(ValueError, match="larger than a shard"):
        small_model(batch_size=5).fit(src, shard=(0, 2))


def test_bad_sources_are_clear_errors(one_torch_thread):
    src = planted_token_source(planted_labels(4), grids=(8, 4), dim=8, qk=False)
    with pytest.raises(GraphError, match="queries and keys"):
        small_model(graph="qk", iterations=1).fit(src)

    def nan_fn(i, draw):
        v = torch.randn(16, 4)
        v[3, 0] = float("nan")
        return [TokenLayer("l0", (4, 4), v)]
    with pytest.raises(GraphError, match="l0.*NaN"):
        small_model(iterations=1).fit(TokenSource(nan_fn, 4))


def test_coordinate_regression_mean_predictor_is_85_25():
    # a constant feature carries no position: least squares predicts the mean, whose
    # per-axis MSE over a 32 x 32 grid is (32^2 - 1) / 12 = 85.25 (paper 2, Table 4's scale)
    out = coordinate_regression(torch.ones(40, 1, 32, 32), seed=0)
    assert abs(out["mse"] - 85.25) < 1.5 and abs(out["mean_predictor"] - out["mse"]) < 1e-6
    grid = torch.stack(torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="xy"))
    exact = coordinate_regression(grid[None].expand(4, -1, -1, -1), seed=0)
    assert exact["mse"] < 1e-12


def test_spatial_split_labels():
    lab = np.zeros((20, 40), dtype=np.int64)
    lab[:, :10] = 1                      # class 1 on the left
    lab[2:8, 25:35] = 2                  # class 2 on the right
    lab[15:17, 30:32] = 3                # too small
    out = spatial_split_labels(lab, num_classes=4, min_size=10)
    assert set(np.unique(out)) == {-1, 1, 6}   # class 0 straddles the centre: removed
    assert np.all(out[:, :10] == 1) and np.all(out[2:8, 25:35] == 6)


def test_scores_kmeans_baseline_and_eigenvector_images():
    labels = planted_labels(6, size=8, seed=1)
    present = len(np.unique(np.stack(labels)))
    feats = [torch.nn.functional.one_hot(torch.from_numpy(lab), 4).permute(2, 0, 1).float()
             for lab in labels]
    clusters = kmeans_feature_labels(feats, present, grid=(8, 8))
    s = score_clusters(clusters, labels, 4)
    assert s["greedy"].miou == pytest.approx(1.0) and s["hungarian"].miou == pytest.approx(1.0)
    imgs = dataset_eigenvector_images(torch.randn(3, 9, 4, 4), n_triples=2)
    assert imgs.shape == (3, 2, 8, 8, 3) and imgs.min() >= 0 and imgs.max() <= 1
    for t in range(2):                   # min-max over the whole set, not per image
        assert np.isclose(imgs[:, t].min(), 0) and np.isclose(imgs[:, t].max(), 1)


def test_one_image_batches_train_on_intra_graphs(one_torch_thread):
    src = planted_token_source(planted_labels(2), grids=(8, 4), dim=8)
    fit = small_model(batch_size=1, iterations=2).fit(src)
    assert np.isfinite([h["loss"] for h in fit.history]).all()
    graphs = build_graphs([src(0, 0)], "vv", k_intra=6, k_inter=6)
    assert all(isinstance(g, GraphLayer) and g.graph.info["k_inter"] == 0 for g in graphs)
