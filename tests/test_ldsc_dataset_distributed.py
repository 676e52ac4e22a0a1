"""Dataset-level spectral clustering under torchrun (gloo, 2 CPU processes) equals one process.

Each rank owns the tables of its images and builds graphs from its own mini-batches, so the
maths says two ranks give exactly the tables of two one-process runs on the two shards, and
the evaluation (Gram all-reduce, gathered K-means, all-reduced counts) equals a one-process
evaluation of the gathered tables. Checkpoints are written by rank 0 with every image.
"""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("torch.distributed")

SETUP = '''
import numpy as np, torch
from segbook.groupers.ldsc_dataset import DatasetSpectralClustering, planted_token_source
torch.set_num_threads(1)
rng = np.random.default_rng(0)
labels = []
for _ in range(8):
    a, b = rng.choice(4, 2, replace=False)
    lab = np.full((32, 32), a, dtype=np.int64); lab[:, 4 * int(rng.integers(2, 6)):] = b
    labels.append(lab)
src = planted_token_source(labels, grids=(8, 4), dim=8)
model = DatasetSpectralClustering(n_channels=10, batch_size=2, iterations=4, inner_steps=2,
                                  k_intra=5, k_inter=5, ema=0.5, seed=1, progress=False)
'''

WORKER = SETUP + '''
import os, sys, json
import torch.distributed as dist
from segbook.groupers.ldsc_dataset import evaluate_tables
dist.init_process_group("gloo")
out = sys.argv[1]
fit = model.fit(src, checkpoint=os.path.join(out, "ck.pt"))
scores = evaluate_tables(fit.ema, [labels[i] for i in fit.images], 4, dims=6, n_init=4,
                         distributed=True, images=fit.images)
torch.save({"images": fit.images, "ema": fit.ema, "tables": fit.tables,
            "greedy": scores["greedy"].miou, "hungarian": scores["hungarian"].miou},
           os.path.join(out, f"rank{dist.get_rank()}.pt"))
dist.destroy_process_group()
'''


def test_two_gloo_ranks_equal_one_process_per_shard(tmp_path, one_torch_thread):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), str(tmp_path)], capture_output=True, text=True, timeout=120, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ns = {}
    exec(SETUP, ns)
    from segbook.groupers.ldsc_dataset import evaluate_tables
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    ema_all = torch.zeros(8, 10, 8, 8)
    for r, got in enumerate(ranks):
        ref = ns["model"].fit(ns["src"], shard=(r, 2))
        assert got["images"] == ref.images
        assert torch.equal(got["tables"], ref.tables) and torch.equal(got["ema"], ref.ema)
        ema_all[ref.images] = ref.ema
    # rank 0's checkpoint holds every image, in order
    ck = torch.load(tmp_path / "ck.pt", weights_only=False)
    assert ck["iteration"] == 4 and torch.equal(ck["ema"], ema_all)
    whole = evaluate_tables(ema_all, ns["labels"], 4, dims=6, n_init=4)
    for got in ranks:
        assert got["greedy"] == pytest.approx(whole["greedy"].miou, abs=1e-9)
        assert got["hungarian"] == pytest.approx(whole["hungarian"].miou, abs=1e-9)
