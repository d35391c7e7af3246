"""Streaming certification: certify inputs that arrive in batches, chunk by chunk, resumably.

This file's one job: a trained run directory's ensemble certifies a stream
of new inputs of any length with memory that does not grow with the number of inputs
(apart from the storage-update store, which by design keeps every certified ball:
4 D + 32 bytes per stored input, and its search temporaries, bounded), and a job killed at
any moment continues where it stopped.

Per chunk of `chunk_size` inputs (`RunCertifier.certify`): per-input sigma (RAB: sigma0;
Cert-SSB: the pipeline's sigma search, `certssb.smoothing.sigma.optimize_sigma` on the run's base
model, with SIGMA-stream ids STREAM_ID_OFFSET + stream index), the votes of every model
group (the groups stay loaded when they fit in memory, else are re-read per chunk), the
certificates, then the storage update (one store continued across chunks, queried in
arrival order) and one checkpoint, written in this order, each atomically:

    <out>/chunks/chunk-NNNNN.safetensors  the chunk's certificates and the store rows it added
    <out>/progress.json                   the commit record: inputs done, per-chunk sha256 of
                                          the file and of the inputs it was computed from

A rerun with the same arguments verifies the committed chunks (a missing, truncated or
altered chunk file is redone, with every chunk after it), checks that the inputs are the
same ones (their sha256), rebuilds the store from the chunks' rows and goes on; every
output is then identical, byte for byte, to an uninterrupted run's. When progress.json
itself is damaged, the chunks are recovered from their own embedded checksums. At the end:
`certificates.csv` (assembled part by part from the chunk files; the run directory's
columns), `regions.safetensors` (the store: `RegionStore.load`, `certify --regions`) and
`summary.json` (deterministic: no timings).

Example::

    from certssb.runner.stream import InputFile, RunCertifier, certify_stream
    run = RunCertifier("runs/mnist", method="cert-ssb")
    inputs = InputFile("new.npz", run.image_shape, num_classes=run.num_classes)
    summary = certify_stream(run, inputs, "runs/mnist/stream-1", chunk_size=1000, total=len(inputs))
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch

from ..attacks import input_trigger_norms
from ..certify.bounds import poison_budget
from ..certify.region_file import UPDATE_KINDS
from ..certify.regions import RegionStore
from ..certify.votes import Certificates, Votes, certify_votes, collect_votes
from ..core.files import AtomicFile, atomic_write_json, read_json, save_tensors, sha256_file
from ..errors import CertssbError, CheckpointError
from ..kernels import using_backend
from ..models import build_model, count_parameters
from ..report.certificates import CSV_COLUMNS, certificate_lines
from ..report.metrics import StreamTally
from ..smoothing.ensemble import free_bytes
from ..smoothing.sigma import optimize_sigma
from .config import resolve_device
from .lock import run_lock
from .pipeline import build_trigger, sigma_search
from .rundir import RunDir
from .stream_chunks import (CHUNK_FORMAT, FORMAT_VERSION, PROGRESS_FORMAT, chunk_path, content_sha256,
                            load_progress, read_chunk, reserve_rows, sha_json, store_from_chunks)
from .stream_inputs import InputFile, check_inputs, inputs_sha256, rechunk

__all__ = ["STREAM_ID_OFFSET", "RunCertifier", "InputFile", "certify_stream", "check_inputs", "read_chunk",
           "format_summary", "KINDS"]

# SIGMA-stream ids of streamed inputs: stream input i -> 3 * 2^30 + i (training samples use
# 0.., clean test 2^30.., triggered test 2^31..: `certssb.smoothing.noise.SPLIT_OFFSETS`), so a stream
# never shares a sigma-search draw with the run's own inputs.
STREAM_ID_OFFSET = 3 << 30
# region_update codes of a chunk file (-1: storage update off)
KINDS = UPDATE_KINDS
# The ensemble stays loaded between chunks when its weights take at most this share of free memory.
MODEL_MEMORY_SHARE = 0.25


# ============================================================================ the run's ensemble
class RunCertifier:
    """A trained run directory's ensemble, loaded once to certify new inputs chunk by chunk.

    Args:
        run_dir: a run directory written by `certssb train` / `run` (config.json, models/...).
        method: "cert-ssb" or "rab"; default: cert-ssb when the run trained it, else rab.
        bound, alpha, device, backend, eval_batch_size: default to the run's config.
        keep_models: keep every model group in memory between chunks (True), re-read the
            groups from disk for every chunk (False), or decide from the weights' size: kept
            when they take at most MODEL_MEMORY_SHARE of free memory (None).

    Nothing is written. `certify(x, start)` returns the `Certificates` of inputs
    x [b, C, H, W] (float32 in [0, 1]) that sit at positions start..start+b-1 of a stream
    (the position picks their sigma-search noise; votes do not depend on it).
    Example::

        run = RunCertifier("runs/digits", method="rab")
        cert = run.certify(x)        # cert.predict, cert.radius, cert.abstain, cert.sigma
    """

    def __init__(self, run_dir: str | os.PathLike, *, method: Optional[str] = None,
                 bound: Optional[str] = None, alpha: Optional[float] = None, device: Optional[str] = None,
                 backend: Optional[str] = None, eval_batch_size: Optional[int] = None,
                 keep_models: Optional[bool] = None, log: Optional[Callable[[str], None]] = None) -> None:
        log = log or (lambda s: None)
        rundir = RunDir.open(run_dir, {"bound": bound, "alpha": alpha, "device": device, "backend": backend,
                                       "eval_batch_size": eval_batch_size})
        self.path = rundir.path
        self.cfg = cfg = rundir.config.resolve()
        if method is None:
            method = "cert-ssb" if "cert-ssb" in cfg.methods else cfg.methods[0]
        if method not in ("cert-ssb", "rab"):
            raise CertssbError(f"unknown method {method!r}; choose cert-ssb or rab")
        self.method = method
        self.mode = "rab" if method == "rab" else "paper"
        self.device = resolve_device(cfg.device)
        self.ens = rundir.ensemble(method)
        spec = self.ens.spec
        self.image_shape = (spec.in_channels, *spec.image_size)
        self.num_classes = spec.num_classes
        self.models = spec.models
        self.search = None
        self.base = None
        base_sha = None
        if method == "cert-ssb":
            self.sigma_train_min = float(rundir.sigma({"train": None})["train"].min())
            self.search = sigma_search(cfg)
            self.search.validate()
            self.base, base_sha = rundir.base_model(spec.arch, spec.in_channels, spec.num_classes, spec.image_size)
            self.base.to(self.device).eval()
        else:
            self.sigma_train_min = float(cfg.sigma0)
        self.trigger_norm = rundir.trigger_norm()
        self.trigger = build_trigger(cfg, self.image_shape)  # each input's own trigger norm: poison budget
        weights = 4 * count_parameters(build_model(spec.arch, spec.in_channels, spec.num_classes, spec.image_size))
        self.model_bytes = weights * spec.models
        if keep_models is None:
            keep_models = self.model_bytes <= MODEL_MEMORY_SHARE * free_bytes(self.device)
        self._groups = list(self.ens.iter_groups(device=self.device)) if keep_models else None
        if not keep_models:
            log(f"stream: the {spec.models} models ({self.model_bytes / 2**20:.0f} MiB) are re-read for every chunk")
        manifest = read_json(self.ens.manifest_path)
        self.fingerprint = {
            "run_config": sha_json(rundir.saved["config"]), "method": method, "bound": cfg.bound,
            "alpha": cfg.alpha, "models": spec.models, "ensemble": spec.fingerprint,
            "model_sha256": sha_json(sorted((k, v["sha256"]) for k, v in manifest["finished"].items())),
            "base_sha256": base_sha, "sigma0": cfg.sigma0, "sigma_train_min": self.sigma_train_min,
            "search": None if self.search is None else self.search.as_dict(), "seed": cfg.seed,
            "eval_batch_size": cfg.eval_batch_size, "backend": cfg.backend, "device": self.device.type,
            "image_shape": list(self.image_shape), "num_classes": self.num_classes,
            "trigger_norm": self.trigger_norm}

    # ---------------------------------------------------------------- per chunk
    def sigma(self, x: torch.Tensor, start: int = 0, id_offset: int = STREAM_ID_OFFSET) -> torch.Tensor:
        """sigma [b] float32 of inputs x at stream positions start..: sigma0 (rab), else the sigma search."""
        b = x.shape[0]
        if self.method == "rab":
            return torch.full((b,), float(self.cfg.sigma0), dtype=torch.float32)
        if start < 0 or id_offset < 0 or id_offset + start + b > (1 << 32):
            raise CertssbError(f"stream positions {start}..{start + b - 1} do not fit the sigma-search ids "
                               f"(offset {id_offset}, ids below 2^32); certify at most "
                               f"{(1 << 32) - id_offset} inputs per stream")
        ids = torch.arange(start, start + b, dtype=torch.int64) + int(id_offset)
        with using_backend(self.cfg.backend):
            return optimize_sigma(self.base, x, ids, self.search, seed=self.cfg.seed,
                                  batch_size=max(1, self.cfg.eval_batch_size // self.search.draws),
                                  device=self.device)

    def votes(self, x: torch.Tensor, sigma: torch.Tensor) -> Votes:
        """Votes of every model on x with noise levels sigma (exact integer accumulators)."""
        groups = self._groups if self._groups is not None else self.ens.iter_groups(device=self.device)
        with using_backend(self.cfg.backend):
            return collect_votes(groups, x, sigma, seed=self.cfg.seed, num_classes=self.num_classes,
                                 batch_size=self.cfg.eval_batch_size, device=self.device)

    def certify(self, x: torch.Tensor, start: int = 0, id_offset: int = STREAM_ID_OFFSET) -> Certificates:
        """Certificates (before any storage update) of inputs x [b, C, H, W] at stream positions start.."""
        x = check_inputs(x, self.image_shape, where=f"inputs from stream position {start}")
        sigma = self.sigma(x, start, id_offset)
        votes = self.votes(x, sigma)
        with using_backend(self.cfg.backend):
            return certify_votes(votes, sigma, bound=self.cfg.bound, alpha=self.cfg.alpha, mode=self.mode,
                                 sigma_train_min=self.sigma_train_min)


# ============================================================================ the job
def _csv_lines(t: dict[str, torch.Tensor]) -> str:
    """The certificate CSV rows of one chunk file (its region_update codes named, -1 left empty)."""
    kinds = [KINDS[c] if c >= 0 else "" for c in t["region_update"].tolist()]
    return certificate_lines({k: v for k, v in t.items() if not k.startswith("seg_")}, kinds)


def certify_stream(run: RunCertifier | str | os.PathLike, batches: Iterable, out_dir: str | os.PathLike, *,
                   chunk_size: int = 1000, storage_update: Optional[bool] = None,
                   regions: RegionStore | str | os.PathLike | None = None, id_offset: int = STREAM_ID_OFFSET,
                   total: Optional[int] = None, progress: bool = False, log: Optional[Callable[[str], None]] = None,
                   **run_options: Any) -> dict:
    """Certify a stream of inputs chunk by chunk into `out_dir`, resuming an interrupted job there.

    Args:
        run: a `RunCertifier`, or a run directory (then `run_options` go to RunCertifier:
            method, bound, alpha, device, backend, eval_batch_size, keep_models).
        batches: an iterable of input batches: tensors [b, C, H, W] (uint8 pixels or floats in
            [0, 1]), or (x, y) pairs with task labels y [b] (all batches or none); an
            `InputFile` yields such pairs. Batches are regrouped into chunks of `chunk_size`.
        out_dir: where the chunks, progress.json and the final outputs go.
        storage_update: run the storage-update certifier over the stream (default: the run's
            setting, for cert-ssb only, as the pipeline's headline numbers).
        regions: a region store (or its file) that the storage update continues; default empty.
        id_offset: SIGMA-stream id of stream position 0 (Cert-SSB's sigma search).
        total: the number of inputs, if known (progress bar, one reservation of the store).
    Returns:
        the summary (also in out_dir/summary.json) plus "seconds", "inputs_per_s",
        "chunks_resumed" (finished chunks found) and "chunks_done" (chunks computed now).

    Memory is O(chunk_size x (D + M)) plus the loaded models and the store; a rerun after a
    kill continues from the last finished chunk and ends with identical outputs.
    """
    t_start = time.perf_counter()
    log = log or (lambda s: None)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise CertssbError(f"--chunk-size must be an integer >= 1, got {chunk_size!r}")
    if not isinstance(run, RunCertifier):
        run = RunCertifier(run, log=log, **run_options)
    elif run_options:
        raise CertssbError(f"options {sorted(run_options)} apply to a run directory, not to a loaded RunCertifier")
    if storage_update is None:
        storage_update = bool(run.cfg.storage_update and run.method == "cert-ssb")
    base_store: Optional[RegionStore] = None
    if regions is not None and not storage_update:
        log("stream: the storage update is off, so the region store passed is not used")
    if regions is not None and storage_update:
        base_store = regions if isinstance(regions, RegionStore) else RegionStore.load(regions)
        dim = int(np.prod(run.image_shape))
        if base_store.dim is not None and base_store.dim != dim:
            raise CertssbError(f"--regions holds inputs with {base_store.dim} features but the run's have {dim}; "
                               "pass a store written for the same dataset and image size")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    job = {"run": run.fingerprint, "chunk_size": chunk_size, "storage_update": bool(storage_update),
           "regions": None if base_store is None else {
               "n": len(base_store), "queries": base_store.n_queries,
               "sha256": content_sha256({"c": base_store.centres, "l": base_store.labels,
                                          "r": base_store.radii, "q": base_store.queries})},
           "id_offset": int(id_offset)}
    job_sha = sha_json(job)
    with run_lock(out, "certssb certify-stream"):  # one job per output folder
        return _run_job(run, batches, out, job, job_sha, chunk_size, bool(storage_update), base_store,
                        int(id_offset), total, progress, log, t_start)


def _run_job(run: RunCertifier, batches: Iterable, out: Path, job: dict, job_sha: str, chunk_size: int,
             storage_update: bool, base_store: Optional[RegionStore], id_offset: int, total: Optional[int],
             progress: bool, log: Callable[[str], None], t_start: float) -> dict:
    for folder in (out, out / "chunks"):  # temporary files of writes a kill interrupted (we hold the lock)
        for tmp in folder.glob(".*.tmp") if folder.is_dir() else []:
            tmp.unlink(missing_ok=True)
    entries, finished = load_progress(out, job, job_sha, log)
    resumed = len(entries)
    for stale in sorted((out / "chunks").glob("chunk-*.safetensors")) if (out / "chunks").is_dir() else []:
        try:
            if int(stale.stem.split("-")[1]) >= resumed:  # uncommitted, damaged, or after a damaged one
                stale.unlink()
        except ValueError:
            pass
    if resumed:
        log(f"stream: continuing after {resumed} finished chunks ({sum(e['n'] for e in entries)} inputs)")
    dim = int(np.prod(run.image_shape))
    stores: list[RegionStore] = []

    def get_store() -> Optional[RegionStore]:
        """The store after the finished chunks, built on first use (a finished job may not need it)."""
        if not storage_update:
            return None
        if not stores:
            if resumed:
                stores.append(store_from_chunks(out, base_store, dim, entries[:resumed]))
            else:
                stores.append(base_store.copy() if base_store is not None else RegionStore(dim=dim))
        return stores[0]

    progress_path = out / "progress.json"

    def commit(done_finished: bool, outputs: Optional[dict] = None) -> None:
        atomic_write_json(progress_path, {
            "format": PROGRESS_FORMAT, "version": FORMAT_VERSION, "job_sha256": job_sha, "job": job,
            "done": sum(e["n"] for e in entries), "chunks": entries, "finished": done_finished,
            **({"outputs": outputs} if outputs else {})})

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc=f"certify stream ({run.method})", unit="input", leave=False)
    computed = 0
    t_compute = 0.0
    start = 0
    index = 0
    try:
        for x, y in rechunk(batches, run.image_shape, run.num_classes, chunk_size):
            n = x.shape[0]
            in_sha = inputs_sha256(x, y)
            if index < resumed:
                e = entries[index]
                if e["n"] != n or e["inputs_sha256"] != in_sha:
                    raise CertssbError(f"inputs {start}..{start + n - 1} differ from the ones chunk {index} of the "
                                       f"interrupted job in {out} was computed from; pass the same inputs to "
                                       "continue it, or use another output folder")
            else:
                t0 = time.perf_counter()
                if finished:  # more inputs than the finished job had
                    raise CertssbError(f"{out} holds a finished job over {start} inputs but more inputs came; "
                                       "use another output folder for a longer stream")
                entries.append(_certify_chunk(run, x, y, start, index, out, get_store(), id_offset, job_sha,
                                              in_sha, total))
                commit(False)
                computed += 1
                t_compute += time.perf_counter() - t0
            start += n
            index += 1
            if bar is not None:
                bar.update(n)
    finally:
        if bar is not None:
            bar.close()
    if index < resumed:
        raise CertssbError(f"the inputs end after {start} inputs but the interrupted job in {out} had already "
                           f"certified {sum(e['n'] for e in entries)}; pass the same inputs to continue it")
    summary = _finish(run, out, entries, get_store, job, finished and computed == 0, commit)
    seconds = time.perf_counter() - t_start
    done_now = sum(e["n"] for e in entries[resumed:])
    return {**summary, "seconds": round(seconds, 3),
            "inputs_per_s": round(done_now / t_compute, 1) if t_compute > 0 else None,
            "chunks_resumed": resumed, "chunks_done": computed}


def _certify_chunk(run: RunCertifier, x: torch.Tensor, y: Optional[torch.Tensor], start: int, index: int,
                   out: Path, store: Optional[RegionStore], id_offset: int, job_sha: str, in_sha: str,
                   total: Optional[int]) -> dict:
    """Certify one chunk, apply the storage update (when `store` is given), write its file; returns
    its progress entry."""
    n = x.shape[0]
    cert = run.certify(x, start, id_offset)
    t: dict[str, torch.Tensor] = {
        "idx": torch.arange(start, start + n, dtype=torch.int64), "predict_raw": cert.predict.long(),
        "radius_raw": cert.radius.double(), "sigma": cert.sigma.double(), "pA_lower": cert.pa_lower.double(),
        "pB_upper": cert.pb_upper.double(), "abstain": cert.abstain.bool(),
        "radius_conservative": cert.radius_conservative.double()}
    if y is not None:
        t["label"] = y.long()
    counts = None
    stored = 0
    if store is not None:
        reserve_rows(store, n, total - start if total else None)
        n0, q0 = len(store), store.n_queries
        labels, radii, kinds = store.certify_stream(x.reshape(n, -1), t["predict_raw"], t["radius_raw"],
                                                    t["abstain"], progress=False)
        t["predict"], t["radius"] = labels.long(), radii.double()
        t["region_update"] = torch.tensor([KINDS.index(k) for k in kinds], dtype=torch.int8)
        t["query_order"] = torch.arange(q0, q0 + n, dtype=torch.int64)
        stored = len(store) - n0
        t["seg_centres"] = store.centres[n0:].clone()
        t["seg_labels"], t["seg_radii"] = store.labels[n0:].clone(), store.radii[n0:].clone()
        t["seg_queries"] = store.queries[n0:].clone()
        counts = store.counts
    else:
        t["predict"], t["radius"] = t["predict_raw"].clone(), t["radius_raw"].clone()
        t["region_update"] = torch.full((n,), -1, dtype=torch.int8)
        t["query_order"] = torch.full((n,), -1, dtype=torch.int64)
    t["poison_budget"] = poison_budget(t["radius"], run.trigger_norm, input_trigger_norms(run.trigger, x))
    info = {"format": CHUNK_FORMAT, "version": FORMAT_VERSION, "index": index, "start": start, "n": n,
            "job_sha256": job_sha, "inputs_sha256": in_sha, "stored": stored, "counts": counts,
            "content_sha256": content_sha256(t)}
    sha = save_tensors(chunk_path(out, index), t, metadata={"certssb": json.dumps(info)})
    return {"index": index, "start": start, "n": n, "inputs_sha256": in_sha, "sha256": sha, "stored": stored,
            "counts": counts}


def _finish(run: RunCertifier, out: Path, entries: list[dict], get_store: Callable[[], Optional[RegionStore]],
            job: dict, already: bool, commit: Callable[[bool, Optional[dict]], None]) -> dict:
    """certificates.csv (part by part), regions.safetensors and summary.json from the chunk files."""
    paths = {"csv": out / "certificates.csv", "summary": out / "summary.json", "regions": out / "regions.safetensors"}
    if already:
        try:
            prog = read_json(out / "progress.json")
            outs = prog.get("outputs", {})
            if all(paths[k].is_file() and sha256_file(paths[k]) == v for k, v in outs.items()) and outs:
                return read_json(paths["summary"])
        except CheckpointError:
            pass
    tally = StreamTally(run.cfg.radii)
    csv_file = AtomicFile(paths["csv"])
    try:
        csv_file.write(",".join(CSV_COLUMNS) + "\n")
        for e in entries:
            tensors, _ = read_chunk(chunk_path(out, e["index"]), e["sha256"])
            tally.add(tensors)
            csv_file.write(_csv_lines(tensors))
        csv_file.commit()
    except BaseException:
        csv_file.abort()
        raise
    summary = {"format": "certssb.stream-summary", "run": str(run.path), "method": run.method, "mode": run.mode,
               "bound": run.cfg.bound, "alpha": run.cfg.alpha, "models": run.models,
               "storage_update": job["storage_update"], "chunks": len(entries), "chunk_size": job["chunk_size"],
               "trigger_norm": run.trigger_norm, **tally.summary()}
    outputs = {}
    store = get_store()
    if store is not None:
        outputs["regions"] = store.save(paths["regions"])
    atomic_write_json(paths["summary"], summary)
    outputs["summary"] = sha256_file(paths["summary"])
    outputs["csv"] = sha256_file(paths["csv"])
    commit(True, outputs)
    return summary


def format_summary(summary: dict, out_dir: str | os.PathLike) -> str:
    """A few printable lines about a finished stream job (the CLI's output)."""
    n = summary["inputs"]
    lines = [f"certified {n} inputs with {summary['method']} (M={summary['models']}, {summary['bound']}, "
             f"alpha={summary['alpha']}) in {summary['chunks']} chunks: abstain {100 * summary['abstain_rate']:.1f}%, "
             f"mean radius {summary['mean_radius']:.4f}"]
    if "accuracy" in summary:
        ca = summary["certified_accuracy"]
        lines.append(f"accuracy {100 * summary['accuracy']:.1f}%; certified accuracy "
                     + ", ".join(f"r={k}: {100 * v:.1f}%" for k, v in ca.items()))
    if summary["storage_update"]:
        ru = summary["region_update"]
        lines.append(f"storage update: {ru['trim']} trimmed, {ru['align']} aligned, {ru['none']} unchanged")
    if summary.get("chunks_resumed") and not summary.get("chunks_done"):
        lines.append(f"the job in {out_dir} was already complete: nothing was recomputed")
    elif summary.get("chunks_resumed"):
        lines.append(f"continued an interrupted job: {summary['chunks_resumed']} chunks were already done")
    if summary.get("inputs_per_s"):
        lines.append(f"{summary['inputs_per_s']:.1f} inputs/s over the chunks computed now")
    lines.append(f"outputs: {out_dir}/certificates.csv, summary.json"
                 + (", regions.safetensors" if summary["storage_update"] else ""))
    return "\n".join(lines)
