"""Deterministic DDIM: inversion of a clean latent for ``n`` of ``N`` steps, and sampling back.

Paper 1 (section 3.1) inverts a real image with DDIM for 10 of 50 steps and reads the
U-Net's self-attention at the single denoising step that follows; its supplement (table 7)
shows the choice of step matters little and that skipping the inversion costs little.

One DDIM step (eta = 0) moves a latent from noise level ``a_s`` (the cumulative product of
the scheduler's alphas) to ``a_t`` with a noise prediction ``eps``:

    x0_hat = (x_s - sqrt(1 - a_s) eps) / sqrt(a_s)
    x_t    = sqrt(a_t) x0_hat + sqrt(1 - a_t) eps

Sampling goes down the schedule with ``eps = unet(x_t, t)``. Inversion goes up it; the
latent at the upper level is not known yet, so ``eps`` is predicted from the current
latent at the *upper* timestep, ``unet(x_s, t)`` (the usual approximation of DDIM
inversion, exact when ``eps`` barely changes over one step). The clean end of the schedule
is the scheduler's ``final_alpha_cumprod`` (``alphas_cumprod[0]`` for Stable Diffusion,
whose scheduler sets ``set_alpha_to_one=False``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

NoisePredictor = Callable[[torch.Tensor, int], torch.Tensor]


def ddim_timesteps(scheduler, num_inference_steps: int) -> list[int]:
    """The scheduler's timesteps for ``num_inference_steps``, noisiest first.

    For Stable Diffusion 1.4's scheduler (``steps_offset=1``, ``"leading"`` spacing) and 50
    steps this is ``[981, 961, ..., 21, 1]``.
    """
    if num_inference_steps < 1:
        raise ValueError("num_inference_steps must be >= 1")
    scheduler.set_timesteps(num_inference_steps)
    return [int(t) for t in scheduler.timesteps]


def _alpha(scheduler, t: int | None) -> torch.Tensor:
    """Cumulative alpha at timestep ``t``; ``None`` (or a negative t) is the clean end."""
    if t is None or t < 0:
        return torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64)
    return scheduler.alphas_cumprod[int(t)].to(torch.float64)


def ddim_step(latent: torch.Tensor, eps: torch.Tensor, alpha_from: torch.Tensor,
              alpha_to: torch.Tensor) -> torch.Tensor:
    """Move ``latent`` from noise level ``alpha_from`` to ``alpha_to`` along ``eps`` (float32 maths)."""
    x = latent.float()
    e = eps.float()
    a_s, a_t = float(alpha_from), float(alpha_to)
    x0 = (x - (1.0 - a_s) ** 0.5 * e) / a_s ** 0.5
    return (a_t ** 0.5 * x0 + (1.0 - a_t) ** 0.5 * e).to(latent.dtype)


def _check_scheduler(scheduler) -> None:
    prediction = getattr(scheduler.config, "prediction_type", "epsilon")
    if prediction != "epsilon":
        raise ValueError(f"DDIM here expects an epsilon-predicting model, got {prediction!r}")


@torch.no_grad()
def ddim_invert(predict_noise: NoisePredictor, scheduler, latent: torch.Tensor,
                num_inference_steps: int = 50, num_steps: int = 10,
                progress: bool = True) -> tuple[torch.Tensor, list[int]]:
    """Invert a clean latent for ``num_steps`` of ``num_inference_steps`` DDIM steps.

    Parameters
    ----------
    predict_noise : ``(latent, t) -> eps``, e.g. the U-Net with the empty-prompt embedding.
    scheduler : a diffusers scheduler with ``alphas_cumprod`` and ``final_alpha_cumprod``
        (``DDIMScheduler``).
    latent : the clean latent ``(1, 4, h, w)`` (VAE mean times the scaling factor).
    num_inference_steps : ``N``, the length of the DDIM schedule (paper 1: 50).
    num_steps : ``n``, how many of those steps to go up (paper 1: 10); 0 returns the input.
    progress : show a tqdm bar.

    Returns
    -------
    (latent_t, timesteps) : the inverted latent and the timesteps it passed, in increasing
    order; the last one is the timestep at which ``latent_t`` lives (181 for 10 of 50 with
    Stable Diffusion's scheduler).
    """
    _check_scheduler(scheduler)
    schedule = ddim_timesteps(scheduler, num_inference_steps)
    if not 0 <= num_steps <= len(schedule):
        raise ValueError(f"num_steps must be in 0..{len(schedule)}, got {num_steps}")
    if not torch.isfinite(latent).all():
        raise ValueError("the latent to invert contains NaN or infinite values")
    upward = schedule[::-1][:num_steps]
    x = latent
    previous: int | None = None
    for t in tqdm(upward, desc="DDIM inversion", disable=not progress, leave=False):
        eps = predict_noise(x, t)
        x = ddim_step(x, eps, _alpha(scheduler, previous), _alpha(scheduler, t))
        previous = t
    return x, list(upward)


@torch.no_grad()
def ddim_sample(predict_noise: NoisePredictor, scheduler, latent: torch.Tensor,
                timesteps: list[int], progress: bool = True) -> torch.Tensor:
    """Denoise ``latent`` down the given timesteps (noisiest first) to the clean end.

    ``timesteps`` is the list :func:`ddim_invert` returned, reversed, or any decreasing
    run that ends at the schedule's last step; each step goes from ``timesteps[i]`` to
    ``timesteps[i + 1]`` and the last one to the clean end.
    """
    _check_scheduler(scheduler)
    steps = [int(t) for t in timesteps]
    if any(a <= b for a, b in itertools.pairwise(steps)):
        raise ValueError("timesteps must be strictly decreasing")
    x = latent
    for i, t in enumerate(tqdm(steps, desc="DDIM sampling", disable=not progress, leave=False)):
        target = steps[i + 1] if i + 1 < len(steps) else None
        eps = predict_noise(x, t)
        x = ddim_step(x, eps, _alpha(scheduler, t), _alpha(scheduler, target))
    return x
