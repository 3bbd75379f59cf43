"""``sdtune``: a thin command line over the library; each subcommand calls one public function."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's help, wrapped without breaking a name at its hyphen (``textual-inversion``)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        import textwrap

        return textwrap.fill(" ".join(text.split()), width, initial_indent=indent, subsequent_indent=indent,
                             break_on_hyphens=False)

    def _split_lines(self, text: str, width: int) -> list[str]:
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def build_parser() -> argparse.ArgumentParser:
    from sdtune.techniques import TECHNIQUES

    parser = argparse.ArgumentParser(
        prog="sdtune", formatter_class=_HelpFormatter,
        description="Fine-tune Stable Diffusion with several techniques under identical data and "
        "hyperparameters, and compare them.",
        epilog=f"techniques: {', '.join(TECHNIQUES.names())}",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser = _with_formatter(commands.add_parser)

    train = commands.add_parser(
        "train", help="train the techniques of an experiment file",
        epilog=f"technique kinds: {', '.join(TECHNIQUES.names())}",
    )
    train.add_argument("experiment", help="the experiment YAML file")
    train.add_argument("--technique", action="append", metavar="NAME", help="train only this technique (repeatable)")
    train.add_argument("--output", metavar="DIR", help="output folder (default: output_dir of the file or runs/<name>)")
    train.add_argument(
        "--resume", nargs="?", const="latest", metavar="PATH",
        help="continue from the latest checkpoint, or from the checkpoint folder PATH",
    )
    train.add_argument("--overwrite", action="store_true", help="replace an existing finished run")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key, e.g. train.max_train_steps=10")
    train.add_argument("--stop-after", type=int, metavar="STEP",
                       help="stop after this optimizer step, checkpointed (--resume continues it)")
    train.add_argument("--estimate", action="store_true",
                       help="train nothing: print each technique's peak-memory estimate (no weights are read)")
    train.add_argument("--budget", metavar="SIZE", help="with --estimate: the savers that bring it under SIZE, e.g. 24GB")
    train.add_argument("--estimate-device", choices=["cuda", "cpu"], default="cuda",
                       help="with --estimate: a CUDA GPU's memory (default) or this CPU process's")
    train.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)

    generate = commands.add_parser("generate", help="generate images with a trained technique")
    generate.add_argument("run_dir", help="a run folder: OUTPUT/<technique>")
    generate.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    generate.add_argument("--num-images", type=int, default=4, help="images per prompt (seeds seed, seed+1, …)")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--steps", type=int, default=50, help="inference steps")
    generate.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    generate.add_argument("--scheduler", help="a diffusers scheduler class, e.g. DDIMScheduler")
    generate.add_argument("--resolution", type=int, help="image side in pixels (default: the training resolution)")
    generate.add_argument("--width", type=int, help="image width, e.g. a bucket's (record: data.buckets)")
    generate.add_argument("--height", type=int, help="image height, e.g. a bucket's")
    generate.add_argument("--out", help="folder for the PNGs (default: RUN_DIR/samples)")
    generate.add_argument("--no-fuse", action="store_true", help="keep adapters unfused (slower sampling)")
    generate.add_argument("--full-precision-base", action="store_true",
                          help="a run trained on a quantised base: sample on the full-precision base instead")
    compare = commands.add_parser(
        "compare", help="train every technique, generate the same images, measure, and write the report"
    )
    compare.add_argument("experiment", help="the experiment YAML file")
    compare.add_argument("--output", metavar="DIR", help="output folder (default: output_dir of the file or runs/<name>)")
    compare.add_argument("--seeds", type=_seed_list, metavar="0,1,2", help="repeat each training once per seed")
    compare.add_argument("--only", metavar="NAME[,NAME]", help="run only these techniques (comma-separated)")
    compare.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key of the file")
    compare.add_argument("--plan", choices=["yaml", "json", "shell"], nargs="?", const="yaml",
                         help="print one `sdtune train` command per technique × seed (for a cluster scheduler) and exit")
    compare.add_argument("--evaluate-only", action="store_true",
                         help="train nothing: evaluate the finished runs found (e.g. trained from --plan)")

    tune = commands.add_parser(
        "tune", help="tune each technique's learning rate on the validation split (equal budget), then compare "
        "them at the tuned and at the shared rate over seeds: both tables in one report",
    )
    tune.add_argument("experiment", help="the experiment YAML file (with a tuning: section)")
    tune.add_argument("--output", metavar="DIR", help="output folder (default: output_dir of the file or runs/<name>)")
    tune.add_argument("--engine", choices=["local", "ray"], default="local",
                      help="local (default): sdtune's own processes; ray: Ray tasks, and Ray Tune for scheduler: asha")
    tune.add_argument("--address", metavar="ADDR", help="--engine ray: join this Ray cluster (default: start a local Ray)")
    tune.add_argument("--max-concurrent", type=int, default=1, metavar="N", help="runs at a time (default 1)")
    tune.add_argument("--only", type=_name_list, metavar="NAMES", help="only these techniques (comma-separated)")
    tune.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key of the file")
    tune.add_argument("--plan", choices=["yaml", "json", "shell"], nargs="?", const="yaml",
                      help="print the trials and final runs as `sdtune train` commands (for a cluster scheduler) and exit")
    tune.add_argument("--no-finals", action="store_true", help="stop after the trials and the selection")

    demo = commands.add_parser(
        "demo", help="the built-in demo: the study in miniature, on a CPU in minutes (or `demo pretrain`)"
    )
    demo.add_argument("action", nargs="?", choices=["run", "pretrain"], default="run",
                      help="run (default): the whole comparison; pretrain: rebuild the demo base model")
    demo.add_argument("--output", metavar="DIR",
                      help="output folder (default: demo-output; with --subject: demo-subject-output)")
    demo.add_argument("--quick", action="store_true", help="a few steps only (a smoke test)")
    demo.add_argument("--tune", action="store_true",
                      help="the fair comparison: every technique tuned on validation, both tables, grid vs asha")
    demo.add_argument("--subject", action="store_true",
                      help="the subject round instead: a new object from 6 images (textual inversion, DreamBooth)")
    demo.add_argument("--out", metavar="DIR", help="pretrain: where to write the base model")
    demo.add_argument("--unet-steps", type=int, default=2500, help="pretrain: UNet/text-encoder steps")
    demo.add_argument("--vae-steps", type=int, default=800, help="pretrain: VAE steps")

    export = commands.add_parser(
        "export", help="write a run with its adapter merged: a diffusers folder (--merged --out DIR) and/or "
        "one original-layout checkpoint for A1111/ComfyUI (--single-file OUT.safetensors)"
    )
    export.add_argument("run_dir", help="a run folder: OUTPUT/<technique>")
    export.add_argument("--merged", action="store_true", help="a diffusers pipeline folder with the adapter folded in")
    export.add_argument("--out", metavar="DIR", help="where --merged writes the pipeline")
    export.add_argument("--single-file", metavar="OUT.safetensors", help="one checkpoint in the original layout")
    export.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32",
                        help="--single-file weights (default fp32: exactly the trained weights)")
    export.add_argument("--overwrite", action="store_true", help="write into a non-empty --out / over the file")
    export.add_argument("--full-precision-base", action="store_true",
                        help="a run trained on a quantised base: fold its adapter into the original full-precision "
                        "weights (default: into the dequantised weights it trained on)")

    report = commands.add_parser("report", help="re-render the report of a comparison from its records")
    report.add_argument("output", metavar="DIR", help="the comparison's output folder")

    anatomy = commands.add_parser(
        "anatomy", help="what a run, or a LoRA/LyCORIS file, changed in the base model's weights: per layer, block and "
        "in total (norms, ranks, intruder dimensions)"
    )
    anatomy.add_argument("source", metavar="RUN_DIR|FILE",
                         help="a run folder (OUTPUT/<technique>) or a .safetensors LoRA/LyCORIS file (kohya/ComfyUI naming)")
    anatomy.add_argument("--base", metavar="MODEL",
                         help="the base model: a folder, hub id or file (a file needs it; a run: default its record's model)")
    anatomy.add_argument("--out", metavar="FILE", help="the record (default: RUN_DIR/anatomy.json or FILE.anatomy.json)")
    return parser


def _with_formatter(add_parser):
    """Every subcommand's parser with the same help formatter."""
    return lambda *args, **kwargs: add_parser(*args, formatter_class=_HelpFormatter, **kwargs)


def _seed_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 0,1,2") from None


def _name_list(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r}: give technique names separated by commas, e.g. full,lora")
    return names


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    from sdtune.errors import UserError
    from sdtune.runner import TechniqueFailed, report_error

    try:
        return COMMANDS[args.command](args)
    except TechniqueFailed as error:  # a technique's own process failed; its error is reported here, once
        if error.user_error:
            print(f"sdtune: error: {error}", file=sys.stderr)
            return 2
        print(error.details or "", file=sys.stderr, end="")
        print(f"sdtune: technique {error.name!r} crashed (a bug in sdtune: the traceback is above)", file=sys.stderr)
        return 1
    except UserError as error:
        if not report_error(error, user_error=True):
            print(f"sdtune: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        report_error(error, user_error=False)
        raise


def _quiet_libraries() -> None:
    """Keep the terminal to sdtune's own progress bars and results (library bars and notices off)."""
    import logging

    for name in ("diffusers", "transformers", "datasets", "accelerate", "huggingface_hub", "bitsandbytes", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets
        import diffusers
        import transformers

        datasets.disable_progress_bars()
        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except (ImportError, AttributeError):
        pass


def _train(args: argparse.Namespace) -> int:
    import sdtune
    from sdtune.util.distributed import launch_rank, launched_processes

    experiment = sdtune.load_experiment(args.experiment, args.set)
    if args.budget and not args.estimate:
        from sdtune.errors import UserError

        raise UserError("--budget applies to --estimate; add --estimate (training itself has no budget)")
    if args.estimate:
        for estimate in sdtune.estimate_memory(experiment, args.technique, args.budget, args.estimate_device):
            print(estimate.describe(), flush=True)
        return 0
    _keep_freed_cpu_memory(experiment, args.technique)
    results = sdtune.train(
        experiment, args.technique, args.output, args.resume, args.overwrite, progress=not args.no_progress,
        on_result=_print_result, stop_after=args.stop_after,
    )
    if results and results[-1].status == "interrupted":
        name = results[-1].record["technique"]["name"]
        if launch_rank() == 0:
            print(f"resume with: sdtune train {args.experiment} --technique {name} --resume")
        # 130 (interrupted) for a shell; under a launcher 0, which would otherwise take the stop for a
        # crash and kill the other processes while they finish writing
        return 130 if launched_processes() == 1 else 0
    return 0


def _keep_freed_cpu_memory(experiment: Any, names: list[str] | None) -> None:
    """A training process of sdtune's own (this command, or each technique's child process) keeps
    the CPU memory it frees (:mod:`sdtune.util.allocator`), unless the experiment sets
    ``train.keep_freed_cpu_memory: false``. Library calls leave their caller's process alone."""
    from sdtune.util import allocator
    from sdtune.util.device import on_cpu

    chosen = [name for name in names or experiment.techniques if name in experiment.techniques]
    if on_cpu() and all(experiment.train_config_for(name).keep_freed_cpu_memory for name in chosen):
        allocator.keep_freed_memory()


def _print_result(result: Any) -> None:
    from sdtune.util.distributed import launch_rank

    if launch_rank() != 0:  # under a launcher, one process reports
        return
    from sdtune.records import check_failure_line

    record, timing = result.record, result.record["timing"]
    print(
        f"{record['technique']['name']}: {result.status} at step {record['steps']['done']}/{record['steps']['max']}, "
        f"{timing['s_per_step']:.3f} s/step, {timing['images_per_s']:.2f} img/s, "
        f"{record['bytes_on_disk'] / 1e6:.2f} MB written → {result.run_dir}",
        flush=True,
    )
    failed = check_failure_line(record)
    if failed:
        print(failed, flush=True)


def _generate(args: argparse.Namespace) -> int:
    import sdtune

    result = sdtune.generate(
        args.run_dir, args.prompt, num_images=args.num_images, seed=args.seed, steps=args.steps,
        guidance=args.guidance, out_dir=args.out, fuse=not args.no_fuse, scheduler=args.scheduler,
        resolution=args.resolution, width=args.width, height=args.height, full_precision_base=args.full_precision_base,
    )
    mean = sum(result.latencies_s) / max(len(result.latencies_s), 1)
    print(f"model load: {result.load_time_s:.2f} s; per image: {mean:.3f} s (mean of {len(result.latencies_s)})")
    if result.base_quantization:
        quantized = ", ".join(f"{part} {kind}" for part, kind in result.base_quantization.items() if kind)
        print(f"base: quantised as trained ({quantized}); --full-precision-base samples on the original weights")
    for path in result.paths:
        print(path)
    return 0


def _compare(args: argparse.Namespace) -> int:
    import sdtune

    experiment = sdtune.load_experiment(args.experiment, args.set)
    if args.plan:
        _print_plan(sdtune.compare_plan(experiment, args.output, args.seeds, args.only), args.plan)
        return 0
    report = sdtune.compare(experiment, args.output, args.seeds, args.only, evaluate_only=args.evaluate_only)
    print(sdtune.summary_table(report.parent))
    print(f"report: {report}")
    return 0


def _tune(args: argparse.Namespace) -> int:
    import sdtune

    experiment = sdtune.load_experiment(args.experiment, args.set)
    if args.plan:
        _print_plan(sdtune.tune_plan(experiment, args.output, args.only), args.plan)
        return 0
    report = sdtune.tune(
        experiment, args.output, engine=args.engine, address=args.address, max_concurrent=args.max_concurrent,
        only=args.only, finals=not args.no_finals,
    )
    print(sdtune.summary_table(report.parent))
    print(f"report: {report}")
    return 0


def _print_plan(entries: list[dict[str, Any]], form: str) -> None:
    if form == "shell":
        for entry in entries:
            print(shlex.join(entry["command"]) if entry.get("command") else f"# {entry['phase']} {entry.get('arm', '')} "
                  f"{entry['technique']} seed {entry['seed']}: after {entry.get('after', '')}")
    elif form == "json":
        print(json.dumps(entries, indent=2))
    else:
        print(yaml.safe_dump(entries, sort_keys=False), end="")


def _report(args: argparse.Namespace) -> int:
    import sdtune

    report = sdtune.render_report(Path(args.output))
    print(sdtune.summary_table(Path(args.output)))
    print(f"report: {report}")
    return 0


def _export(args: argparse.Namespace) -> int:
    import sdtune
    from sdtune.config import ConfigError

    if not (args.merged or args.single_file) or bool(args.merged) != bool(args.out):
        raise ConfigError("export: give --merged --out DIR (a diffusers folder), --single-file OUT.safetensors, or both")
    sdtune.check_export_targets(  # both targets before either is written
        args.run_dir, args.out if args.merged else None, args.single_file, args.overwrite, args.precision
    )
    if args.merged:
        out = sdtune.export_merged(args.run_dir, args.out, args.overwrite, args.full_precision_base)
        print(f"merged pipeline written to {out} (diffusers <Pipeline>.from_pretrained)")
    if args.single_file:
        out = sdtune.export_single_file(
            args.run_dir, args.single_file, args.overwrite, args.precision, args.full_precision_base
        )
        print(f"single-file checkpoint written to {out} (A1111, ComfyUI, diffusers <Pipeline>.from_single_file)")
    return 0


def _anatomy(args: argparse.Namespace) -> int:
    import sdtune

    record, path = sdtune.weight_anatomy(args.source, base=args.base, out=args.out)
    anatomy = record.anatomy
    total, intruders = anatomy["total"], anatomy["method"]["intruders"]
    where = sorted(anatomy["blocks"].items(), key=lambda item: -item[1]["share"])
    kinds = sorted(anatomy["kinds"].items(), key=lambda item: -item[1]["share"])
    print(
        f"{record.source} ({record.technique}, {record.family}): {total['changed_layers']} weight matrices changed, "
        f"relative ΔW {_figure(total['relative'])}; median effective rank {total['effective_rank_median']:.2f}, "
        f"numerical rank ≤ {total['numerical_rank_max']}; {total['intruders']} intruder dimensions in "
        f"{total['layers_with_intruders']} layers (k={intruders['k']}, ε={intruders['epsilon']})"
    )
    print("where: " + ", ".join(f"{name} {100 * group['share']:.0f} %" for name, group in where if group["share"] >= 0.005))
    print("what: " + ", ".join(f"{name} {100 * group['share']:.0f} %" for name, group in kinds if group["share"] >= 0.005))
    print(f"{anatomy['time_s']:.1f} s; record: {path}")
    return 0


def _figure(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def _demo(args: argparse.Namespace) -> int:
    if args.action == "pretrain":
        if args.subject:
            from sdtune.errors import UserError

            raise UserError("demo pretrain: --subject applies to `sdtune demo` (run), not to pretrain; remove it")
        from sdtune.demo.pretrain import pretrain

        out = Path(args.out or "demo-base")
        summary = pretrain(out, vae_steps=args.vae_steps, unet_steps=args.unet_steps)
        print(f"demo base model written to {out} (VAE PSNR {summary['vae']['psnr_db']:.1f} dB)")
        return 0
    if args.tune and args.subject:
        from sdtune.errors import UserError

        raise UserError("demo: --tune and --subject are two different demos; give one of them")
    if args.tune:
        from sdtune.demo.tune import run_demo_tune

        report = run_demo_tune(args.output or "demo-tune-output", quick=args.quick)
    elif args.subject:
        from sdtune.demo.subject import run_subject

        report = run_subject(args.output or "demo-subject-output", quick=args.quick)
    else:
        from sdtune.demo.run import run_demo

        report = run_demo(args.output or "demo-output", quick=args.quick)
    import sdtune

    print(sdtune.summary_table(report.parent))
    print(f"report: {report}")
    return 0


COMMANDS = {"train": _train, "generate": _generate, "compare": _compare, "tune": _tune, "report": _report,
            "demo": _demo, "export": _export, "anatomy": _anatomy}

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
