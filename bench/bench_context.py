"""Context-maintenance benchmark: how the cost of a frame grows with story length, per context mode.

One model is loaded once; for each mode (``recompute``: rebuild ``[BOS] + window`` every frame, the
release's plain script; ``window``: keep the KV cache, drop frames leaving the window; ``sink``: as
window, plus attention-sink tokens of evicted frames) a story is told frame by frame through
``StoryEngine.step`` and timed at a few frame numbers. Printed side by side:

- per-frame LLM time (text decoding + image block + context update) at frames 2, 10, 25, 50, with a
  breakdown: ``context`` (``state_after``: the whole prefill in recompute mode, a store lookup in the
  others), ``write`` (``_write``: text decoding + image block), ``update`` (``_remember``: feeding the new
  frame into the cached state and evicting);
- the cost of ``branch`` and ``regenerate(part="text")`` at frame 20 relative to a plain step there
  (window mode, KV store warm as in the app; and, for reference, a branch with a cold store);
- memory: the KV store size in bytes per mode (and the size of one state), the process peak RSS
  (``resource.getrusage``) and, on CUDA, ``torch.cuda.max_memory_allocated``;
- ratios: frame 25 / frame 2 per mode, recompute / window at frame 25;
- side by side: once the stories are built, a step from frame k-1's cached state for every measured k and
  mode, interleaved and repeated (``--rounds``): min, median and the ratios to the first measured frame, which
  no load that comes and goes between frame 2 and frame 50 can skew.

Painting is left out of the frame times: the engine's ``_paint`` is replaced on the benchmark's engine
instances by a stub returning a fixed blank picture, and ``pipe.paint`` (the preset's diffusion steps)
is timed on its own and reported separately. Frame 0 is the opening (the person's picture and text);
frame k is the k-th generated frame, written with frames max(0, k-window)..k-1 in context.

Fair comparison: decoding is greedy and every frame's text is forced to exactly ``--tokens`` tokens
(default: the preset's ``max_new_tokens``): the benchmark swaps ``seedstory.engine.DecodingConfig`` for a
subclass with ``min_new_tokens = max_new_tokens``, which bans EOS and ``<img>`` until then. The engine has
no public option for this; ``--free-length`` turns the forcing off (then lengths vary and tokens/frame is
reported alongside). Medians of ``--repeats`` runs at the measured frames (a repeated step is a sibling
of the same parent, deleted again, so the store stays as the app would have it).

The modes run interleaved frame by frame (frame k in every mode, rotating which goes first, then frame
k+1), so that noise from a shared machine hits them alike; their stores then coexist, and the process
peaks are for all modes together. ``--sequential`` runs one mode after the other instead and reports
per-mode peaks (the RSS peak is cumulative, so run one ``--modes`` at a time for clean per-mode RSS).

Usage::

    python bench/bench_context.py --preset tiny --frames 12                 # smoke run, seconds
    python bench/bench_context.py --preset bench-small --frames 50          # CPU, a few minutes
    python bench/bench_context.py --preset bench-small --frames 50 --device cuda --dtype bf16 --json out.json

Full size with random weights on a GPU: the ``seed-story-random`` preset (the release's sizes, built on the GPU
in bf16, about 23 GB)::

    python bench/bench_context.py --preset seed-story-random --frames 50 --device cuda --dtype bf16 --json full.json

(the KV store holds the frames in context, ~0.5 MiB per context token at 7B size, so give ``--kv-budget-mb``
room or expect LRU evictions). ``bench/bench_fullsize.py`` times a whole frame at that size, per runtime option.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from contextlib import contextmanager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from seedstory.quiet import quiet_libraries  # noqa: E402
from seedstory.threads import passive_openmp  # noqa: E402

passive_openmp()
quiet_libraries()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import seedstory.engine as engine_module  # noqa: E402
from seedstory.engine import MODES, KVStore, StoryEngine  # noqa: E402
from seedstory.models.agent import DecodingConfig  # noqa: E402
from seedstory.models.kv import kv_length  # noqa: E402
from seedstory.pipeline import SeedStoryPipeline  # noqa: E402

OPENING_TEXT = "Once upon a time, a small fox found a brass key under the old oak tree near the river."
MiB = 2**20


# -- helpers ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _FixedLengthDecoding(DecodingConfig):
    """Decoding that never stops before ``max_new_tokens``: every frame's text has the same length."""

    def __post_init__(self):
        self.min_new_tokens = self.max_new_tokens


@contextmanager
def fixed_text_length(enabled: bool):
    saved = engine_module.DecodingConfig
    if enabled:
        engine_module.DecodingConfig = _FixedLengthDecoding
    try:
        yield
    finally:
        engine_module.DecodingConfig = saved


def rss_peak_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024  # KiB on Linux


def rss_now_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class Clock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


class Probe:
    """Times the phases of the engine's frame operations by wrapping methods on one engine instance,
    and turns painting off there (a blank picture instead)."""

    def __init__(self, engine: StoryEngine, clock: Clock, blank: Image.Image):
        self.engine, self.clock = engine, clock
        self.phases = {"context": 0.0, "write": 0.0, "update": 0.0}
        self.ctx_tokens = 0
        self.fresh_builds = 0
        orig_state_after, orig_write, orig_remember = engine.state_after, engine._write, engine._remember
        orig_fresh = engine._fresh_state

        def timed(name, fn):
            def wrapper(*a, **kw):
                t = clock()
                out = fn(*a, **kw)
                self.phases[name] += clock() - t
                if name == "context":
                    self.ctx_tokens = kv_length(out.parts)
                return out
            return wrapper

        def fresh(*a, **kw):
            self.fresh_builds += 1
            return orig_fresh(*a, **kw)

        engine.state_after = timed("context", orig_state_after)
        engine._write = timed("write", orig_write)
        engine._remember = timed("update", orig_remember)
        engine._fresh_state = fresh
        engine._paint = lambda features, seed, settings, progress=None: blank

    def reset(self):
        for k in self.phases:
            self.phases[k] = 0.0
        self.ctx_tokens = 0


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def ms(x) -> str:
    return "-" if x is None or x != x else f"{x * 1000:.0f}"


def table(headers: list[str], rows: list[list], align: str = "") -> str:
    cells = [[str(c) for c in r] for r in [headers] + rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = align or ("<" + ">" * (len(headers) - 1))
    lines = []
    for j, r in enumerate(cells):
        lines.append("  ".join(f"{c:{align[i]}{widths[i]}}" for i, c in enumerate(r)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the measurements -------------------------------------------------------------------------------------
class ModeRun:
    """One story told in one mode, a frame at a time (so modes can be interleaved frame by frame)."""

    def __init__(self, pipe, mode, args, settings, image, clock, blank, targets, op_frame):
        self.pipe, self.mode, self.args, self.settings, self.clock = pipe, mode, args, settings, clock
        self.targets, self.op_frame = targets, op_frame
        self.engine = StoryEngine(pipe, mode=mode, window=args.window or settings.window,
                                  kv_budget_bytes=int(args.kv_budget_mb * MiB), max_frames=args.frames + 2)
        self.probe = Probe(self.engine, clock, blank)
        self.n_block = len(pipe.prompt.image_ids.block)
        self.tree = self.engine.start(image, OPENING_TEXT)
        self.per_frame, self.text_tokens, self.ops = {}, [], {}
        self.busy_s = 0.0

    def frame(self, k: int) -> None:
        """Write frame ``k`` (the ``repeats`` median at measured frames)."""
        engine, tree, probe, clock = self.engine, self.tree, self.probe, self.clock
        t0 = time.perf_counter()
        parent = tree.current
        reps = self.args.repeats if (k in self.targets or k == self.op_frame) else 1
        samples = []
        for r in range(reps):
            probe.reset()
            t = clock()
            frame = engine.step(tree, parent, settings=self.settings)
            total = clock() - t
            samples.append((total, dict(probe.phases), probe.ctx_tokens))
            if r < reps - 1:
                engine.delete(tree, frame.id)  # a repeat is a sibling of the same parent: drop it again
        n_text = len(frame.token_ids) - self.n_block
        self.text_tokens.append(n_text)
        self.per_frame[k] = {
            "total_s": median([s[0] for s in samples]),
            **{f"{p}_s": median([s[1][p] for s in samples]) for p in probe.phases},
            "context_tokens": samples[-1][2],
            "text_tokens": n_text,
            "repeats": reps,
        }
        if k in self.targets:
            f = self.per_frame[k]
            log(f"  {self.mode:9s} frame {k:3d}: {ms(f['total_s'])} ms (context {f['context_tokens']} tokens)")
        if k == self.op_frame and self.mode == "window":
            self.ops = measure_ops(engine, probe, tree, frame, self.settings, self.args, clock)
        self.busy_s += time.perf_counter() - t0

    def finish(self) -> dict:
        engine, tree, device = self.engine, self.tree, self.pipe.device
        result = {
            "frames": self.per_frame,
            "text_tokens_mean": float(np.mean(self.text_tokens)),
            "text_tokens_min": int(min(self.text_tokens)),
            "text_tokens_max": int(max(self.text_tokens)),
            "kv_store_bytes": engine.store.nbytes,
            "kv_store_states": len(engine.store),
            "kv_state_bytes_last": engine.state_after(tree, tree.current).nbytes if self.mode != "recompute" else 0,
            "rebuilds": max(0, self.probe.fresh_builds - 1) if self.mode != "recompute" else None,
            "rss_peak_bytes": rss_peak_bytes(),
            "rss_now_bytes": rss_now_bytes(),
            "cuda_peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            "busy_s": self.busy_s,
            "ops": self.ops,
        }
        self.engine = self.tree = self.probe = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return result


def run_modes(pipe, modes, args, settings, image, clock, blank, targets, op_frame) -> dict:
    """All modes, interleaved frame by frame (rotating which goes first) so that machine noise hits them
    alike, or one after the other with ``--sequential`` (then memory peaks are per mode)."""
    device = pipe.device
    make = lambda m: ModeRun(pipe, m, args, settings, image, clock, blank, targets, op_frame)  # noqa: E731
    results = {}
    if args.sequential:
        for m in modes:
            log(f"{m}: {args.frames} frames ...")
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            run = make(m)
            for k in range(1, args.frames + 1):
                run.frame(k)
            results[m] = run.finish()
        return results
    log(f"{', '.join(modes)} interleaved: {args.frames} frames ...")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = [make(m) for m in modes]
    for k in range(1, args.frames + 1):
        shift = k % len(runs)
        for run in runs[shift:] + runs[:shift]:
            run.frame(k)
    side = side_by_side(runs, targets, args.rounds)
    for run in runs:
        results[run.mode] = run.finish()
        results[run.mode]["side_by_side"] = side[run.mode]
    return results


def side_by_side(runs, targets, rounds: int) -> dict:
    """Once every story is built: a step from frame k-1's cached state (the same work frame k was) for each
    measured k and mode, interleaved and rotated, ``rounds`` times, so that load hits every ratio alike. Returns
    ``{mode: {k: [seconds, ...]}}``."""
    out = {run.mode: {k: [] for k in targets} for run in runs}
    log(f"side by side: {rounds} rounds of {len(targets)} frames x {len(runs)} modes ...")
    cells = [(run, k) for k in targets for run in runs]
    for r in range(rounds):
        shift = r % len(cells)
        for run, k in cells[shift:] + cells[:shift]:
            tree, leaf = run.tree, run.tree.current
            parent = tree.path(leaf)[k - 1]
            t = run.clock()
            frame = run.engine.step(tree, parent.id, settings=run.settings)
            out[run.mode][k].append(run.clock() - t)
            run.engine.delete(tree, frame.id)
            tree.select(leaf)
    return out


def measure_ops(engine, probe, tree, frame, settings, args, clock) -> dict:
    """branch / regenerate(part="text") at ``frame`` vs a plain step there, store warm (and one cold branch)."""
    parent = frame.parent
    out = {"frame": tree.depth(frame.id) - 1}

    def timed(op):
        samples = []
        for _ in range(args.repeats):
            probe.reset()
            t = clock()
            new = op()
            samples.append(clock() - t)
            engine.delete(tree, new.id)
        tree.select(frame.id)
        return median(samples)

    seed = 1234
    out["branch_s"] = timed(lambda: engine.branch(tree, parent, seed=seed, settings=settings))
    out["regenerate_text_s"] = timed(lambda: engine.regenerate(tree, frame.id, part="text", seed=seed,
                                                               settings=settings))
    # The same branch with nothing cached: what the store saves (rebuilds the whole path once).
    warm, builds = engine.store, probe.fresh_builds
    engine.store = KVStore(warm.budget)
    t = clock()
    new = engine.branch(tree, parent, seed=seed, settings=settings)
    out["branch_cold_s"] = clock() - t
    engine.store, probe.fresh_builds = warm, builds  # not a rebuild of the story's own path
    engine.delete(tree, new.id)
    tree.select(frame.id)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bench-small", help="model preset (name or path); default bench-small")
    p.add_argument("--frames", type=int, default=50, help="frames to generate after the opening (default 50)")
    p.add_argument("--device", help="cpu, cuda, ... (default: the preset's)")
    p.add_argument("--dtype", help="fp32, bf16, fp16 (default: the preset's)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated: recompute,window,sink")
    p.add_argument("--window", type=int, help="frames kept in context (default: the preset's)")
    p.add_argument("--tokens", type=int, help="text tokens per frame (default: the preset's max_new_tokens)")
    p.add_argument("--free-length", action="store_true",
                   help="let the model end a frame's text early (lengths then vary per mode and frame)")
    p.add_argument("--repeats", type=int, default=3, help="runs at each measured frame (median; default 3)")
    p.add_argument("--targets", default="2,10,25,50", help="frames to report (default 2,10,25,50)")
    p.add_argument("--op-frame", type=int, default=20, help="frame where branch/regenerate are timed (default 20)")
    p.add_argument("--kv-budget-mb", type=float, default=2048, help="KV store budget (default 2048, as the app)")
    p.add_argument("--rounds", type=int, default=5,
                   help="side-by-side rounds after the stories are built (default 5; 0: none)")
    p.add_argument("--sequential", action="store_true",
                   help="run the modes one after the other (per-mode memory peaks) instead of interleaved")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", help="also write all measurements to this file")
    args = p.parse_args(argv)

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        p.error(f"unknown mode(s) {bad}; use {', '.join(MODES)}")
    if args.frames < 2:
        p.error("--frames must be at least 2")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    targets = sorted({int(t) for t in args.targets.split(",") if t.strip()})
    targets = [t for t in targets if 1 <= t <= args.frames] or [args.frames]
    op_frame = min(args.op_frame, args.frames)

    overrides = []
    if args.device:
        overrides.append(f"runtime.device={args.device}")
    if args.dtype:
        overrides.append(f"runtime.dtype={args.dtype}")
    t = time.perf_counter()
    pipe = SeedStoryPipeline.from_preset(args.preset, overrides)
    load_s = time.perf_counter() - t
    device = pipe.device
    clock = Clock(device)
    settings = pipe.settings.replace(do_sample=False, max_new_tokens=args.tokens)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8))
    blank = Image.new("RGB", (settings.width or 64, settings.height or 64), "gray")
    llm_cfg = pipe.agent.llm.config
    n_params = sum(x.numel() for x in pipe.agent.llm.parameters())
    weight_bytes = sum(t.numel() * t.element_size() for m in (pipe.visual_tokenizer, pipe.agent, pipe.detokenizer)
                       for t in list(m.parameters()) + list(m.buffers()))

    # Painting, on its own (never inside the frame times).
    feats = pipe.encode_image(image)
    pipe.paint(feats, seed=0, settings=settings)  # warm-up
    paint_s = []
    for _ in range(args.repeats):
        t = clock()
        pipe.paint(feats, seed=0, settings=settings)
        paint_s.append(clock() - t)

    with fixed_text_length(not args.free_length), torch.inference_mode():
        # Warm-up (first-call overheads) on a throwaway story.
        warm = StoryEngine(pipe, mode="window", window=args.window or settings.window)
        Probe(warm, clock, blank)
        wt = warm.start(image, OPENING_TEXT)
        for _ in range(2):
            warm.step(wt, settings=settings)
        del warm, wt
        results = run_modes(pipe, modes, args, settings, image, clock, blank, targets, op_frame)

    # -- report ----------------------------------------------------------------------------------------
    window = args.window or settings.window
    print()
    print(f"preset {pipe.name}: LM {n_params / 1e6:.1f} M parameters ({llm_cfg.num_hidden_layers} layers, "
          f"hidden {llm_cfg.hidden_size}), {pipe.agent.num_img_tokens} image tokens; device {device}, "
          f"{str(pipe.agent.dtype).replace('torch.', '')}, {torch.get_num_threads()} CPU threads; loaded in {load_s:.1f} s")
    length = "free length" if args.free_length else f"forced to {settings.max_new_tokens} tokens"
    print(f"window {window} frames; greedy text, {length}; painting excluded "
          f"(pipe.paint, {settings.num_inference_steps} step(s): {ms(median(paint_s))} ms/frame, separate); "
          f"median of {args.repeats} at measured frames")
    print()
    print("Per-frame LLM time, ms (text decoding + image block + context update):")
    rows = []
    for k in targets:
        row = [k] + [ms(results[m]["frames"][k]["total_s"]) for m in modes]
        if "recompute" in results and "window" in results:
            row.append(f"{results['recompute']['frames'][k]['total_s'] / results['window']['frames'][k]['total_s']:.2f}")
        rows.append(row)
    headers = ["frame"] + modes + (["recompute/window"] if "recompute" in results and "window" in results else [])
    print(table(headers, rows))
    print()
    print("Breakdown, ms: context = state_after (prefill / lookup), write = text + image block, "
          "update = feed the frame into the cached state:")
    rows = []
    for m in modes:
        for k in targets:
            f = results[m]["frames"][k]
            rows.append([m, k, ms(f["total_s"]), ms(f["context_s"]), ms(f["write_s"]), ms(f["update_s"]),
                         f["context_tokens"], f["text_tokens"]])
    print(table(["mode", "frame", "total", "context", "write", "update", "ctx tokens", "text tokens"], rows,
                "<>>>>>>>"))
    print()
    hi = 25 if 25 in targets else targets[-1]
    lo = 2 if 2 in targets else targets[0]
    print(f"Ratios: frame {hi} / frame {lo} per mode" + (f"; recompute / window at frame {hi}" if "recompute" in results
                                                         and "window" in results else ""))
    rows = [[m, f"{results[m]['frames'][hi]['total_s'] / results[m]['frames'][lo]['total_s']:.2f}"] for m in modes]
    print(table(["mode", f"f{hi}/f{lo}"], rows))
    ratios = {m: results[m]["frames"][hi]["total_s"] / results[m]["frames"][lo]["total_s"] for m in modes}
    rw = None
    if "recompute" in results and "window" in results:
        rw = results["recompute"]["frames"][hi]["total_s"] / results["window"]["frames"][hi]["total_s"]
        print(f"recompute / window at frame {hi}: {rw:.2f}")
    print()
    side = {m: results[m].get("side_by_side") for m in modes if results[m].get("side_by_side")}
    if side:
        print(f"Side by side (the stories built, then a step from frame k-1 for each k and mode, interleaved, "
              f"{args.rounds} rounds): min / median ms, and median ratios to frame {targets[0]}")
        rows = []
        for m in modes:
            for k in targets:
                xs = side[m][k]
                rows.append([m, k, ms(min(xs)), ms(median(xs)), f"{median(xs) / median(side[m][targets[0]]):.2f}"])
        print(table(["mode", "frame", "min", "median", f"/ f{targets[0]}"], rows, "<>>>>"))
        print()
    seq = args.sequential
    print("Memory and context, per mode" + (" (RSS peak: whole process so far, modes in the order shown):" if seq
                                           else " (modes interleaved: process peaks below are for all together):"))
    rows = []
    for m in modes:
        r = results[m]
        row = [m]
        if seq:
            row += [f"{r['rss_peak_bytes'] / MiB:.0f}",
                    "-" if r["cuda_peak_bytes"] is None else f"{r['cuda_peak_bytes'] / MiB:.0f}"]
        row += [f"{r['kv_store_bytes']:,}", r["kv_store_states"], f"{r['kv_state_bytes_last']:,}",
                "-" if r["rebuilds"] is None else r["rebuilds"],
                f"{r['text_tokens_mean']:.1f} ({r['text_tokens_min']}-{r['text_tokens_max']})", f"{r['busy_s']:.0f}"]
        rows.append(row)
    headers = ["mode"] + (["RSS peak MiB", "CUDA peak MiB"] if seq else []) + [
        "KV store bytes", "states", "last state bytes", "rebuilds", "text tokens/frame", "busy s"]
    print(table(headers, rows, "<" + ">" * (len(headers) - 1)))
    cuda_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    print(f"process: RSS peak {rss_peak_bytes() / MiB:.0f} MiB (weights {weight_bytes / MiB:.0f} MiB)"
          + (f", CUDA max_memory_allocated {cuda_peak / MiB:.0f} MiB" if cuda_peak is not None else ""))
    ops = results.get("window", {}).get("ops") or {}
    if ops:
        step = results["window"]["frames"][op_frame]["total_s"]
        print()
        print(f"Operations at frame {op_frame} (window mode, KV store warm; painting excluded):")
        rows = [["step", ms(step), "1.00"],
                ["branch (new text, sampled)", ms(ops["branch_s"]), f"{ops['branch_s'] / step:.2f}"],
                ['regenerate(part="text")', ms(ops["regenerate_text_s"]), f"{ops['regenerate_text_s'] / step:.2f}"],
                ["branch, cold store (1 run)", ms(ops["branch_cold_s"]), f"{ops['branch_cold_s'] / step:.2f}"]]
        print(table(["operation", "ms", "x step"], rows, "<>>"))

    if args.json:
        out = {"preset": pipe.name, "device": str(device), "dtype": str(pipe.agent.dtype), "llm_params": n_params,
               "window": window, "tokens_per_frame": settings.max_new_tokens, "forced_length": not args.free_length,
               "repeats": args.repeats, "targets": targets, "paint_s": median(paint_s),
               "paint_steps": settings.num_inference_steps, "load_s": load_s, "modes": results,
               "ratio_hi_lo": {"hi": hi, "lo": lo, **ratios}, "recompute_over_window": rw,
               "interleaved": not seq, "rss_peak_bytes": rss_peak_bytes(), "cuda_peak_bytes": cuda_peak,
               "weight_bytes": weight_bytes}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
