"""SAUCE: JAFAR with a squeeze-and-excitation gate on the low-resolution tokens (EASe, section 3.1).

EASe {cite}`ease2025excite` (eq. 1) gates the tokens ``F_lr`` (``C x h x w``) channel-wise before
JAFAR sees them::

    s = sigmoid(W2 SiLU(W1 GAP(F_lr))),   W1: C -> C/r,  W2: C/r -> C,  r = 2
    F~ = F_lr * s

and ``F~`` is both the SFT condition of the keys and the values, so the output
``F_hr = A F~`` is a convex combination of *gated* tokens. Everything else is JAFAR
(:class:`~segbook.upsamplers.jafar.JAFAR`). The paper does not state bias terms; the SE here has
them (the usual squeeze-and-excitation layer).

The paper trains with eq. 2 against the *un-gated* backbone features of the full image, so a gate
below one is a reconstruction error on the value path and training pushes the gates towards one
(``PAPER2_JAFAR_EASE_FACTS.md`` section 6, ambiguity A1). ``gate="values_and_keys"`` (default) is
the paper as written; ``gate="keys_only"`` gates only the key condition and keeps the raw tokens
as values, so the gate is free to reweight what the keys look at.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segbook.upsamplers.jafar import JAFAR

__all__ = ["GATE_MODES", "SAUCE", "SqueezeExcite"]

GATE_MODES = ("values_and_keys", "keys_only")


class SqueezeExcite(nn.Module):
    """``sigmoid(W2 SiLU(W1 GAP(x)))``: ``(B, C, h, w)`` -> gates ``(B, C)`` (EASe eq. 1)."""

    def __init__(self, channels: int, r: int = 2):
        super().__init__()
        if channels // r < 1:
            raise ValueError(f"r={r} leaves no hidden units for {channels} channels")
        self.fc1 = nn.Linear(channels, channels // r)
        self.fc2 = nn.Linear(channels // r, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc2(F.silu(self.fc1(x.mean(dim=(-2, -1))))))


class SAUCE(JAFAR):
    """JAFAR + SE gate (EASe section 3.1, eq. 1).

    Parameters
    ----------
    v_dim, qk_dim, num_heads, kernel_size, theta : as :class:`JAFAR` (EASe supp. Table 1:
        ``d_qk`` 128).
    r : the SE reduction (2).
    gate : ``"values_and_keys"`` (the paper) or ``"keys_only"``.
    """

    def __init__(self, v_dim: int = 1024, qk_dim: int = 128, num_heads: int = 4, r: int = 2,
                 gate: str = "values_and_keys", **kwargs):
        super().__init__(v_dim=v_dim, qk_dim=qk_dim, num_heads=num_heads, **kwargs)
        if gate not in GATE_MODES:
            raise ValueError(f"gate must be one of {GATE_MODES}, got {gate!r}")
        self.r = int(r)
        self.gate_mode = gate
        self.se = SqueezeExcite(v_dim, r)

    def gate(self, feats: torch.Tensor) -> torch.Tensor:
        """The gates ``s`` ``(B, C)`` of tokens ``(B, C, h, w)``."""
        return self.se(feats)

    def values_and_condition(self, feats):
        gated = feats * self.se(feats)[:, :, None, None]
        if self.gate_mode == "keys_only":
            return feats, gated
        return gated, gated

    def load_jafar(self, state: dict) -> list[str]:
        """Start from a JAFAR checkpoint (official or segbook layout): every JAFAR weight is
        loaded, the SE keeps its initialisation. Returns the ignored keys."""
        from segbook.upsamplers.jafar import official_to_segbook

        mapped, ignored = official_to_segbook(state, self.qk_dim)
        se = {k: v for k, v in self.state_dict().items() if k.startswith("se.")}
        probe = JAFAR(self.v_dim, self.qk_dim, self.num_heads, self.kernel_size)
        ignored += probe.load_official(mapped)
        self.load_state_dict({**probe.state_dict(), **se})
        return ignored
