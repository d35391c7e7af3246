"""The `certssb` command line: run, train, certify, certify-stream, report.

User errors (CertssbError) print one message and exit with status 2; --debug
shows the traceback instead.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .attacks.registry import describe_options, trigger_names
from .data import dataset_names
from .runner.config import RunConfig, parse_radii
from .errors import CertssbError
from .certify.bounds import bound_names
from .kernels import BACKENDS


def _classes(text: str):
    from .data import parse_classes
    try:
        return parse_classes(text)
    except CertssbError as e:  # argparse shows ArgumentTypeError messages verbatim
        raise argparse.ArgumentTypeError(str(e)) from None


def _radii(text: str) -> list[float]:
    try:
        return parse_radii(text)
    except CertssbError as e:  # a ValueError: argparse would print only "invalid value"
        raise argparse.ArgumentTypeError(str(e)) from None


def _pixel(text: str) -> list[int]:
    try:
        row, col = (int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROW,COL (two integers), got {text!r}") from None
    return [row, col]


class _TriggerOption(argparse.Action):
    """--trigger-option KEY=VALUE (repeatable) -> a dict; VALUE read as an integer, else a number, else text."""

    def __call__(self, parser, namespace, text, option_string=None):
        key, sep, raw = text.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentError(self, f"expected KEY=VALUE, got {text!r}")
        value: object = raw.strip()
        for kind in (int, float):
            try:
                value = kind(raw)
                break
            except ValueError:
                pass
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest) or {}), key.strip(): value})


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and attack")
    g.add_argument("--dataset", choices=dataset_names(), default="digits",
                   help="digits is embedded (no files needed); default: %(default)s")
    g.add_argument("--data-dir", help="dataset location (else $CERTSSB_DATA, else ../shared/data)")
    g.add_argument("--classes", type=_classes, default=None,
                   help="class ids in task-label order, e.g. 1,0 (MNIST 1 vs 0) or 0,2 "
                        "(CIFAR-10 airplane vs bird); default: all classes")
    g.add_argument("--image-size", type=int, help="resize images to this size (ImageNette, folder)")
    g.add_argument("--max-train", type=int, help="use a seeded subsample of this many training images")
    g.add_argument("--max-test", type=int, help="use a seeded subsample of this many test images")
    g.add_argument("--trigger", choices=trigger_names(), default=None,
                   help="default: onepixel (blending for digits, where one pixel barely poisons)")
    g.add_argument("--delta", type=float, default=1.0, help="nominal L2 norm of the trigger (default 1.0)")
    g.add_argument("--trigger-pixel", type=_pixel, default=None, metavar="ROW,COL",
                   help="position of the one-pixel trigger / centre of the four-pixel trigger "
                        "(default: the image centre; MNIST: RAB's positions 23,23 and 19,19)")
    g.add_argument("--trigger-option", action=_TriggerOption, dest="trigger_options", default=None,
                   metavar="KEY=VALUE", help="a parameter of the chosen trigger, repeatable ("
                   + describe_options() + ")")
    g.add_argument("--poison-rate", type=float, default=None,
                   help="share of training samples poisoned (default 0.02; 0.05 for digits)")
    g.add_argument("--target", type=int, default=None,
                   help="attack target class id (all-to-one); default 0 if among --classes, else the first")
    g.add_argument("--all-to-all", action="store_true", help="relabel each poisoned sample to label + 1")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("smoothing and training")
    g.add_argument("--method", choices=("cert-ssb", "rab", "both"), default="both")
    g.add_argument("--sigma0", type=float, default=0.25, help="global noise level (RAB's sigma)")
    g.add_argument("--sigma-steps", type=int, default=5,
                   help="gradient-ascent steps K of the sigma search (default 5)")
    g.add_argument("--sigma-draws", type=int, default=4,
                   help="noise draws n per sigma step (default 4; each costs a forward and backward "
                        "pass per sample)")
    g.add_argument("--sigma-lr", type=float, help="sigma step size (default 0.1 * sigma0)")
    g.add_argument("--sigma-min", type=float, help="lower clamp of sigma (default sigma0 / 2)")
    g.add_argument("--sigma-max", type=float, help="upper clamp of sigma (default 2 * sigma0)")
    g.add_argument("--models", type=int, help="ensemble size M (default: 32 digits, 50 imagenette, 100 otherwise)")
    g.add_argument("--epochs", type=int, help="epochs per model (default: the paper's per dataset)")
    g.add_argument("--base-epochs", type=int, help="epochs of the sigma search's base model (default: --epochs)")
    g.add_argument("--batch-size", type=int, help="mini-batch size (default: the paper's per dataset)")
    g.add_argument("--lr", type=float, help="Adam learning rate (default: the paper's per dataset)")
    g.add_argument("--arch", help="model architecture (default: chosen by dataset)")
    g.add_argument("--init-weights", metavar="FILE", default=None,
                   help="start every model (ensemble, base, no-defense) from this ResNet-18 checkpoint: "
                        "safetensors or a torchvision-format state dict (read without running code; "
                        "nothing is downloaded); the head is re-initialised for the task's classes. "
                        "resnet18 at --image-size 128 or more only")
    g.add_argument("--group-size", type=int, default=None,
                   help="models trained at once as one vectorized group (default: as many as fit in "
                        "free memory; recorded in the run directory and reused on resume)")


def _add_cert_args(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    g = p.add_argument_group("certification")
    d = (lambda v: v) if defaults else (lambda v: None)
    g.add_argument("--bound", choices=bound_names(), default=d("hoeffding"),
                   help="hoeffding on soft votes (RAB, the paper) or clopper-pearson on hard votes")
    g.add_argument("--alpha", type=float, default=d(0.001), help="failure probability of the bound")
    g.add_argument("--radii", type=_radii, default=None,
                   help="radii of the certified-accuracy table: start:stop:step or a comma list "
                        "(default 0:2.5:0.25; 0:0.25:0.025 for digits)")
    g.add_argument("--no-storage-update", dest="storage_update", action="store_false",
                   default=d(True), help="report Cert-SSB without the storage-update certifier")
    g.add_argument("--region-order", choices=("index", "random"), default=d("index"),
                   help="query order of the storage update (recorded in the certificates)")


def _add_common(p: argparse.ArgumentParser, out_required: bool = False) -> None:
    p.add_argument("--out", required=out_required, default=None if out_required else "runs/latest",
                   help="run directory (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--backend", choices=BACKENDS, default="kernels",
                   help="kernels: the native C++/CUDA ops (default); reference: pure PyTorch, same results")
    p.add_argument("--seed", type=int, default=0, help="run seed: every random choice derives from it")
    p.add_argument("--engine", default="auto",
                   help="precision and execution of the models: auto (fp32 on a CPU, per architecture on a "
                        "GPU), or PRECISION[+OPTION...] with PRECISION fp32, tf32 or bf16 and OPTIONs bmm, "
                        "nchw, compile, graph (CUDA only), e.g. bf16+compile (default auto; recorded)")
    p.add_argument("--eval-batch-size", type=int, default=128,
                   help="noisy images per forward pass in the sigma search and certification (default 128)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="certssb",
        description="Certified backdoor defense by sample-specific randomized smoothing "
                    "(Cert-SSB) and its fixed-noise baseline RAB.")
    parser.add_argument("--version", action="store_true", help="print version and build info")
    sub = parser.add_subparsers(dest="command")
    for name, help_text in (("run", "everything: data, attack, sigma, ensemble, certificates, report"),
                            ("train", "data, attack, sigma and the ensembles (no certification)")):
        p = sub.add_parser(name, help=help_text)
        _add_data_args(p)
        _add_model_args(p)
        _add_cert_args(p)
        _add_common(p)
    p = sub.add_parser("certify", help="certify the trained ensembles of a run directory")
    _add_cert_args(p, defaults=False)
    p.add_argument("--out", required=True, help="the run directory written by `certssb train` or `run`")
    p.add_argument("--regions", metavar="FILE", default=None,
                   help="continue this region store (a regions-<method>-<split>.safetensors of an earlier "
                        "run): each split's storage update starts from it instead of an empty store and "
                        "its query numbers go on from it; the continued stores go to --out as usual")
    p.add_argument("--device", default=None)
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="kernels (native ops) or reference (pure PyTorch); default: the run's")
    p.add_argument("--engine", default=None, help="precision of the votes' forward (see `run --engine`); "
                                                  "default: the run's")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--debug", action="store_true")
    p = sub.add_parser("grid", help="the paper's experiment grid: many runs from experiment files, "
                                    "resumable (finished cells are skipped)")
    p.add_argument("experiments", nargs="*", metavar="EXPERIMENT",
                   help="experiment files (experiments/*.json) or their names; default: every file in "
                        "./experiments")
    p.add_argument("--scale", default="full",
                   help="full (the paper's M and schedules), cpu (reduced, labelled so) or smoke, as the "
                        "experiment file defines them (default %(default)s)")
    p.add_argument("--out", default="runs/grid", help="root of the cell directories (default %(default)s)")
    p.add_argument("--only", action="append", default=[], metavar="AXIS=V[,V...]",
                   help="run only the cells with these axis values, e.g. --only trigger=onepixel "
                        "--only sigma0=0.25,0.5 (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="list the cells and their folders, run nothing")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--group-size", type=int, default=None, help="models trained at once (default: from memory)")
    p.add_argument("--pages", metavar="DIR", default=None,
                   help="afterwards, regenerate the results pages (DIR/<dataset>.md) from --out")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--debug", action="store_true")
    p = sub.add_parser("pages", help="write the results pages (one per dataset) from grid cell directories")
    p.add_argument("--runs", default="runs/grid", help="the grid root (default %(default)s)")
    p.add_argument("--docs", default="docs/results", help="where the pages go (default %(default)s)")
    p.add_argument("--readme", default=None, metavar="FILE",
                   help="also rewrite the results block of this README (between its results markers)")
    p.add_argument("--gpu-checks", metavar="JSON", default=None,
                   help="first keep the full-scale cells of this gpu-checks.json (benchmarks/gpu_checks.sh) under "
                        "DOCS/cells and write the CUDA section of DOCS/training.md from it")
    p.add_argument("--debug", action="store_true")
    p = sub.add_parser("certify-stream", help="certify new inputs (a file or an image folder) with a trained "
                                              "run's ensemble, chunk by chunk; a rerun continues an interrupted job")
    p.add_argument("--out", required=True, help="the run directory written by `certssb train` or `run`")
    p.add_argument("--inputs", required=True, metavar="FILE|DIR",
                   help=".npy, .npz or .safetensors array (x: [N, C, H, W], [N, H, W] or [N, H, W, C]; uint8 "
                        "pixels or floats in [0, 1]; the run's image size) or a folder of images")
    p.add_argument("--labels", metavar="FILE", default=None,
                   help="task labels 0..K-1 (.npy, .npz or text, one per line); default: the y array of --inputs "
                        "if it has one")
    p.add_argument("--stream-out", required=True, metavar="DIR",
                   help="where certificates.csv, regions.safetensors, summary.json and the chunk checkpoints go; "
                        "rerun the same command to continue an interrupted job")
    p.add_argument("--chunk-size", type=int, default=1000, help="inputs per chunk (checkpoint) (default 1000)")
    p.add_argument("--method", choices=("cert-ssb", "rab"), default=None,
                   help="default: cert-ssb when the run trained it, else rab")
    p.add_argument("--bound", choices=bound_names(), default=None, help="default: the run's")
    p.add_argument("--alpha", type=float, default=None, help="default: the run's")
    p.add_argument("--storage-update", dest="storage_update", action="store_true", default=None,
                   help="run the storage-update certifier over the stream (default: on for cert-ssb as the run)")
    p.add_argument("--no-storage-update", dest="storage_update", action="store_false")
    p.add_argument("--regions", metavar="FILE", default=None,
                   help="a region store (e.g. RUN/regions-cert-ssb-clean.safetensors) that the storage update "
                        "continues; default: an empty store")
    p.add_argument("--device", default=None)
    p.add_argument("--backend", choices=BACKENDS, default=None)
    p.add_argument("--eval-batch-size", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--debug", action="store_true")
    p = sub.add_parser("report", help="recompute tables and plots from a run directory's certificates")
    p.add_argument("--out", required=True, help="the run directory")
    p.add_argument("--radii", type=_radii, default=None)
    p.add_argument("--debug", action="store_true")
    return parser


CONFIG_KEYS = ("dataset", "data_dir", "classes", "image_size", "max_train", "max_test", "trigger", "delta",
               "trigger_pixel", "trigger_options",
               "poison_rate", "target", "all_to_all", "method", "sigma0", "sigma_steps", "sigma_draws",
               "sigma_lr", "sigma_min", "sigma_max", "models", "epochs", "base_epochs", "batch_size", "lr",
               "arch", "bound", "alpha", "radii", "storage_update", "region_order", "seed", "device",
               "backend", "out", "eval_batch_size", "group_size", "engine",
               "init_weights")


def _config_from_args(args: argparse.Namespace) -> RunConfig:
    return RunConfig(**{k: getattr(args, k) for k in CONFIG_KEYS})


def _print_summary(summary: dict, out: str) -> None:
    from .report.table import format_table
    print(format_table(summary))
    print(f"\nrun directory: {out} (summary.json, certificates-*.csv, certified_accuracy.png)")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI on argv (default sys.argv[1:]); returns the exit status.

    0 on success; 2 for a user error (bad argument, bad input, unusable file or folder:
    one line `certssb: error: ...`, no traceback; --debug or CERTSSB_DEBUG=1 re-raises
    it with its traceback); 130 when interrupted. Argument errors print argparse's
    usage line and message and also return 2.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2), already printed
        return e.code if isinstance(e.code, int) else 2
    debug = getattr(args, "debug", False) or os.environ.get("CERTSSB_DEBUG") == "1"
    try:
        return _dispatch(parser, args)
    except CertssbError as e:
        if debug:
            raise
        print(f"certssb: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the environment, not a bug: unwritable --out, full disk, missing file
        if debug:
            raise
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"certssb: error: {e.strerror or e}{where}; check that the paths exist and are "
              "writable and that the disk has room (--debug shows the traceback)", file=sys.stderr)
        return 2
    except Exception as e:
        # MemoryError, or torch's OutOfMemoryError (a RuntimeError) on a CPU or GPU
        if debug or not (isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"):
            raise
        print("certssb: error: out of memory; lower --group-size and --eval-batch-size, or --max-train "
              "(--debug shows the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("certssb: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.version:
        from . import __version__, build_info
        print(f"certssb {__version__}; build {build_info()}")
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    from .runner import pipeline
    from .runner.regenerate import regenerate
    from .core.distributed import Dist
    main_rank = Dist.from_env().is_main  # under torchrun only rank 0 prints results
    if args.command in ("run", "train"):
        cfg = _config_from_args(args)
        summary = pipeline.run(cfg, certify=args.command == "run", progress=not args.quiet)
        if not main_rank:
            return 0
        if args.command == "run":
            _print_summary(summary, cfg.out)
        else:
            print(f"trained: {', '.join(summary['methods'])}; certify with `certssb certify --out {cfg.out}`")
        return 0
    if args.command == "certify":
        from .runner.rundir import RunDir
        keys = ("bound", "alpha", "radii", "storage_update", "region_order", "device", "backend", "engine")
        cfg = RunDir.open(args.out, {k: getattr(args, k, None) for k in keys}).config
        regions = None
        if args.regions is not None:
            from .certify.regions import RegionStore
            if not Path(args.regions).is_file():
                raise CertssbError(f"--regions {args.regions} does not exist; pass a region store saved by an "
                                   "earlier run (RUN/regions-<method>-<split>.safetensors)")
            regions = RegionStore.load(args.regions)  # loaded once: the run may overwrite the file
        summary = pipeline.run(cfg, train=False, progress=not args.quiet, regions=regions)
        if main_rank:
            _print_summary(summary, cfg.out)
        return 0
    if args.command == "grid":
        return _grid(args)
    if args.command == "pages":
        from .report.pages import write_pages
        if args.gpu_checks:
            from .report.gpu_checks import import_gpu_checks
            for path in import_gpu_checks(args.gpu_checks, args.docs):
                print(f"wrote {path}")
        for path in write_pages(args.runs, args.docs, readme=args.readme):
            print(f"wrote {path}")
        return 0
    if args.command == "certify-stream":
        from .runner.stream import InputFile, RunCertifier, certify_stream, format_summary
        log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
        run = RunCertifier(args.out, method=args.method, bound=args.bound, alpha=args.alpha, device=args.device,
                           backend=args.backend, eval_batch_size=args.eval_batch_size, log=log)
        inputs = InputFile(args.inputs, run.image_shape, labels=args.labels, num_classes=run.num_classes,
                           batch=max(1, min(args.chunk_size, 4096)))
        summary = certify_stream(run, inputs, args.stream_out, chunk_size=args.chunk_size,
                                 storage_update=args.storage_update, regions=args.regions, total=len(inputs),
                                 progress=not args.quiet, log=log)
        print(format_summary(summary, args.stream_out))
        return 0
    if args.command == "report":
        summary = regenerate(args.out, args.radii)
        _print_summary(summary, args.out)
        return 0
    parser.print_help()
    return 2


def _experiment_files(names: list[str]) -> list[Path]:
    if not names:
        files = sorted(Path("experiments").glob("*.json"))
        if not files:
            raise CertssbError("no experiment files given and ./experiments has none; pass experiment "
                               "files (see experiments/*.json in the certssb repository)")
        return files
    files = []
    for name in names:
        path = Path(name)
        if not path.exists() and not name.endswith(".json"):
            path = Path("experiments") / f"{name}.json"
        files.append(path)
    return files


def _grid(args: argparse.Namespace) -> int:
    from .experiments.grid import Experiment, parse_only, run_grid
    experiments = [Experiment.load(f) for f in _experiment_files(args.experiments)]
    overrides = {k: v for k, v in (("device", args.device), ("group_size", args.group_size)) if v is not None}
    # cells reading the same image files share one decode cache (unless $CERTSSB_CACHE names one)
    shared_cache = "CERTSSB_CACHE" not in os.environ and not args.dry_run
    if shared_cache:
        os.environ["CERTSSB_CACHE"] = str(Path(args.out) / "cache")
    try:
        cells = run_grid(experiments, args.scale, args.out, only=parse_only(args.only), overrides=overrides,
                         dry_run=args.dry_run, progress=not args.quiet,
                         log=lambda s: print(s, file=sys.stderr, flush=True))
    finally:
        if shared_cache:
            del os.environ["CERTSSB_CACHE"]
    counts = {st: sum(c["status"] == st for c in cells) for st in ("done", "skipped", "planned")}
    print(f"grid: {counts['done']} cells run, {counts['skipped']} already finished"
          + (f", {counts['planned']} planned" if args.dry_run else "") + f" (under {args.out})")
    if args.pages and not args.dry_run:
        from .report.pages import write_pages
        for path in write_pages(args.out, args.pages):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
