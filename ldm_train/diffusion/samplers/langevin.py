"""Annealed Langevin dynamics, the NCSN sampler (Song & Ermon 2019, Alg. 1; Song & Ermon 2020).

Code name          -> paper symbol
``model``          -> s_θ(x, σ) ≈ ∇_x log q_σ(x), the noise-conditional score (σ a Python float)
``sigmas``         -> the grid {σ_i}_{i=1}^L, descending geometric (2019 sec. 4.2; 2020 Technique 2),
                      ``sdes.geometric_sigmas``
``steps_per_sigma``-> T, Langevin steps per noise level (Alg. 1)
``step_lr``        -> ε, the base step size; α_i = ε · σ_i² / σ_L²  (Alg. 1, line 3)
``final_denoise``  -> the last x ← x + σ_L² s_θ(x, σ_L) (Tweedie; 2020 Appendix, "denoising")
"""
from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field


def ncsn_grid(sigmas: torch.Tensor, steps: int) -> torch.Tensor:
    """NCSN walks all of its L trained levels; ``steps`` (the other samplers' grid size) is unused."""
    return sigmas


@torch.no_grad()
def sample_annealed_langevin(model, x: torch.Tensor, sigmas: torch.Tensor, *, generator=None, callback=None,
                             steps_per_sigma: Annotated[int, Field(gt=0)] = 5,
                             step_lr: Annotated[float, Field(gt=0)] = 2e-5,
                             final_denoise: bool = True) -> torch.Tensor:
    """Alg. 1 of Song & Ermon 2019 from the initial ``x`` (x̃_0):

        for i = 1..L:  α_i = ε σ_i² / σ_L²
            for t = 1..T:  z_t ~ N(0, I);  x̃_t = x̃_{t-1} + (α_i / 2) s(x̃_{t-1}, σ_i) + sqrt(α_i) z_t

    NFE = L·T, plus 1 for ``final_denoise``. ``callback(i, x)`` after level i."""
    sig = [float(s) for s in sigmas]
    if any(a <= b for a, b in zip(sig, sig[1:])):
        raise ValueError("sigmas must be strictly descending")
    sigma_L = sig[-1]
    for i, sigma in enumerate(sig):
        alpha = step_lr * sigma**2 / sigma_L**2  # Alg. 1, line 3
        for _ in range(steps_per_sigma):
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            x = x + 0.5 * alpha * model(x, sigma) + alpha**0.5 * z  # Alg. 1, line 6
        if callback is not None:
            callback(i, x)
    if final_denoise:
        x = x + sigma_L**2 * model(x, sigma_L)  # Tweedie: E[x_0 | x̃] (Song & Ermon 2020, App.)
    return x
