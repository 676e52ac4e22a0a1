"""How good is an upsampler? Reconstruction (EASe Table 3) and linear probing (EASe Table 2).

* :func:`reconstruction` (Table 3): upsample the tokens of the image shrunk by ``scale`` to the
  grid of the full image's tokens and compare with those tokens: MSE (mean over elements) and
  cosine similarity (mean over tokens). Held-out images.
* :func:`linear_probe` (Table 2, JAFAR's protocol, ``evaluation/train_probes.py``): the backbone's
  tokens of the image, upsampled to the label size, a 1x1 convolution (features -> classes, with
  bias) trained with cross-entropy over labelled pixels, AdamW lr 5e-4 wd 1e-5, 20 epochs, batch
  2, random horizontal flips, cosine annealing (``T_max`` = epochs); mIoU (mean over classes) and
  pixel accuracy on the validation split after the last epoch. JAFAR's code steps the scheduler
  after every *batch* (the learning rate oscillates with a period of 40 iterations);
  ``scheduler="epoch"`` (default) fixes it, ``scheduler="batch"`` reproduces it.
  ``train_se=True`` also trains a SAUCE's SE gate with the probe's loss (EASe Table 2
  "SE trainable"; "SE frozen" trains only the probe).

The bilinear baseline is :class:`~segbook.upsamplers.base.BilinearUpsampler` in both.
Flips are applied to the upsampled features and labels of a frozen upsampler (computed once:
a CPU shortcut; JAFAR flips the image) and to the image when the SE trains.
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from segbook.upsamplers.features import (
    backbone_features,
    feature_stride,
    image_tensor,
    round_to_stride,
)

__all__ = ["linear_probe", "probe_crop", "reconstruction"]


def _upsample(up, image, lowres, size) -> torch.Tensor:
    out = up(image, lowres, size)
    return (out.features if hasattr(out, "features") else out).float()


def probe_crop(image, size: int, stride: int) -> torch.Tensor:
    """Resize the short side to ``size`` and centre-crop a square, side rounded to the stride."""
    x = image_tensor(image)
    side = round_to_stride(size, stride)
    H, W = x.shape[-2:]
    f = side / min(H, W)
    x = F.interpolate(x[None], size=(max(side, round(H * f)), max(side, round(W * f))),
                      mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)
    top, left = (x.shape[1] - side) // 2, (x.shape[2] - side) // 2
    return x[:, top:top + side, left:left + side]


@torch.no_grad()
def reconstruction(upsamplers: dict, backbone, images, scale: float = 0.5, size: int = 224,
                   layer: str | None = None) -> pd.DataFrame:
    """EASe Table 3 analogue: per upsampler, MSE and cosine of ``up(I, f(I_s))`` against ``f(I)``.

    Parameters
    ----------
    upsamplers : name -> upsampler (the :class:`~segbook.upsamplers.base.Upsampler` protocol).
    images : held-out images (arrays, paths or tensors), centre-cropped to ``size``.
    scale : the low-resolution factor (the tokens are those of the image resized by ``scale``).

    Returns
    -------
    DataFrame: ``upsampler, images, mse, cosine, norm_ratio`` (means over images;
    ``norm_ratio``: mean token norm of the prediction over that of the target, which shows when a
    lower MSE comes from shrinking the features rather than from pointing them better).
    """
    stride = feature_stride(backbone, layer)
    rows = {name: {"mse": [], "cosine": [], "norm_ratio": []} for name in upsamplers}
    for image in images:
        x = probe_crop(image, size, stride)
        target = backbone_features(backbone, x[None], layer)[0]
        low = round_to_stride(x.shape[-1] * scale, stride)
        small = F.interpolate(x[None], size=(low, low), mode="bilinear", align_corners=False)
        lowres = backbone_features(backbone, small, layer)[0]
        for name, up in upsamplers.items():
            pred = _upsample(up, x, lowres, tuple(target.shape[-2:]))
            rows[name]["mse"].append(float(F.mse_loss(pred, target)))
            rows[name]["cosine"].append(float(F.cosine_similarity(pred, target, dim=0).mean()))
            rows[name]["norm_ratio"].append(float(pred.norm(dim=0).mean() / target.norm(dim=0).mean()))
    return pd.DataFrame([{"upsampler": n, "images": len(v["mse"]), "mse": float(np.mean(v["mse"])),
                          "cosine": float(np.mean(v["cosine"])),
                          "norm_ratio": float(np.mean(v["norm_ratio"]))} for n, v in rows.items()])


def _scores(conf: np.ndarray) -> tuple[float, float]:
    tp = np.diag(conf).astype(float)
    union = conf.sum(0) + conf.sum(1) - tp
    present = union > 0
    miou = float(np.mean(tp[present] / union[present])) if present.any() else float("nan")
    return miou, float(tp.sum() / max(1, conf.sum()))


def linear_probe(upsampler, backbone, train_set, val_set, num_classes: int, size: int = 224,
                 epochs: int = 20, lr: float = 5e-4, weight_decay: float = 1e-5,
                 batch_size: int = 2, scheduler: str = "epoch", train_se: bool = False,
                 flip: bool = True, seed: int = 0, ignore_index: int = -1,
                 layer: str | None = None) -> dict:
    """JAFAR's linear probe (EASe Table 2 analogue) on upsampled features.

    Parameters
    ----------
    upsampler : the upsampler (frozen unless ``train_se``).
    train_set, val_set : sequences of ``(image, labels)`` (labels ``(H, W)`` ints, ``ignore_index``
        for unlabelled pixels); both are centre-cropped to ``size`` (nearest for labels).
    scheduler : ``"epoch"`` (cosine annealing stepped per epoch) or ``"batch"`` (JAFAR's code).
    train_se : train the SE gate of a SAUCE together with the probe (a copy; the caller's model
        is not modified).

    Returns
    -------
    dict: ``miou``, ``pixel_accuracy`` (validation, last epoch), ``history`` (per epoch), and the
    trained ``head``.
    """
    if scheduler not in ("epoch", "batch"):
        raise ValueError(f"scheduler must be 'epoch' or 'batch', got {scheduler!r}")
    stride = feature_stride(backbone, layer)
    g = torch.Generator().manual_seed(seed)

    def prepare(dataset):
        out = []
        for image, labels in dataset:
            x = probe_crop(image, size, stride)
            lab = torch.as_tensor(np.asarray(labels)).long()
            side = x.shape[-1]
            Hl, Wl = lab.shape
            f = side / min(Hl, Wl)
            lab = F.interpolate(lab[None, None].float(), size=(max(side, round(Hl * f)), max(side, round(Wl * f))),
                                mode="nearest-exact")[0, 0].long()
            top, left = (lab.shape[0] - side) // 2, (lab.shape[1] - side) // 2
            lab = lab[top:top + side, left:left + side]
            tokens = backbone_features(backbone, x[None], layer)[0]
            out.append((x, tokens, lab))
        return out

    train_items, val_items = prepare(train_set), prepare(val_set)
    model = upsampler
    if train_se:
        if not hasattr(upsampler, "se"):
            raise ValueError("train_se needs a SAUCE (an upsampler with an SE gate)")
        model = copy.deepcopy(upsampler).train()
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("se."))

    def features(x, tokens, grad=False):
        if train_se:
            with torch.set_grad_enabled(grad):
                return model.forward_batch(x[None], tokens[None], tuple(x.shape[-2:]))[0]
        with torch.no_grad():
            return _upsample(model, x, tokens, tuple(x.shape[-2:]))

    cached = None if train_se else [features(x, t) for x, t, _ in train_items]
    cached_val = None if train_se else [features(x, t) for x, t, _ in val_items]
    C = (cached[0] if cached else features(*train_items[0][:2])).shape[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Conv2d(C, num_classes, 1)
    params = list(head.parameters()) + ([p for p in model.parameters() if p.requires_grad] if train_se else [])
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    history = []
    for epoch in range(epochs):
        order = torch.randperm(len(train_items), generator=g).tolist()
        total, count = 0.0, 0
        for b in range(0, len(order), batch_size):
            feats, labs = [], []
            for i in order[b:b + batch_size]:
                x, tokens, lab = train_items[i]
                flipped = flip and float(torch.rand((), generator=g)) < 0.5
                if train_se:
                    f = features(x.flip(-1) if flipped else x, tokens.flip(-1) if flipped else tokens, grad=True)
                else:
                    f = cached[i].flip(-1) if flipped else cached[i]
                feats.append(f)
                labs.append(lab.flip(-1) if flipped else lab)
            logits = head(torch.stack(feats))
            target = torch.stack(labs)
            target = torch.where(target == ignore_index, torch.full_like(target, -100), target)
            loss = F.cross_entropy(logits, target, ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if scheduler == "batch":
                sched.step()
            total += float(loss.detach()) * len(feats)
            count += len(feats)
        if scheduler == "epoch":
            sched.step()
        conf = np.zeros((num_classes, num_classes), dtype=np.int64)
        with torch.no_grad():
            for j, (x, tokens, lab) in enumerate(val_items):
                f = cached_val[j] if cached_val is not None else features(x, tokens)
                pred = head(f[None])[0].argmax(0)
                valid = lab != ignore_index
                conf += np.bincount((lab[valid] * num_classes + pred[valid]).numpy(),
                                    minlength=num_classes ** 2).reshape(num_classes, num_classes)
        miou, acc = _scores(conf)
        history.append({"epoch": epoch + 1, "train_loss": total / max(1, count), "miou": miou,
                        "pixel_accuracy": acc, "lr": opt.param_groups[0]["lr"]})
    return {"miou": history[-1]["miou"], "pixel_accuracy": history[-1]["pixel_accuracy"],
            "history": pd.DataFrame(history), "head": head,
            "gates": model.gate(train_items[0][1][None]).detach()[0] if train_se else None}
