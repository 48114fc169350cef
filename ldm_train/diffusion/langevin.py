"""Annealed Langevin dynamics, the NCSN sampler (Song & Ermon 2019, Alg. 1; Song & Ermon 2020).

Code name          -> paper symbol
``score(x, sigma)``-> s_θ(x, σ) ≈ ∇_x log q_σ(x), the noise-conditional score
``sigmas``         -> {σ_i}_{i=1}^L, a descending geometric sequence (2019 sec. 4.2; 2020 Technique 2),
                      e.g. ``score_losses.geometric_sigmas(sigma_min, sigma_max, L)``
``steps_per_sigma``-> T, Langevin steps per noise level (Alg. 1)
``step_lr``        -> ε, the base step size; α_i = ε · σ_i² / σ_L²  (Alg. 1, line 3)
``final_denoise``  -> the last x ← x + σ_L² s_θ(x, σ_L) (Tweedie; 2020 Appendix, "denoising")
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch


@torch.no_grad()
def annealed_langevin_sample(
    score: Callable[[torch.Tensor, float], torch.Tensor],
    sigmas: Sequence[float],
    x0: torch.Tensor,
    steps_per_sigma: int,
    step_lr: float,
    generator: torch.Generator | None = None,
    final_denoise: bool = True,
) -> torch.Tensor:
    """Alg. 1 of Song & Ermon 2019 from the initial ``x0`` (x̃_0):

        for i = 1..L:  α_i = ε σ_i² / σ_L²
            for t = 1..T:  z_t ~ N(0, I);  x̃_t = x̃_{t-1} + (α_i / 2) s(x̃_{t-1}, σ_i) + sqrt(α_i) z_t

    NFE = L·T, plus 1 for ``final_denoise``. ``score`` receives σ_i as a Python float."""
    sig = [float(s) for s in sigmas]
    if any(a <= b for a, b in zip(sig, sig[1:])):
        raise ValueError("sigmas must be strictly descending")
    sigma_L = sig[-1]
    x = x0
    for sigma in sig:
        alpha = step_lr * sigma**2 / sigma_L**2  # Alg. 1, line 3
        for _ in range(steps_per_sigma):
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            x = x + 0.5 * alpha * score(x, sigma) + alpha**0.5 * z  # Alg. 1, line 6
    if final_denoise:
        x = x + sigma_L**2 * score(x, sigma_L)  # Tweedie: E[x_0 | x̃] (Song & Ermon 2020, App.)
    return x
