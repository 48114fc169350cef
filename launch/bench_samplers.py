#!/usr/bin/env python
"""Sample quality vs number of function evaluations (NFE) for every sampler, with an exact denoiser.

The project's answer to the DDIM paper's FID-vs-steps table (issue 4), measurable without a
trained network: the target is a 2-D mixture of three anisotropic Gaussians (the one in
``tests/diffusion/test_exactness.py``) and each sampler calls its closed-form posterior mean
(``tests/diffusion/analytic.py``), so every deviation from the data is the sampler's own. Quality
is the sliced 2-Wasserstein distance (256 directions) between ``--n`` samples and ``--n`` fresh
data points; the same distance between two independent data samples is printed as the floor.

NFE are counted by wrapping the denoiser/score in a call counter, and the step count for each
target NFE is the largest whose count fits:
  DDIM η=0 / η=1 (trailing spacing), DDPM ancestral, Euler, DPM-Solver++(2M): 1 per step;
  Heun (EDM, Euler last step): 2N - 1;  PF-ODE (VP, Heun): 2 per step;
  PC (VP, reverse diffusion + 1 Langevin corrector, Tweedie final step): 2 per step + 1;
  annealed Langevin (NCSN, σ 10 → 0.01 geometric, T = 2 steps per level, ε = 2e-5): L·T + 1.
The EDM-grid samplers use σ ∈ [0.002, 80], ρ = 7; DDIM/DDPM use a linear β schedule, T = 1000.
The table cell is the distance; the JSON also holds the counted NFE.

Examples::

    python launch/bench_samplers.py                       # table + runs/bench_samplers.{png,json}
    python launch/bench_samplers.py --n 4000 --nfe 10 20 --out /tmp/b.png
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from ldm_train.diffusion import NoiseSchedule, make_betas, sample  # noqa: E402
from ldm_train.diffusion.guidance import guided  # noqa: E402
from ldm_train.diffusion.parameterization import SDEScore  # noqa: E402
from ldm_train.diffusion.samplers.karras import karras_sigmas, sample_dpmpp_2m, sample_euler, sample_heun  # noqa: E402
from ldm_train.diffusion.samplers.langevin import sample_annealed_langevin  # noqa: E402
from ldm_train.diffusion.samplers.sde import sample_pc, sample_pf_ode, sde_grid  # noqa: E402
from ldm_train.diffusion.sdes import VPSDE, geometric_sigmas  # noqa: E402


def _load_analytic():
    """The closed-form mixture of the tests (test-only code, so loaded by path, not installed)."""
    path = Path(__file__).resolve().parents[1] / "tests" / "diffusion" / "analytic.py"
    spec = importlib.util.spec_from_file_location("_bench_samplers_analytic", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_analytic = _load_analytic()
GaussianMixture = _analytic.GaussianMixture
as_discrete_model = _analytic.as_discrete_model
as_vp_score = _analytic.as_vp_score
sliced_wasserstein = _analytic.sliced_wasserstein
Counter = _analytic.Counter

F64 = torch.float64


def target_mixture() -> GaussianMixture:
    return GaussianMixture(
        torch.tensor([0.5, 0.3, 0.2], dtype=F64),
        torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]], dtype=F64),
        torch.tensor([[[0.3, 0.15], [0.15, 0.2]], [[0.1, -0.05], [-0.05, 0.4]], [[0.5, 0.0], [0.0, 0.05]]],
                     dtype=F64),
    )


def build_samplers(gmm: GaussianMixture):
    """name -> (steps_for(nfe), run(steps, noise, generator, counter_factory))."""
    sched = NoiseSchedule.from_betas(make_betas("linear", 1000))
    samplers = {}

    def ddim_run(eta):
        def run(steps, z, g):
            model = Counter(as_discrete_model(gmm, sched, "epsilon"))
            ctx = torch.zeros(z.shape[0], 1, 1, dtype=F64)
            x = sample("ddim", guided(model, ctx, None, 1.0), z, sched, steps, eta=eta, generator=g,
                       spacing="trailing")
            return x, model.calls
        return run

    samplers["DDIM eta=0"] = (lambda nfe: nfe, ddim_run(0.0))
    samplers["DDIM eta=1"] = (lambda nfe: nfe, ddim_run(1.0))

    def ddpm_run(steps, z, g):
        model = Counter(as_discrete_model(gmm, sched, "epsilon"))
        ctx = torch.zeros(z.shape[0], 1, 1, dtype=F64)
        x = sample("ddpm", guided(model, ctx, None, 1.0), z, sched, steps, generator=g, spacing="trailing")
        return x, model.calls

    samplers["DDPM"] = (lambda nfe: nfe, ddpm_run)

    def k_run(fn, stochastic):
        def run(steps, z, g):
            D = Counter(gmm.denoise)
            sig = karras_sigmas(steps, 0.002, 80.0)
            x = fn(D, 80.0 * z, sig, generator=g) if stochastic else fn(D, 80.0 * z, sig)
            return x, D.calls
        return run

    samplers["Euler (EDM)"] = (lambda nfe: nfe, k_run(sample_euler, True))
    samplers["Heun (EDM)"] = (lambda nfe: (nfe + 1) // 2, k_run(sample_heun, True))
    samplers["DPM++(2M)"] = (lambda nfe: nfe, k_run(sample_dpmpp_2m, False))
    vp = VPSDE()

    def pf_run(steps, z, g):
        s = Counter(as_vp_score(gmm, vp))
        return sample_pf_ode(SDEScore(s, vp), z, sde_grid(vp, steps), method="heun", final_denoise=False), s.calls

    def pc_run(steps, z, g):
        s = Counter(as_vp_score(gmm, vp))
        x = sample_pc(SDEScore(s, vp), z, sde_grid(vp, steps), generator=g, predictor="reverse_diffusion",
                      corrector="langevin")
        return x, s.calls

    samplers["PF-ODE VP (Heun)"] = (lambda nfe: nfe // 2, pf_run)
    samplers["PC VP (RD+Langevin)"] = (lambda nfe: (nfe - 1) // 2, pc_run)

    def ald_run(levels, z, g):
        s = Counter(gmm.score)
        sigmas = geometric_sigmas(0.01, 10.0, levels, dtype=F64)
        x = sample_annealed_langevin(s, 10.0 * z, sigmas, generator=g, steps_per_sigma=2, step_lr=2e-5)
        return x, s.calls

    samplers["Annealed Langevin"] = (lambda nfe: (nfe - 1) // 2 if nfe >= 5 else 0, ald_run)  # L >= 2
    return samplers


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10_000, help="samples per sampler and per data set (default 10000)")
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20, 50, 100], help="target NFE budgets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/bench_samplers.png"),
                   help="PNG plot path; the JSON goes next to it with suffix .json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    gmm = target_mixture()
    data = gmm.sample(args.n, torch.Generator().manual_seed(args.seed + 1))

    def sw(x):
        return sliced_wasserstein(x, data, 256, torch.Generator().manual_seed(args.seed + 2))

    floor = sw(gmm.sample(args.n, torch.Generator().manual_seed(args.seed + 3)))
    results: dict[str, dict[int, dict]] = {}
    t0 = time.time()
    for name, (steps_for, run) in build_samplers(gmm).items():
        results[name] = {}
        for nfe in args.nfe:
            steps = steps_for(nfe)
            if steps < 1:
                continue
            z = torch.randn(args.n, 2, generator=torch.Generator().manual_seed(args.seed + 4), dtype=F64)
            x, calls = run(steps, z, torch.Generator().manual_seed(args.seed + 5))
            if calls > nfe:
                raise RuntimeError(f"{name}: {steps} steps used {calls} NFE > budget {nfe}")
            results[name][nfe] = {"steps": steps, "nfe": calls, "sw": sw(x) if torch.isfinite(x).all() else None}

    width = max(len(k) for k in results) + 2
    print(f"sliced W2 to the target mixture (n={args.n}); data-vs-data floor {floor:.4f}")
    print("sampler".ljust(width) + "".join(f"NFE {n:>4}  " for n in args.nfe))
    for name, row in results.items():
        cells = []
        for n in args.nfe:
            r = row.get(n)
            cells.append("      -   " if r is None or r["sw"] is None else f"{r['sw']:>9.4f} ")
        print(name.ljust(width) + " ".join(cells))
    print(f"({time.time() - t0:.1f} s)")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"n": args.n, "seed": args.seed, "data_floor_sw": floor,
               "results": {k: {str(n): v for n, v in row.items()} for k, row in results.items()}}
    json_path = args.out.with_suffix(".json")
    json_path.write_text(json.dumps(payload, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for name, row in results.items():
        pts = [(v["nfe"], v["sw"]) for v in row.values() if v["sw"] is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    ax.axhline(floor, color="k", ls="--", lw=1, label="data vs data")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("NFE (counted)")
    ax.set_ylabel("sliced W2 to target")
    ax.set_title(f"Exact-denoiser samplers on a 2-D Gaussian mixture (n={args.n})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
