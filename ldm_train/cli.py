"""The ``ldm-train`` command. Every subcommand takes ``--config FILE`` and dotted overrides
(``train.lr=1e-4``); the config is validated before any work starts."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import Config, load_config
from .errors import Preempted, UserError

EXAMPLES = """examples:
  ldm-train demo                                  # every stage on the emoji set (~15 min on 2 CPU cores)
  ldm-train data emoji --out runs/demo/data
  ldm-train train-vae --config configs/demo.yaml autoencoder.train.steps=500
  ldm-train train --config configs/demo.yaml train.lr=1e-4 run.dir=runs/exp1
  ldm-train sample --checkpoint runs/demo/export --prompt "red heart" --out heart.png
  ldm-train convert sd15/unet runs/sd15-unet --to project   # then model.init_from=runs/sd15-unet
"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, help="YAML config (default: built-in defaults = configs/demo.yaml)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs instead of refusing")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. train.lr=1e-4")


def _converter_args(p: argparse.ArgumentParser) -> None:
    """``data folder|hf``: their flags are shorthands for ``data.convert.*`` keys (see data_overrides)."""
    p.add_argument("--out", type=Path, default=None, help="folder for train/, val/, report.json (default: parent of data.train_shards)")
    p.add_argument("--shard-size", type=int, default=None, help="samples per shard (data.convert.shard_size)")
    p.add_argument("--val-fraction", type=float, default=None, help="fraction for val/, by key hash (data.convert.val_fraction)")
    p.add_argument("--allow-empty-captions", action="store_true", help="keep images without caption, captioned '' (data.convert.allow_empty_captions)")
    p.add_argument("--tolerate-failures", action="store_true", help="exit 0 even when inputs could not be read (data.tolerate_failed_shards)")
    _common(p)


def build_parser() -> argparse.ArgumentParser:
    from .diffusion.samplers import SAMPLERS  # the registry is the list of choices
    parser = argparse.ArgumentParser(
        prog="ldm-train", description="Latent diffusion training pipeline.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="build image-caption WebDataset shards")
    data_sub = data.add_subparsers(dest="source", required=True, metavar="SOURCE")
    emoji = data_sub.add_parser("emoji", help="render Noto Color Emoji into train/val shards")
    emoji.add_argument("--out", type=Path, default=None, help="folder for train/ and val/ (default: parent of data.train_shards)")
    _common(emoji)
    folder = data_sub.add_parser("folder", help="a folder of images (NAME.jpg|png|webp) with NAME.txt captions -> shards")
    folder.add_argument("--src", type=Path, required=True, help="folder of images, nested folders included")
    _converter_args(folder)
    hf = data_sub.add_parser("hf", help="a Hugging Face datasets dataset (local folder/files or hub id) -> shards")
    hf.add_argument("--dataset", required=True, help="save_to_disk folder, data files folder/file, or hub id (online only)")
    hf.add_argument("--split", default=None, help="split to convert (default: train, or the only one)")
    hf.add_argument("--image-column", required=True, help="column holding the images (Image feature, bytes or paths)")
    hf.add_argument("--caption-column", required=True, help="column holding the captions (a string, or a list: the first)")
    _converter_args(hf)

    _common(sub.add_parser("train-vae", help="train the KL autoencoder on data.train_shards -> autoencoder.path"))
    _common(sub.add_parser("encode", help="image shards -> latent shards in latents.dir (VAE + text tower)"))
    _common(sub.add_parser("train", help="train the U-Net denoiser on the latent cache -> {run}/checkpoints"))

    sample = sub.add_parser("sample", help="DDIM samples for prompts from a run or export -> PNG grid")
    sample.add_argument("--checkpoint", type=Path, required=True, help="run folder or export folder")
    sample.add_argument("--prompt", action="append", required=True, help="prompt (repeat for several)")
    sample.add_argument("--out", type=Path, required=True, help="PNG grid to write")
    _common(sample)

    ev = sub.add_parser("eval", help="samples for validation captions + held-out loss -> report, images, grid")
    ev.add_argument("--checkpoint", type=Path, required=True, help="run folder or export folder")
    ev.add_argument("--out", type=Path, default=None, help="report folder (default: {run}/eval)")
    ev.add_argument("--num-samples", type=int, default=32, help="images to sample, one per validation caption (cycled)")
    ev.add_argument("--sampler", default=None, choices=list(SAMPLERS), help="override eval.sampler")
    ev.add_argument("--steps", type=int, default=None, help="override eval.steps")
    ev.add_argument("--guidance", type=float, default=None, help="override eval.guidance_scale")
    ev.add_argument("--shards", action="store_true", help="also write the images as WebDataset shards (img2dataset layout)")
    _common(ev)

    export = sub.add_parser("export", help="EMA U-Net + VAE + text tower + scheduler -> inference folder")
    export.add_argument("--out", type=Path, default=None, help="export folder (default: export.dir)")
    export.add_argument("--diffusers-pipeline", type=Path, default=None, metavar="DIR",
                        help="also assemble a diffusers StableDiffusionPipeline folder in DIR")
    _common(export)

    conv = sub.add_parser("convert", help="convert a U-Net folder: diffusers <-> ldm_train format")
    conv.add_argument("input", type=Path, help="a diffusers UNet2DConditionModel folder or an ldm_train U-Net folder")
    conv.add_argument("output", type=Path, help="folder to write")
    conv.add_argument("--to", choices=["project", "diffusers"], required=True, help="output format")
    conv.add_argument("--overwrite", action="store_true", help="replace an existing output folder")

    _common(sub.add_parser("demo", help="run every stage on the emoji set and summarise"))
    from .slurm.commands import add_slurm_parser

    add_slurm_parser(sub, _common)
    return parser


def dispatch(args: argparse.Namespace, cfg: Config) -> dict:
    """Run the subcommand's stage: one entry per subcommand of :func:`build_parser`, whose
    required subcommand guarantees that ``args.command`` is one of them."""
    from . import stages

    commands = {  # lambdas: `slurm status` has no --overwrite, and only the chosen stage runs
        "data": lambda: _data(stages, args, cfg),
        "train-vae": lambda: stages.train_vae_stage(cfg, args.overwrite),
        "encode": lambda: stages.encode_stage(cfg, args.overwrite),
        "train": lambda: stages.train_stage(cfg, args.overwrite),
        "sample": lambda: stages.sample_stage(args.checkpoint, args.prompt, args.out, cfg, args.overwrite),
        "eval": lambda: _eval(stages, args, cfg),
        "export": lambda: _export(stages, args, cfg),
        "convert": lambda: stages.convert_stage(args.input, args.output, args.to, args.overwrite),
        "demo": lambda: _demo(args, cfg),
        "slurm": lambda: _slurm(args, cfg),
    }
    return commands[args.command]()


def _data(stages, args: argparse.Namespace, cfg: Config) -> dict:
    if args.source == "folder":
        return stages.data_folder(cfg, args.src, args.out, args.overwrite)
    if args.source == "hf":
        return stages.data_hf(cfg, args.dataset, args.split, args.image_column, args.caption_column, args.out, args.overwrite)
    return stages.data_emoji(cfg, args.out, args.overwrite)


def _eval(stages, args: argparse.Namespace, cfg: Config) -> dict:
    out = args.out if args.out is not None else cfg.path("{run}") / "eval"
    return stages.eval_stage(args.checkpoint, cfg, out, args.num_samples, args.overwrite, args.shards)


def _export(stages, args: argparse.Namespace, cfg: Config) -> dict:
    out = args.out if args.out is not None else cfg.path(cfg.export.dir)
    summary = stages.export_stage(cfg, out, args.overwrite)
    if args.diffusers_pipeline is not None:
        summary.update(stages.sd_pipeline_stage(out, args.diffusers_pipeline, args.overwrite))
    return summary


def _demo(args: argparse.Namespace, cfg: Config) -> dict:
    from .demo import print_summary, run_demo

    print_summary(run_demo(cfg, args.overwrite))
    return {}  # the summary is printed already


def _slurm(args: argparse.Namespace, cfg: Config) -> dict:
    from .slurm.commands import run_slurm

    return run_slurm(args, cfg)


def eval_overrides(args: argparse.Namespace) -> list[str]:
    """``eval --sampler/--steps/--guidance`` are shorthands for the ``eval.*`` keys (validated the same way)."""
    if args.command != "eval":
        return []
    pairs = (("sampler", args.sampler), ("steps", args.steps), ("guidance_scale", args.guidance))
    return [f"eval.{key}={value}" for key, value in pairs if value is not None]


def data_overrides(args: argparse.Namespace) -> list[str]:
    """``data folder|hf`` flags as ``data.*`` overrides, so they are validated like config keys."""
    if args.command != "data" or args.source not in ("folder", "hf"):
        return []
    pairs = (("convert.shard_size", args.shard_size), ("convert.val_fraction", args.val_fraction))
    out = [f"data.{key}={value}" for key, value in pairs if value is not None]
    out += ["data.convert.allow_empty_captions=true"] if args.allow_empty_captions else []
    return out + (["data.tolerate_failed_shards=true"] if args.tolerate_failures else [])


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Like parse_args, but ``KEY=VALUE`` overrides may also come after flags (``--overwrite a.b=1``)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-") or "=" not in x or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        config_path = getattr(args, "config", None)
        cfg = load_config(config_path, [*getattr(args, "overrides", ()), *eval_overrides(args), *data_overrides(args)])
        from .diffusion.checks import check_config

        check_config(cfg, str(config_path or "<defaults>") + " + overrides")
        result = dispatch(args, cfg)
    except UserError as e:
        print(f"ldm-train {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:  # checkpoint saved; the same command resumes
        print(f"ldm-train {args.command}: preempted: {e}; run the same command again to resume", file=sys.stderr)
        return e.exit_code
    if result:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
