"""Command line: a thin shell over the Python API. Errors a user caused print as one line."""

from __future__ import annotations

import argparse
import atexit
import gc
import logging
import os
import sys
import time
from pathlib import Path

from .config.markdown import config_reference_markdown
from .config.schema import ABLATIONS, PseudoLabelConfig, load_config
from .runtime.cpu import configure as configure_cpu
from .runtime.errors import NoisyStudentError, TrainingPreempted

LABEL_DEFAULTS = PseudoLabelConfig()  # `noisystudent label` labels as the pipeline's label stage does


def _default_run_dir(config: str | None, ablation: str | None) -> Path:
    stem = Path(config).stem if config else "digits"
    if ablation:
        stem += f"-{ablation}"
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def _stage_command(args: argparse.Namespace, kind: str) -> int:
    """``noisystudent train | label | select RUN_DIR``: the next unfinished stage of a run, which
    must be of this kind; a RUN_DIR without a run is created from the config (as ``run --out``)."""
    from .runtime.phases import startup_imports

    with startup_imports(freeze=args.as_command):
        from .pipeline import run_pipeline
    from .runtime.distributed import RankFailure, launch_rank
    from .runtime.rundir import CONFIG, MANIFEST

    run_dir = Path(args.run_dir)
    resume = (run_dir / MANIFEST).is_file()
    if resume and args.config is None and not args.set and not args.ablation:
        cfg = load_config(run_dir / CONFIG)
    else:
        cfg = load_config(args.config, args.set, args.ablation)
    try:
        args.resume_hint = f"resume with `noisystudent {kind} {run_dir}`"  # if SIGTERM stops it
        result = run_pipeline(cfg, run_dir, resume=resume, progress=not args.quiet, only=kind)
    except RankFailure as e:
        e.run_dir = run_dir
        raise
    if launch_rank() == 0:
        print(f"{', '.join(result['ran']) or 'nothing to do'}: {run_dir}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    return _stage_command(args, "train")


def cmd_select(args: argparse.Namespace) -> int:
    return _stage_command(args, "select")


def cmd_run(args: argparse.Namespace) -> int:
    from .runtime.phases import process_start, startup_imports

    with startup_imports(freeze=args.as_command):
        from .pipeline import format_summary_table, run_pipeline
    from .runtime.distributed import RankFailure, launch_rank
    from .runtime.rundir import CONFIG

    if args.resume:
        run_dir = Path(args.resume)
        if args.config is None:  # the documented form: the run's own resolved config
            if not run_dir.is_dir():
                raise NoisyStudentError(f"--resume: run directory not found: {run_dir}")
            config = run_dir / CONFIG
            if not config.is_file():
                raise NoisyStudentError(f"--resume: {run_dir} has no {CONFIG}; is it a run directory?")
        else:  # a config passed again must exist (load_config names it) and match the run's
            config = args.config
    else:
        run_dir = Path(args.out) if args.out else _default_run_dir(args.config, args.ablation)
        config = args.config
    cfg = load_config(config, args.set, args.ablation)
    try:
        args.resume_hint = f"resume with `noisystudent run --resume {run_dir}`"  # if SIGTERM stops it
        summary = run_pipeline(cfg, run_dir, resume=bool(args.resume), progress=not args.quiet,
                               process_started=process_start())  # the start-up phase: since the process began
    except RankFailure as e:  # the one place that knows the run directory to resume
        e.run_dir = run_dir
        raise
    if launch_rank() != 0:  # under torchrun, rank 0 speaks for the job
        return 0
    if args.quiet:
        print(format_summary_table(summary))
    print(f"run directory: {summary['run_dir']}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .runs import evaluate_config, evaluate_run

    target = Path(args.target)
    cfg = evaluate_config(target, args.config, args.set, suites=args.suite, max_images=args.max_images)
    done = evaluate_run(target, cfg, out=Path(args.out) if args.out else None, progress=not args.quiet)
    if done.report is not None:
        print(f"report: {done.report}")
    for name, res in done.results.items():
        clean = res.get("clean", {})
        line = f"{name:<12} clean top-1 {clean.get('top1', float('nan')):6.2f}"
        if "corruptions" in res:
            line += f"  corruption error {res['corruptions']['mean_error']:6.2f}"
        if "fgsm" in res:
            line += "  fgsm top-1 " + " ".join(f"{e:g}:{a:.1f}" for e, a in zip(res["fgsm"]["eps"], res["fgsm"]["top1"]))
        print(line)
    print(f"results: {done.results_file}")
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    if args.source is None:  # `noisystudent label RUN_DIR`: the label stage of a run
        args.run_dir, args.config = args.checkpoint, None
        return _stage_command(args, "label")
    if args.out is None:
        raise NoisyStudentError("label CHECKPOINT POOL needs --out STORE_DIR")
    from .runs import label_pool

    done = label_pool(Path(args.checkpoint), args.source, Path(args.out), shard_size=args.shard_size,
                      device=args.device, top_k=args.top_k, temperature=args.temperature,
                      batch_size=args.batch_size, num_workers=args.workers, precision=args.precision,
                      progress=not args.quiet)
    if done.is_main:
        print(f"pseudo-label store: {done.store}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .runs import report_run

    paths = report_run(Path(args.run_dir))
    print(f"report: {paths['html']}")
    print(f"markdown: {paths['md']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .models.export import export_model, push_to_hub

    result = export_model(Path(args.run_dir), Path(args.out), onnx=args.onnx, license_id=args.license,
                          repo_id=args.push_to_hub)
    print(f"exported {result['stage']} ({result['architecture']}, {result['num_classes']} classes):")
    for path in result["files"].values():
        print(f"  {path}")
    if result["onnx_max_abs_diff"] is not None:
        print(f"onnx checked against PyTorch: max abs difference {result['onnx_max_abs_diff']:.2e}")
    elif args.onnx:
        print("onnx not checked (onnxruntime is not installed: pip install 'noisystudent[onnx]')")
    if args.push_to_hub:
        print(f"pushed to https://huggingface.co/{args.push_to_hub}: {push_to_hub(Path(args.out), args.push_to_hub, private=args.private)}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .evaluate.predict import Predictor, load_for_prediction, output_format

    output_format(Path(args.out))  # a wrong suffix fails before the model loads
    model, meta, what = load_for_prediction(args.model)
    predictor = Predictor(model, meta, device=args.device, top_k=args.top_k, batch_size=args.batch_size,
                          num_workers=args.workers, precision=args.precision)
    if not args.quiet:
        print(f"model: {what}, {len(predictor.classes)} classes, on {predictor.device}", file=sys.stderr)
    result = predictor.predict_to_file(args.source, Path(args.out), progress=not args.quiet)
    rate = result.images / result.seconds if result.seconds > 0 else float("nan")
    print(f"predictions: {result.out} ({result.images} images, top-{predictor.top_k}, {rate:.0f} img/s "
          f"on {result.device})")
    print(f"unreadable: {result.unreadable} (listed in {result.unreadable_file})")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models.zoo import format_chain_presets, format_model_table

    print(format_model_table())
    print()
    print("chain presets (config key `chain`):")
    print(format_chain_presets())
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.list:
        from .config.packaged import config_description, packaged_configs

        shipped = packaged_configs()
        width = max(map(len, shipped))
        for name, config in shipped.items():
            print(f"{name:<{width}}  {config_description(config)}")
        print("\nuse by name from any folder: noisystudent run NAME (or configs/NAME.yaml); "
              "noisystudent config NAME prints one")
        return 0
    if args.markdown:
        print(config_reference_markdown())
        return 0
    import yaml

    from .config.stages import format_stages, resolve_stages

    cfg = load_config(args.config, args.set, args.ablation)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    # as YAML comments, so that the output still loads as a config
    table = format_stages(resolve_stages(cfg)).splitlines()
    print("\n# resolved stages (chain preset, then ablation, then per-stage overrides and defaults):")
    print("\n".join("# " + line for line in table))
    return 0


class Terminated(BaseException):
    """SIGTERM arrived outside training (which checkpoints and raises TrainingPreempted itself).
    A BaseException, as KeyboardInterrupt is, so no ``except Exception`` on the way swallows it."""


def _stop_on_sigterm():
    """Turn SIGTERM into :class:`Terminated` (a line saying how to resume, exit 143) instead of a
    silent death; returns what restores the previous handler. Training replaces it with its own
    (checkpoint first) for its duration. Only the main thread may install handlers."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def stop(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, stop)
    return lambda: signal.signal(signal.SIGTERM, previous)


def one_line(error: Exception) -> str:
    """The error's own message on one line. An error raised in a DataLoader worker arrives wrapped
    in the worker's traceback text; its last line is the original message."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    text = lines[-1] if lines else type(error).__name__
    prefix = f"{type(error).__module__}.{type(error).__name__}: "
    return text[len(prefix):] if text.startswith(prefix) else text


def version_line() -> str:
    """``noisystudent X (torch A, torchvision B, timm C)``, read from the installed packages'
    metadata rather than by importing them."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    libraries = ", ".join(f"{name} {installed(name)}" for name in ("torch", "torchvision", "timm"))
    return f"noisystudent {installed('noisystudent')} ({libraries})"


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config file, or a packaged config by name: digits, "
                   "fashion-mnist, image-folder (config --list; default: the built-in digits experiment)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.epochs=5 --set students.0.model=ns_cnn_m")
    p.add_argument("--ablation", choices=sorted(ABLATIONS),
                   help="one of the paper's ablations: " +
                        "; ".join(f"{k}: {v}" for k, v in ABLATIONS.items()))


def _add_run_parser(sub) -> None:
    p = sub.add_parser("run", help="run the whole Noisy Student loop",
                       description="Train the teacher, then label, select and train each student in "
                                   "the chain. Writes a run directory with a manifest, checkpoints, "
                                   "pseudo labels, metrics and summary.json.")
    _add_config_args(p)
    p.add_argument("--out", metavar="RUN_DIR", help="run directory (default: runs/<config>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run, skipping finished stages")
    p.add_argument("--quiet", action="store_true", help="no progress bars or stage logs")
    p.set_defaults(func=cmd_run)


def _add_evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="robustness suites on a run's teacher and final student, or a checkpoint",
                       description="Clean top-1/top-5, ImageNet-C style corruptions (mCE), ImageNet-P style "
                                   "perturbations (flip rate, mT5D), natural adversarial images, FGSM and PGD, "
                                   "on the test split. Results go to RUN_DIR/evaluate/robustness.json with plots.")
    p.add_argument("target", metavar="CHECKPOINT_OR_RUN_DIR")
    p.add_argument("--config", help="config whose data to use (default: the run's config.yaml, or digits)")
    p.add_argument("--data", dest="config", help=argparse.SUPPRESS)
    p.add_argument("--suite", help="comma-separated: clean,corruptions,perturbations,natural-adversarial,fgsm,pgd")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--max-images", type=int, help="evaluate at most this many test images")
    p.add_argument("--out", help="output folder (default: RUN_DIR/evaluate, or next to the checkpoint)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_evaluate)


def _add_stage_commands_parser(sub) -> None:
    for name, kind, what in (("train", cmd_train, "train the next model of a run: the teacher, a student from "
                                                   "its selection, or the fix-res fine-tune"),
                             ("select", cmd_select, "select a run's next pseudo labels (threshold, balance) "
                                                    "from its label store")):
        p = sub.add_parser(name, help=what, description=f"{what[0].upper()}{what[1:]}. Runs one stage of "
                           "`noisystudent run` alone, so each stage can be its own job (and allocation): "
                           "train -> label -> select -> train -> ... -> `run --resume` for evaluation and "
                           "the report. RUN_DIR is created from the config if it holds no run yet.")
        p.add_argument("run_dir", metavar="RUN_DIR")
        _add_config_args(p)
        p.add_argument("--quiet", action="store_true", help="no progress bars or stage logs")
        p.set_defaults(func=kind)


def _add_label_parser(sub) -> None:
    p = sub.add_parser("label", help="label a run's pool (label RUN_DIR), or any pool into a store",
                       description="Stream images (a folder searched recursively, a file with one path per "
                                   "line, or WebDataset .tar shards such as 'pool-{000..099}.tar') through a "
                                   "teacher checkpoint in eval mode and write top-k pseudo labels as Parquet "
                                   "shards (probabilities: hard labels are chosen when selecting, "
                                   "pseudo.hard). Resumable (finished shards are never recomputed); under torchrun "
                                   "each rank labels its own shards. Unreadable images are skipped and listed.")
    p.add_argument("checkpoint", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="a run directory (its next stage, label-i), or a teacher checkpoint (model.pt)")
    p.add_argument("source", nargs="?", help="with a checkpoint: folder, file list or .tar shard pattern")
    p.add_argument("--out", metavar="STORE_DIR", help="with a checkpoint: output store folder")
    p.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    p.add_argument("--ablation", default=None, help=argparse.SUPPRESS)
    p.add_argument("--top-k", type=int, default=LABEL_DEFAULTS.top_k,
                   help=f"classes kept per image (default: pseudo.top_k's, {LABEL_DEFAULTS.top_k})")
    p.add_argument("--temperature", type=float, default=LABEL_DEFAULTS.temperature,
                   help=f"softmax temperature (default: pseudo.temperature's, {LABEL_DEFAULTS.temperature:g})")
    p.add_argument("--batch-size", type=int, default=LABEL_DEFAULTS.batch_size,
                   help=f"default: pseudo.batch_size's, {LABEL_DEFAULTS.batch_size}")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers decoding images")
    p.add_argument("--shard-size", type=int, default=LABEL_DEFAULTS.shard_size, help="images per shard (folders, file lists)")
    p.add_argument("--precision", default=LABEL_DEFAULTS.precision, choices=("auto", "fp32", "bf16"), help="auto (bf16 only if faster and >= 99.9%% agreement), fp32, bf16")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_label)


def _add_report_parser(sub) -> None:
    p = sub.add_parser("report", help="(re)build a run's HTML and Markdown report",
                       description="Write RUN_DIR/report/report.html (one self-contained file, plots "
                                   "embedded) and RUN_DIR/report/report.md (plots as PNG files beside it) "
                                   "from the files in a run directory: finished, still running or crashed.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.set_defaults(func=cmd_report)


def _add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="write a run's final model as safetensors + timm config.json + model card "
                                      "(+ ONNX), optionally pushed to the Hugging Face hub",
                       description="Write the run's final model (summary.json's final stage) to DIR with timm's "
                                   "save_for_hf: model.safetensors and a timm config.json (architecture, classes, "
                                   "input size and the preprocessing the model was trained with), plus README.md, "
                                   "a model card (data, chain, accuracies, Noisy Student gain, robustness, config). "
                                   "Loadable with timm.create_model('local-dir:DIR', pretrained=True) for timm "
                                   "architectures and with noisystudent.models.export.load_exported for all. "
                                   "Files in DIR that an earlier export did not write are never overwritten.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (new, or one an earlier export wrote)")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx (torch.onnx.export), checked against "
                   "PyTorch with onnxruntime; needs: pip install 'noisystudent[onnx]'")
    p.add_argument("--push-to-hub", metavar="REPO_ID", default=None,
                   help="then upload DIR to this Hugging Face hub repository (created if needed; uses your "
                        "huggingface_hub login or HF_TOKEN)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    p.add_argument("--license", default="apache-2.0", help="the model card's license (hub identifier; default "
                   "apache-2.0): the license of your data may decide it")
    p.set_defaults(func=cmd_export)


def _add_predict_parser(sub) -> None:
    p = sub.add_parser("predict", help="classify images with a trained model: top-k classes to CSV, JSONL or Parquet",
                       description="Classify images (folders searched recursively, file lists, WebDataset .tar "
                                   "shards or image files) with a run's final model, a model.pt or a folder "
                                   "`noisystudent export` wrote, preprocessed as the labeler does (the "
                                   "checkpoint's size, crop, interpolation, mean and std). Writes one row per "
                                   "image in the sources' order: image, class_1, prob_1, ..., class_K, prob_K; "
                                   "unreadable images are skipped and listed in OUT.unreadable.tsv.")
    p.add_argument("source", nargs="+", metavar="SOURCE", help="folder, file list (.txt), .tar shards "
                   "('pool-{000..009}.tar') or image files")
    p.add_argument("--model", required=True, metavar="RUN_DIR|MODEL.pt|EXPORT_DIR", help="the model to use")
    p.add_argument("--out", required=True, metavar="FILE", help="output: .csv, .jsonl or .parquet (replaced "
                   "if it exists, only once complete)")
    p.add_argument("--top-k", type=int, default=5, help="classes per image, best first (default 5)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers decoding images "
                   "(default: the cores less one, at most 8)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="fp32, or bf16 autocast")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)


def _add_models_parser(sub) -> None:
    p = sub.add_parser("models", help="list the paper's model family and the chain presets",
                       description="EfficientNet-B0..B7, L0, L1, L2 and the CPU nets: parameters and "
                                   "multiply-adds (measured on the meta device), train and test "
                                   "resolution, dropout and stochastic depth defaults, released Noisy "
                                   "Student weights; then the chain presets.")
    p.set_defaults(func=cmd_models)


def _add_config_parser(sub) -> None:
    p = sub.add_parser("config", help="print the resolved config, or the configuration reference",
                       description="Print the config after defaults and overrides, as YAML; with "
                                   "--markdown, the reference of every key (docs/configuration.md).")
    _add_config_args(p)
    p.add_argument("--markdown", action="store_true", help="print the configuration reference")
    p.add_argument("--list", action="store_true",
                   help="list the configs shipped with the package (usable by name: run fashion-mnist)")
    p.set_defaults(func=cmd_config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="noisystudent",
        description="Noisy Student self-training: teacher -> pseudo labels -> noisy, equal-or-larger "
                    "students, iterated; fix-res fine-tune; robustness evaluation.")
    parser.add_argument("--version", action="version", version=version_line(),
                        help="print the version of noisystudent and of torch, torchvision and timm, then exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run_parser(sub)
    _add_evaluate_parser(sub)
    _add_stage_commands_parser(sub)
    _add_label_parser(sub)
    _add_report_parser(sub)
    _add_export_parser(sub)
    _add_predict_parser(sub)
    _add_models_parser(sub)
    _add_config_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    configure_cpu()  # first: the thread count must be chosen before anything imports torch
    args = build_parser().parse_args(argv)
    args.as_command = argv is None  # a command's process (not a call from Python code): see startup_imports
    quiet = getattr(args, "quiet", False)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING if quiet else logging.INFO)
    console.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("noisystudent")
    logger.setLevel(logging.INFO)  # the run's log file gets everything; the console may not
    logger.addHandler(console)
    restore_sigterm = _stop_on_sigterm()
    try:
        return args.func(args)
    except TrainingPreempted as e:  # SIGTERM: a checkpoint was written; exit as the signal would
        print(f"noisystudent: {one_line(e)}", file=sys.stderr)
        return 143
    except NoisyStudentError as e:
        print(f"noisystudent: error: {one_line(e)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `noisystudent config NAME | head`: the reader has gone; nothing to say
        try:  # Python flushes stdout again at exit: /dev/null takes what is left instead of a traceback
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is not a file (main() called from Python code)
            pass
        return 141  # as a shell reports a command ended by SIGPIPE
    except OSError as e:  # a full disk outside the atomic writers (a log line, a library's file)
        from .runtime.files import is_storage_error, write_error

        if not is_storage_error(e):
            raise
        print(f"noisystudent: error: {write_error(e, e.filename)}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # under torchrun: DDP's all-reduce in backward when a peer died
        from .runtime.distributed import collective_failure

        failure = collective_failure(e) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
        if failure is None:
            raise
        if getattr(args, "resume", None) or getattr(args, "out", None):
            failure.run_dir = args.resume or args.out
        print(f"noisystudent: error: {failure}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("noisystudent: interrupted", file=sys.stderr)
        return 130
    except Terminated:  # SIGTERM outside training: finished stages and label shards are on disk
        hint = getattr(args, "resume_hint", None) or (
            "run the same command again" if args.command in ("label", "evaluate") else "")
        print(f"noisystudent: stopped by SIGTERM{'; what finished is kept: ' + hint if hint else ''}",
              file=sys.stderr)
        return 143
    finally:
        logger.removeHandler(console)
        restore_sigterm()
        if argv is None:  # a command, whose process exits next (not a call from Python code)
            # Python's last garbage collections at exit walk torch's whole heap, about a second of
            # CPU; objects frozen here are skipped by them. atexit handlers and the modules'
            # teardown still run as before (issue 28).
            gc.freeze()
            if "triton" in sys.modules:
                # triton's nanobind extension (triton 3.9, which torch 2.15 imports with torch)
                # reports every instance of it still alive at exit as leaked (~35 lines of
                # "nanobind: leaked ..."); frozen objects are never freed, so they go back to the
                # collector at exit, the saving above given up for a clean end
                atexit.register(gc.unfreeze)


if __name__ == "__main__":
    sys.exit(main())
