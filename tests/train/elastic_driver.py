"""Run under torchrun by test_elastic.py: the real ``train`` stage (resuming the run folder's latest
checkpoint, on however many processes it is launched with), observed from outside:

- ``keys-START-RANK.json``: the sample keys of every batch this rank drew, in order, and
  ``losses-START.json`` the losses this launch logged (START: the step it resumed from, 0 if none);
- ``state-saved-STEP.safetensors`` (at every save, before it is written) and
  ``state-loaded-STEP.safetensors`` (right after a resume restored checkpoint STEP): the full
  model weights, the optimizer's fp32 weights and AdamW moments per parameter (gathered through
  DeepSpeed's ``safe_get_full_*`` under ZeRO), and every EMA gathered to full tensors; rank 0 writes.

usage: elastic_driver.py CONFIG_OVERRIDE...   (the ``train`` command's overrides)
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import MICRO  # noqa: E402

from ldm_train import stages  # noqa: E402
from ldm_train.config import load_config  # noqa: E402
from ldm_train.train import loop  # noqa: E402
from ldm_train.train.batches import StreamBatches  # noqa: E402
from ldm_train.train.strategy import gather_chunks, is_deepspeed  # noqa: E402


def full_state(parts) -> dict[str, torch.Tensor]:
    """Every rank calls this (the gathers are collectives)."""
    acc = parts.accelerator
    module = acc.unwrap_model(parts.model)
    out: dict[str, torch.Tensor] = {}
    if is_deepspeed(acc):
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        for name, p in module.named_parameters():
            with deepspeed.zero.GatheredParameters([p]):
                out[f"model/{name}"] = p.detach().clone()
            out[f"fp32/{name}"] = safe_get_full_fp32_param(p)
            for key in ("exp_avg", "exp_avg_sq"):
                out[f"{key}/{name}"] = safe_get_full_optimizer_state(p, key)
    else:
        for name, p in module.named_parameters():
            out[f"model/{name}"] = p.detach().clone()
            for key in ("exp_avg", "exp_avg_sq", "step"):
                out[f"{key}/{name}"] = parts.optimizer.state[p][key].reshape(-1)
    for i in range(len(parts.ema.decays)):
        for name, t in parts.ema.full_weights(i, gather_chunks(acc)).items():
            out[f"ema{i}/{name}"] = t
    out["ema_updates"] = torch.tensor([parts.ema.num_updates])
    out["lr"] = torch.tensor([g["lr"] for g in parts.scheduler.optimizer.param_groups], dtype=torch.float64)
    out["scheduler_epoch"] = torch.tensor([parts.scheduler.last_epoch])
    return out


def dump(parts, run: Path, kind: str) -> None:
    state = full_state(parts)
    if parts.accelerator.is_main_process:
        save_file({k: v.detach().float().cpu().contiguous() if k != "lr" else v for k, v in state.items()},
                  str(run / f"state-{kind}-{parts.counters.step}.safetensors"))
    parts.accelerator.wait_for_everyone()


def main() -> None:
    cfg = load_config(MICRO, sys.argv[1:])
    run = cfg.path("{run}")
    keys: list[list[str]] = []
    start = [0]
    metrics = run / "metrics.jsonl"
    logged = metrics.read_text().count("\n") if metrics.is_file() else 0
    draw, save, restore = StreamBatches.next, loop.save_training_state, loop.restore_training_state

    def recording_next(self, device):
        out = draw(self, device)
        keys.append(list(self.last_keys))
        return out

    def observed_save(parts, *args, **kwargs):
        dump(parts, run, "saved")
        return save(parts, *args, **kwargs)

    def observed_restore(parts, *args, **kwargs):
        restore(parts, *args, **kwargs)
        start[0] = parts.counters.step
        dump(parts, run, "loaded")

    StreamBatches.next = recording_next
    loop.save_training_state, loop.restore_training_state = observed_save, observed_restore
    stages.train_stage(cfg, overwrite=False)
    rank = int(os.environ.get("RANK", "0"))  # train_stage has ended the process group
    (run / f"keys-{start[0]}-{rank}.json").write_text(json.dumps(keys))
    if rank == 0:
        lines = [json.loads(x) for x in metrics.read_text().splitlines()[logged:]]
        losses = {r["step"]: r["loss"] for r in lines if r.get("stage") == "train"}
        (run / f"losses-{start[0]}.json").write_text(json.dumps(losses))


if __name__ == "__main__":
    main()
