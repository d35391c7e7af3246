"""Benchmark the native noise, vote and radius kernels against their baselines, side by side.

    python benchmarks/bench_kernels.py --device cpu --json docs/results/kernels-cpu.json
    python benchmarks/bench_kernels.py --device cuda --json docs/results/kernels-cuda.json
    python benchmarks/bench_kernels.py --markdown docs/results/kernels.md \
        docs/results/kernels-cpu.json docs/results/kernels-cuda.json

Baselines: noise against the pure-PyTorch Philox reference and against plain
`x + sigma * torch.randn(...)` (not reproducible, but the speed a user compares
with); vote against softmax + sum + one-hot argmax counts + topk over the stacked
logits in PyTorch; radius against the PyTorch/SciPy reference of certssb.certify.bounds.
Sizes are the paper's: MNIST 1-vs-0 (M = 1000 models, B = 2115 test inputs,
1x28x28), CIFAR-10 two-class (B = 2000, 3x32x32), ImageNette (B = 64, 3x224x224,
M = 200). The noise op is timed on a block of K models per call (the way
certification and training call it), so its throughput is the figure to read.
On CUDA the noise kernel's bandwidth is compared with the card's measured copy
bandwidth (bytes read + written).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (base_parser, load_json, markdown_table, print_table, record, result,  # noqa: E402
                    timeit, write_json)

from certssb.certify.bounds import certified_radius, pa_lower, radius_proxy as radius_proxy_ref  # noqa: E402
from certssb.kernels.noise import noise  # noqa: E402
from certssb.kernels.radius import certify_radius, radius_proxy  # noqa: E402
from certssb.kernels.vote import vote_accumulate, vote_top2  # noqa: E402
from certssb.smoothing.noise import noisy_copies  # noqa: E402

# name: (B, C, H, W, models M, classes)
TASKS = {"mnist": (2115, 1, 28, 28, 1000, 2), "cifar": (2000, 3, 32, 32, 1000, 2),
         "imagenette": (64, 3, 224, 224, 200, 10)}


def copy_bandwidth(device: torch.device, repeats: int) -> float:
    """GB/s of a plain device-to-device copy (bytes read + written)."""
    n = (1 << 28) if device.type == "cuda" else (1 << 24)
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), device, repeats)
    return 2 * n * 4 / t["median"] / 1e9


def bench_noise(device, smoke, repeats, bw):
    rows = []
    for name, (b, c, h, w, _, _) in TASKS.items():
        if smoke:
            b, k = min(b, 8), 2
        else:
            k = {"cpu": {"mnist": 4, "cifar": 1, "imagenette": 1},
                 "cuda": {"mnist": 64, "cifar": 16, "imagenette": 16}}[device.type][name]
        x = torch.rand(b, c, h, w, device=device)
        sigma = torch.rand(b, device=device) + 0.1
        ids = torch.arange(b, device=device)
        elems = k * x.numel()
        nbytes = 4 * (elems + x.numel())
        fast = timeit(lambda: noise(x, sigma, ids, seed=1, stream=1, k0=0, models=k), device, repeats)
        gbs = nbytes / fast["median"] / 1e9
        tp = f"{elems / fast['median'] / 1e6:.0f} Melem/s, {gbs:.1f} GB/s"
        extra = {"elements": elems, "bytes": nbytes, "gb_per_s": gbs}
        if bw:
            tp += f" ({100 * gbs / bw:.0f}% of copy)"
            extra["fraction_of_copy_bandwidth"] = gbs / bw
        case = f"noise {name} K={k} B={b} {c}x{h}x{w}"
        ref_reps = 1 if (device.type == "cpu" and not smoke) else repeats
        ref = timeit(lambda: noisy_copies(x, sigma, seed=1, stream=1, models=list(range(k)), ids=ids,
                                          backend="reference"), device, ref_reps, warmup=0 if ref_reps == 1 else 1)
        rows.append(result(case, fast, "philox reference (PyTorch)", ref, tp, **extra))
        randn = timeit(lambda: x.unsqueeze(0) + sigma.view(1, b, 1, 1, 1) * torch.randn(
            (k, *x.shape), device=device), device, repeats)
        rows.append(result(case, fast, "randn * sigma + x", randn, tp, **extra))
    return rows


def stacked_vote_baseline(logits):
    """softmax + sum + argmax counts + topk in PyTorch over the stacked [M, B, C] logits."""
    soft = torch.softmax(logits.double(), dim=-1).sum(0)
    hard = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).sum(0)
    return soft.topk(2, dim=1), hard


def bench_vote(device, smoke, repeats):
    rows = []
    for name, (b, _, _, _, m, classes) in TASKS.items():
        if smoke:
            b, m = min(b, 16), 8
        logits = torch.randn(m, b, classes, device=device)
        soft = torch.zeros(b, classes, dtype=torch.int64, device=device)
        hard = torch.zeros_like(soft)

        def fast_fn():
            soft.zero_()
            hard.zero_()
            vote_accumulate(logits, soft, hard)
            return vote_top2(soft, hard, by_count=False)

        fast = timeit(fast_fn, device, repeats)
        base = timeit(lambda: stacked_vote_baseline(logits), device, repeats)
        tp = f"{m * b / fast['median'] / 1e6:.1f} M votes/s"
        rows.append(result(f"vote {name} M={m} B={b} C={classes}", fast, "softmax+sum+topk (PyTorch)", base,
                           tp, votes=m * b))
    return rows


def bench_radius(device, smoke, repeats):
    rows = []
    b = 64 if smoke else 2115
    m, alpha = 1000, 0.001
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(500, m + 1, (b,), generator=g)
    score = counts.double() / m
    sigma = torch.rand(b, generator=g, dtype=torch.float64) * 0.5 + 0.1
    for bound in ("hoeffding", "clopper-pearson"):
        c_d, s_d, sig_d = counts.to(device), score.to(device), sigma.to(device)
        fast = timeit(lambda: certify_radius(s_d, c_d, sig_d, models=m, alpha=alpha, num_classes=2,
                                             bound=bound), device, repeats)

        def ref():
            pa = pa_lower(bound, top_score=score, top_count=counts, m=m, alpha=alpha, num_classes=2)
            return certified_radius(pa, sigma)

        base = timeit(ref, torch.device("cpu"), repeats)
        rows.append(result(f"radius_certify {bound} B={b} M={m}", fast, "bounds.py reference (CPU)", base,
                           f"{b / fast['median'] / 1e6:.2f} M certificates/s"))
    probs = torch.softmax(torch.randn(b, 2, generator=g), -1).to(device)
    sig = (torch.rand(b, generator=g) * 0.5 + 0.1).to(device)

    def fwd_bwd(fn):
        def run():
            p = probs.clone().requires_grad_(True)
            s = sig.clone().requires_grad_(True)
            fn(p, s).sum().backward()
        return run

    fast = timeit(fwd_bwd(lambda p, s: radius_proxy(p, s)), device, repeats)
    base = timeit(fwd_bwd(lambda p, s: radius_proxy_ref(p, s)), device, repeats)
    rows.append(result(f"radius_proxy fwd+bwd B={b} C=2", fast, "autograd of bounds.radius_proxy", base,
                       f"{b / fast['median'] / 1e6:.2f} M samples/s"))
    return rows


def certification_context(device, smoke, repeats):
    """Forward time of the paper's MNIST CNN on the MNIST test set for all M models (what vote and
    radius must not dominate)."""
    from certssb.models import build_model

    b, c, h, w, m, classes = TASKS["mnist"]
    if smoke:
        b, m = 16, 8
    model = build_model("mnist-cnn", in_channels=c, num_classes=classes, image_size=(h, w)).to(device).eval()
    x = torch.rand(b, c, h, w, device=device)
    with torch.no_grad():
        t = timeit(lambda: model(x), device, repeats)
    return t["median"] * m


def main(argv=None) -> int:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--markdown", default=None, help="write docs/results/kernels.md from JSON files and exit")
    p.add_argument("inputs", nargs="*", help="JSON files for --markdown")
    args = p.parse_args(argv)
    if args.markdown:
        return write_markdown(args.markdown, args.inputs)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no GPU is visible")
    torch.manual_seed(0)
    repeats = 2 if args.smoke else args.repeats
    bw = copy_bandwidth(device, repeats) if device.type == "cuda" else None
    results = bench_noise(device, args.smoke, repeats, bw)
    results += bench_vote(device, args.smoke, repeats)
    results += bench_radius(device, args.smoke, repeats)
    forward_s = certification_context(device, args.smoke, repeats)
    vote_s = next(r["fast_s"] for r in results if r["case"].startswith("vote mnist"))
    radius_s = next(r["fast_s"] for r in results if r["case"].startswith("radius_certify clopper"))
    context = {"mnist_cnn_forward_all_models_s": forward_s, "vote_plus_radius_s": vote_s + radius_s,
               "vote_radius_share_of_certification": (vote_s + radius_s) / (forward_s + vote_s + radius_s)}
    data = record(device, results, smoke=args.smoke, copy_bandwidth_gb_s=bw, certification=context)
    print_table(results)
    if bw:
        print(f"copy bandwidth: {bw:.0f} GB/s")
    print(f"certification of MNIST (M={TASKS['mnist'][4]}): model forwards {forward_s:.3f} s, "
          f"vote + radius {vote_s + radius_s:.4f} s "
          f"({100 * context['vote_radius_share_of_certification']:.2f}% of the total)")
    write_json(args.json, data)
    return 0


def _speedups(data: dict, prefix: str, baseline: str) -> list[float]:
    return [r["speedup"] for r in data["results"] if r["case"].startswith(prefix) and r["baseline"] == baseline]


def targets_section(runs: list[dict]) -> list[str]:
    """The issue's targets, read off the measured numbers (met or not, said plainly)."""
    out = ["## Targets", ""]
    for data in runs:
        if data.get("smoke"):
            continue
        if data["device_type"] == "cpu":
            rnd = _speedups(data, "noise", "randn * sigma + x")
            ref = _speedups(data, "noise", "philox reference (PyTorch)")
            vote = _speedups(data, "vote mnist", "softmax+sum+topk (PyTorch)")
            out += [f"- CPU: noise kernel {min(rnd):.1f}-{max(rnd):.1f}x `randn * sigma + x` (target >= 1x: "
                    f"{'met' if min(rnd) >= 1 else 'NOT met'}) and {min(ref):.0f}-{max(ref):.0f}x the PyTorch "
                    f"Philox reference (target >= 10x: {'met' if min(ref) >= 10 else 'NOT met'}); vote "
                    f"{vote[0]:.2f}x its PyTorch baseline at the MNIST size (target >= 3x: "
                    f"{'met' if vote[0] >= 3 else 'NOT met'})."]
        else:
            fr = [r["fraction_of_copy_bandwidth"] for r in data["results"]
                  if "fraction_of_copy_bandwidth" in r and r["baseline"] == "randn * sigma + x"]
            ctx = data.get("certification", {})
            share = ctx.get("vote_radius_share_of_certification", float("nan"))
            out += [f"- {data['device']}: noise kernel at {100 * min(fr):.0f}-{100 * max(fr):.0f} % of the "
                    f"measured copy bandwidth (target > 60 %: {'met' if min(fr) > 0.6 else 'NOT met'}); "
                    f"vote + radius are {100 * share:.2f} % of a certification of MNIST with M = 1000 "
                    f"(target: never the bottleneck: {'met' if share < 0.05 else 'NOT met'})."]
    out += ["", "Notes: on the GPU the noise kernel runs at the same element rate (about 145 G/s) for every "
            "image size, far below memory speed, so arithmetic limits it; the float64 Box-Muller (kept in "
            "float64 so every element matches the reference to 1e-6) is the suspect, but cheaper float64 "
            "division and square root did not move it and it has not been profiled yet. The CUDA "
            "vote kernel walks the models of an input in one thread, so at M = 1000 it is slower than "
            "PyTorch's fused softmax + sum, though still a negligible share of certification; splitting "
            "models over threads with integer atomics (exact, since soft votes are fixed point) is the "
            "next step.", ""]
    return out


def write_markdown(path: str, inputs: list[str]) -> int:
    from certssb.core.files import atomic_write_text

    parts = ["# Kernel benchmarks", "",
             "Generated by `python benchmarks/bench_kernels.py --markdown docs/results/kernels.md "
             + " ".join(inputs) + "` from the JSON written by `bench_kernels.py --device ... --json ...`.",
             "Times are medians of repeats; speedup = baseline / fast.", ""]
    for f in inputs:
        data = load_json(f)
        parts += [f"## {data['device_type'].upper()}: {data['device']}", "", markdown_table(data), ""]
        if data.get("copy_bandwidth_gb_s"):
            parts += [f"Measured copy bandwidth: {data['copy_bandwidth_gb_s']:.0f} GB/s.", ""]
        ctx = data.get("certification")
        if ctx:
            parts += [f"Certification of MNIST 1-vs-0 with M = {TASKS['mnist'][4]}: the model forwards take "
                      f"{ctx['mnist_cnn_forward_all_models_s']:.3f} s, vote + radius "
                      f"{ctx['vote_plus_radius_s'] * 1e3:.2f} ms "
                      f"({100 * ctx['vote_radius_share_of_certification']:.2f}% of the total).", ""]
    parts += targets_section([load_json(f) for f in inputs])
    atomic_write_text(path, "\n".join(parts))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
