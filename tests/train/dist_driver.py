"""Run under torchrun by test_distributed.py: train the micro U-Net on a fixed batch of the
micro latents with a strategy, then write ``RUN_DIR/report-RANK.json`` per rank.

usage: dist_driver.py RUN_DIR STRATEGY STEPS [NAN_AT]   (NAN_AT: rank 1's loss is NaN at that step)
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import MICRO  # noqa: E402

from ldm_train.config import LRScheduleConfig, load_config  # noqa: E402
from ldm_train.diffusion import build_objective  # noqa: E402
from ldm_train.latents.cache import LatentData, load_latents  # noqa: E402
from ldm_train.train.batches import MemoryBatches  # noqa: E402
from ldm_train.train.loop import train_denoiser  # noqa: E402
from ldm_train.train.strategy import gather_chunks, make_accelerator  # noqa: E402
from ldm_train.utils.runs import MetricsLog  # noqa: E402


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def full_weights(model: torch.nn.Module, zero3: bool) -> dict[str, torch.Tensor]:
    if not zero3:
        return {k: p.detach().clone() for k, p in model.named_parameters()}
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        return {k: p.detach().clone() for k, p in model.named_parameters()}


def main() -> None:
    run, strategy, steps = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    nan_at = int(sys.argv[4]) if len(sys.argv) > 4 else None
    cfg = load_config(MICRO, [f"run.dir={run}", "distributed.cpu=true", f"distributed.strategy={strategy}"])
    data = load_latents(cfg.path(cfg.latents.dir) / "train")
    n = 8
    data = LatentData(data.mean[:n], data.std[:n], data.context[:n], data.captions[:n], data.keys[:n], data.null_context, data.manifest)
    train_cfg = cfg.train.model_copy(update={"steps": steps, "log_every": 1, "checkpoint_every": 1000,
                                        "lr_schedule": LRScheduleConfig(warmup_steps=5)})
    acc = make_accelerator(cfg.distributed, train_cfg)
    objective = None
    if nan_at is not None:
        base, calls = build_objective(cfg.diffusion), []

        def objective(*args):
            calls.append(1)
            loss, stats = base(*args)
            return (loss * float("nan") if len(calls) == nan_at and acc.process_index == 1 else loss), stats

    model, ema, result = train_denoiser(
        model=cfg.model, diffusion=cfg.diffusion, train=train_cfg, distributed=cfg.distributed, accelerator=acc,
        batches=MemoryBatches(data, train_cfg.batch_size, cfg.run.seed, acc.process_index), run_dir=run,
        seed=cfg.run.seed, log=MetricsLog(run / "metrics.jsonl"), objective=objective,
    )
    zero3 = strategy == "zero3"
    params = list(model.parameters())
    full = sum(int(torch.Size(p.ds_shape).numel()) if zero3 else p.numel() for p in params)
    local = sum(p.ds_tensor.numel() if zero3 else p.numel() for p in params)
    report = {
        "rank": acc.process_index,
        "nonfinite_skipped": result.nonfinite_skipped,
        "finite": all(bool(torch.isfinite(v).all()) for v in full_weights(model, zero3).values()),
        "losses": [v for _, v in result.losses],
        "weights_checksum": checksum(full_weights(model, zero3)),
        "ema_checksum": checksum(ema.full_weights(0, gather_chunks(acc))),
        "full_param_elements": full,
        "local_param_elements": local,
        "num_params": len(params),
        "ema_bytes": ema.nbytes(),
        "full_ema_bytes": 4 * full * len(ema.decays),
    }
    (run / f"report-{acc.process_index}.json").write_text(json.dumps(report))  # one file per rank: no interleaving
    acc.end_training()


if __name__ == "__main__":
    main()
