"""Empirical soundness of the certificates on a small real task.

Trains an ensemble of smoothed models (RAB, one sigma) on digits or MNIST 1-vs-0,
certifies the test set, then counts the certified predictions that change under
(a) test-time perturbations just inside each certified radius (random and
gradient directions; controls outside it) and (b) a backdoor of joint L2 norm
below eps planted in the training set and the test inputs, retrained with the
same seeds. See certssb/experiments/soundness.py for the method.

    python scripts/empirical_soundness.py --smoke --json /tmp/s.json --md /tmp/s.md   # < 30 s
    OMP_NUM_THREADS=1 python scripts/empirical_soundness.py --dataset mnist --models 50 --epochs 2

Writes --json (the full report) and --md (default docs/results/soundness.md);
--render JSON only writes the page again from a saved report.
Exit status 2 with one message on a bad argument (--debug shows the traceback).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without install

from certssb.certify.bounds import BOUNDS  # noqa: E402
from certssb.errors import CertssbError  # noqa: E402
from certssb.core.files import atomic_write_json, atomic_write_text, read_json  # noqa: E402
from certssb.experiments.soundness import (SOUNDNESS_DATASETS, SoundnessConfig, check_report,  # noqa: E402
                               format_markdown, run_soundness)

# The smoke run: 8x8 digits, a handful of models, one epoch; a large alpha so that such a small
# ensemble still certifies some inputs (the numbers mean little, the structure is what CI checks).
SMOKE = dict(dataset="digits", classes=[0, 1], models=6, epochs=1, batch_size=16, lr=3e-3, alpha=0.2,
             max_test=120, control_scales=(4.0,), poisoned=8)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=SOUNDNESS_DATASETS, default="digits")
    p.add_argument("--data-dir", default=None, help="dataset folder (MNIST; else $CERTSSB_DATA or ../shared/data)")
    p.add_argument("--classes", default=None, help="class ids, e.g. 1,0 (default: all digits; MNIST 1,0)")
    p.add_argument("--models", type=int, default=None, help="ensemble size M (default 50)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 5)")
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--max-test", type=int, default=None)
    p.add_argument("--sigma", type=float, default=None, help="the one noise level (default 0.25)")
    p.add_argument("--bound", choices=BOUNDS, default=None, help="default clopper-pearson")
    p.add_argument("--alpha", type=float, default=None, help="default 0.001")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eps-quantile", type=float, default=None,
                   help="backdoor eps = this quantile of the certified radii (default 0.5)")
    p.add_argument("--poisoned", type=int, default=None, help="training samples perturbed (default 16)")
    p.add_argument("--smoke", action="store_true", help="tiny digits run (< 30 s), for CI and tests")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--md", default=str(ROOT / "docs" / "results" / "soundness.md"),
                   help="write the Markdown page here (default docs/results/soundness.md)")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="only write the --md page again from this report (no run)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def config_from(args: argparse.Namespace) -> SoundnessConfig:
    """SoundnessConfig from the flags: --smoke's preset, then any flag given explicitly."""
    base = dict(SMOKE) if args.smoke else {"dataset": args.dataset}
    for name in ("data_dir", "models", "epochs", "max_train", "max_test", "sigma", "bound", "alpha",
                 "eps_quantile", "poisoned"):
        value = getattr(args, name)
        if value is not None:
            base[name] = value
    if not args.smoke:
        base["dataset"] = args.dataset
    base["seed"] = args.seed
    if args.classes is not None:
        try:
            base["classes"] = [int(c) for c in args.classes.split(",")]
        except ValueError:
            raise CertssbError(f"--classes must be comma-separated class ids, got {args.classes!r}") from None
    return SoundnessConfig(**base)


def _relative(path: str) -> str:
    """path relative to the repository root when it lies inside it (for the page), else as given."""
    try:
        rel = os.path.relpath(Path(path).resolve(), ROOT)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        if not args.quiet:
            print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", flush=True)

    try:
        if args.render:
            report = read_json(args.render)
            check_report(report)
            atomic_write_text(args.md, format_markdown(report, _relative(args.render)))
            return 0
        report = run_soundness(config_from(args), log=log)
        check_report(report)
        report["smoke"] = bool(args.smoke)
        report["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
        if args.json:
            atomic_write_json(args.json, report)
        if args.md:
            atomic_write_text(args.md, format_markdown(report, _relative(args.json) if args.json else None))
    except CertssbError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    log(f"done; report: {args.json or '-'}, page: {args.md or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
