"""The ``ldm-train`` command. Every subcommand takes ``--config FILE`` and dotted overrides
(``train.lr=1e-4``); the config is validated before any work starts."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import Config, load_config
from .errors import Preempted, UserError

# ``--sampler`` choices: the registry's names (ldm_train.diffusion.samplers.SAMPLERS, a test checks they
# agree), spelled out here because importing the registry imports torch and --help must stay fast


class RegistryChoices:
    """``--sampler``'s choices: the names of ``ldm_train.diffusion.SAMPLERS``, looked up only when
    a value is checked or listed (the registry imports torch; ``--help`` and other commands must
    not), so the registry stays the one list a new sampler is added to."""

    def _names(self) -> list[str]:
        from .diffusion.samplers import SAMPLERS

        return list(SAMPLERS)

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self):
        return iter(self._names())

EXAMPLES = """examples:
  ldm-train demo                                  # every stage on the emoji set (~15 min on 2 CPU cores)
  ldm-train data emoji --out runs/demo/data
  ldm-train train-vae autoencoder.train.steps=500
  ldm-train train-clip clip.train.steps=200        # the CLIP the demo conditions on and scores with
  ldm-train train --config micro train.lr=1e-4 run.dir=runs/exp1   # a preset name, or a YAML file
  ldm-train sample --checkpoint runs/demo/export --prompt "red heart" --steps 25 --seed 1 --out heart.png
  ldm-train config keys eval                      # every key, its type, default and doc
  ldm-train convert sd15/unet runs/sd15-unet --to project   # then model.init_from=runs/sd15-unet
"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, metavar="FILE_OR_PRESET",
                   help="YAML config file, or a packaged preset name: demo, micro, sd15, improved_ddpm "
                        "(default: the built-in defaults, preset demo)")
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


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ldm_train")
    except PackageNotFoundError:  # a checkout on sys.path, not installed
        from . import __version__

        return __version__


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _sampling_args(p: argparse.ArgumentParser) -> None:
    """``sample`` and ``eval``: shorthands for ``eval.*`` keys (see :func:`eval_overrides`)."""
    p.add_argument("--sampler", default=None, choices=RegistryChoices(), metavar="NAME",
                   help="override eval.sampler: a sampler of ldm_train.diffusion.SAMPLERS (README \"Samplers\")")
    p.add_argument("--steps", type=int, default=None, help="override eval.steps")
    p.add_argument("--guidance", type=float, default=None, help="override eval.guidance_scale")
    p.add_argument("--seed", type=int, default=None, help="override eval.seed")
    _step_arg(p)


def _step_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--step", type=_positive_int, default=None, metavar="N",
                   help="the checkpoint of step N of a run folder (default: the latest; RUN/checkpoints/step-N names one too)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ldm-train", description="Latent diffusion training pipeline.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
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
    _common(sub.add_parser("train-clip", help="train a small open_clip CLIP (both towers) on the image-caption shards "
                                              "-> clip.dir (open_clip's folder layout)"))
    _common(sub.add_parser("encode", help="image shards -> latent shards in latents.dir (VAE + text tower)"))
    _common(sub.add_parser("train", help="train the U-Net denoiser on the latent cache -> {run}/checkpoints"))

    sample = sub.add_parser("sample", help="samples for prompts from a run or export (eval.sampler, default DDIM) -> PNG grid")
    sample.add_argument("--checkpoint", type=Path, required=True, help="run folder, step-N folder, export or diffusers SD pipeline folder")
    sample.add_argument("--prompt", action="append", required=True, help="prompt (repeat for several)")
    sample.add_argument("--out", type=Path, required=True, help="PNG grid to write")
    _sampling_args(sample)
    sample.add_argument("--negative-prompt", default=None, metavar="TEXT",
                        help="what to steer away from: replaces the empty caption as guidance's unconditional context")
    sample.add_argument("--height", type=_positive_int, default=None, help="image height in pixels (default: the trained size)")
    sample.add_argument("--width", type=_positive_int, default=None, help="image width in pixels (default: the trained size)")
    _common(sample)

    ev = sub.add_parser("eval", help="samples for validation captions + held-out loss -> report, images, grid")
    ev.add_argument("--checkpoint", type=Path, required=True, help="run folder, step-N folder, export or diffusers SD pipeline folder")
    ev.add_argument("--out", type=Path, default=None, help="report folder (default: {run}/eval)")
    ev.add_argument("--num-samples", type=int, default=32, help="images to sample, one per validation caption (cycled)")
    _sampling_args(ev)
    ev.add_argument("--shards", action="store_true", help="also write the images as WebDataset shards (img2dataset layout)")
    _common(ev)

    export = sub.add_parser("export", help="EMA U-Net + VAE + text tower + scheduler -> inference folder")
    export.add_argument("--out", type=Path, default=None, help="export folder (default: export.dir)")
    export.add_argument("--checkpoint", type=Path, default=None, help="run folder or step-N folder (default: run.dir)")
    _step_arg(export)
    export.add_argument("--single-file", type=Path, default=None, metavar="FILE",
                        help="also write FILE.safetensors in the original SD 1.x/2.x single-file layout (A1111, ComfyUI; export.dtype)")
    export.add_argument("--diffusers-pipeline", type=Path, default=None, metavar="DIR",
                        help="also assemble a diffusers StableDiffusionPipeline folder in DIR")
    export.add_argument("--lora-format", choices=("diffusers", "kohya", "both"), default=None,
                        help="a LoRA run: its EMA adapter into {out}/lora/ as diffusers' pytorch_lora_weights.safetensors, "
                             "kohya's kohya_lora.safetensors (A1111, ComfyUI) or both (the default)")
    export.add_argument("--merge", action="store_true",
                        help="a LoRA run: the export (and --single-file) holds the merged full U-Net, not the base")
    _common(export)

    conv = sub.add_parser("convert", help="convert a U-Net folder (diffusers <-> ldm_train) or a whole SD checkpoint "
                                          "(single file <-> diffusers pipeline folder)")
    conv.add_argument("input", type=Path, help="a U-Net folder (diffusers or ldm_train), an SD 1.x/2.x single file, "
                                               "or a diffusers SD pipeline folder")
    conv.add_argument("output", type=Path, help="folder (or, with --to single-file, .safetensors file) to write")
    conv.add_argument("--to", choices=["project", "diffusers", "single-file"], required=True,
                      help="output format: project/diffusers U-Net folder; diffusers also turns a single file into a "
                           "pipeline folder; single-file turns a pipeline folder into one SD checkpoint file")
    conv.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default=None,
                      help="single file -> diffusers: what the model predicts (needed for SD 2.x: 768-v or 512-base)")
    conv.add_argument("--overwrite", action="store_true", help="replace an existing output folder")

    _common(sub.add_parser("demo", help="run every stage on the emoji set and summarise"))
    from .slurm.commands import add_slurm_parser

    add_slurm_parser(sub, _common)
    from .config_doc import add_config_parser

    add_config_parser(sub, _common)
    return parser


# The stages that read what ``pretrained`` fills in (sample/eval read a run's resolved config.yaml).
PRETRAINED_STAGES = ("encode", "train", "slurm")


def dispatch(args: argparse.Namespace, cfg: Config) -> dict:
    """Run the subcommand's stage: one entry per subcommand of :func:`build_parser`, whose
    required subcommand guarantees that ``args.command`` is one of them."""
    from . import stages

    commands = {  # lambdas: `slurm status` has no --overwrite, and only the chosen stage runs
        "data": lambda: _data(stages, args, cfg),
        "train-vae": lambda: stages.train_vae_stage(cfg, args.overwrite),
        "train-clip": lambda: stages.train_clip_stage(cfg, args.overwrite),
        "encode": lambda: stages.encode_stage(cfg, args.overwrite),
        "train": lambda: stages.train_stage(cfg, args.overwrite),
        "sample": lambda: stages.sample_stage(args.checkpoint, args.prompt, args.out, cfg, args.overwrite,
                                              args.negative_prompt, args.height, args.width, args.step),
        "eval": lambda: _eval(stages, args, cfg),
        "export": lambda: _export(stages, args, cfg),
        "convert": lambda: stages.convert_stage(args.input, args.output, args.to, args.overwrite, args.prediction_type),
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
    return stages.eval_stage(args.checkpoint, cfg, out, args.num_samples, args.overwrite, args.shards, args.step)


def _export(stages, args: argparse.Namespace, cfg: Config) -> dict:
    out = args.out if args.out is not None else cfg.path(cfg.export.dir)
    summary = stages.export_stage(cfg, out, args.overwrite, args.checkpoint, args.step, args.single_file,
                                  args.lora_format, args.merge)
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
    """``eval|sample --sampler/--steps/--guidance/--seed`` are shorthands for the ``eval.*`` keys
    (validated the same way)."""
    if args.command not in ("eval", "sample"):
        return []
    pairs = (("sampler", args.sampler), ("steps", args.steps), ("guidance_scale", args.guidance),
             ("seed", args.seed))
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
    if stray:  # reported with the usage of the subcommand they were given to (`ldm-train sample: error: ...`)
        chosen_parser(parser, args).error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    return args


def chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The innermost subcommand parser ``args`` went through (``data folder``, ``slurm submit``)."""
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        name = getattr(args, subs[0].dest, None) if subs else None
        if name not in (subs[0].choices if subs else {}):
            return parser
        parser = subs[0].choices[name]


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.command == "config":
        from .config_doc import run_config

        return run_config(args)
    try:
        config_path = getattr(args, "config", None)
        cfg = load_config(config_path, [*getattr(args, "overrides", ()), *eval_overrides(args), *data_overrides(args)])
        if args.command == "export":  # nothing to export: said before the full check below imports torch
            from .stages import export_precheck

            export_precheck(cfg, args.checkpoint)
        resolves = args.command in PRETRAINED_STAGES and getattr(args, "action", "submit") == "submit"
        if resolves and (cfg.pretrained is not None or cfg.model.init_from is not None):
            from .pretrained.resolve import apply_pretrained

            cfg = apply_pretrained(cfg)
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
