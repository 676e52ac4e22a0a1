"""evaluate(distributed=True) under torchrun (gloo, 2 CPU processes) equals one process."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")

WORKER = '''
import json, os, sys
import numpy as np
import torch.distributed as dist
from segbook.eval import evaluate

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
rng = np.random.default_rng(0)
gts = [rng.integers(-1, 4, (12, 10)) for _ in range(7)]
preds = [rng.integers(0, 6, (12, 10)) for _ in range(7)]
out = {}
for protocol in ["dataset", "dataset_majority", "per_image", "per_image_mean",
                 "oracle_merged", "cliou"]:
    shard = evaluate(preds[rank::world], gts[rank::world], protocol, 4, distributed=True)
    whole = evaluate(preds, gts, protocol, 4)
    out[protocol] = {
        name: [np.asarray(getattr(s, key), float).tolist() for s in (shard, whole)]
        for name, key in [("miou", "miou"), ("acc", "pixel_accuracy"), ("f1", "f1"),
                          ("n", "n_images"), ("iou", "per_class_iou"),
                          ("cliou", "cliou" if protocol == "cliou" else "miou")]}
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as fh:
    json.dump(out, fh)
dist.destroy_process_group()
'''


def test_two_ranks_with_uneven_shards_agree_with_one_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert set(result) == {"dataset", "dataset_majority", "per_image", "per_image_mean",
                               "oracle_merged", "cliou"}
        for protocol, values in result.items():
            for name, (shard, whole) in values.items():
                np.testing.assert_allclose(shard, whole, rtol=1e-12, equal_nan=True,
                                           err_msg=f"rank {rank}, {protocol}, {name}")


def test_distributed_without_a_process_group_says_what_to_do():
    with pytest.raises(RuntimeError, match="torchrun"):
        from segbook.eval import evaluate

        evaluate(np.zeros((2, 2), int), np.zeros((2, 2), int), "per_image", 2, distributed=True)
