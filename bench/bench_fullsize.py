"""The released model's sizes, timed: seconds per frame (text and picture apart) and peak GPU memory for each
runtime option, and what keeping the context's KV cache saves over recomputing it. Random weights at full size
(``seed-story-random``): nothing to download.

    python bench/bench_fullsize.py                 # a GPU (H100/H200: about 6 minutes)
    python bench/bench_fullsize.py --proxy         # a CPU: the same at reduced depth and picture size

Per option (``bf16``: as configured; ``offload``: ``runtime.cpu_offload=true``; ``8bit``: the LLM in
bitsandbytes int8, CUDA only): load time, then ``--frames`` frames of a story from an example picture, text
forced to ``max_new_tokens`` tokens so every frame does the same work; median seconds per frame for the text
(``StoryEngine._write``: decoding + image block) and the picture (``pipeline.paint``), and the peak of
``torch.cuda.max_memory_allocated``. Then, in bf16 with painting stubbed out, the LLM's seconds per frame at
frame ``--context-frames`` with the context rebuilt from scratch (``recompute``) and with its cache kept
(``window``), and their ratio. ``--json`` writes everything.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from seedstory.quiet import quiet_libraries  # noqa: E402
from seedstory.threads import passive_openmp  # noqa: E402

passive_openmp()
quiet_libraries()

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from seedstory.engine import StoryEngine  # noqa: E402
from seedstory.pipeline import SeedStoryPipeline  # noqa: E402

OPTIONS = {"bf16": [], "offload": ["runtime.cpu_offload=true"], "8bit": ["runtime.llm_quantization=8bit"]}
# A CPU stand-in: every width as released, far fewer layers, small pictures, few steps.
PROXY = ["agent.llm.num_hidden_layers=2", "visual_tokenizer.layers=2",
         "detokenizer.unet.transformer_layers_per_block=[1,1,1]", "detokenizer.unet.layers_per_block=1",
         "generation.height=256", "generation.width=256", "generation.num_inference_steps=2",
         "generation.max_new_tokens=24", "runtime.dtype=fp32"]


class Timer:
    def __init__(self):
        self.seconds: list[float] = []

    def wrap(self, fn, device):
        def timed(*args, **kwargs):
            _sync(device)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _sync(device)
                self.seconds.append(time.perf_counter() - t0)
        return timed


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _opening() -> Image.Image:
    examples = os.path.join(ROOT, "assets", "examples")
    return Image.open(os.path.join(examples, sorted(f for f in os.listdir(examples) if f.endswith(".png"))[0]))


def _free(*objs) -> None:
    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_option(preset: str, overrides: list[str], frames: int) -> dict:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    pipe = SeedStoryPipeline.from_preset(preset, overrides)
    load = time.perf_counter() - t0
    n = pipe.settings.max_new_tokens
    pipe.settings = pipe.settings.replace(min_new_tokens=n)  # every frame writes the same number of tokens
    engine = StoryEngine(pipe, mode="window")
    text, paint = Timer(), Timer()
    engine._write = text.wrap(engine._write, pipe.device)
    pipe.paint = paint.wrap(pipe.paint, pipe.device)
    tree = engine.start(_opening(), "Once upon a time, a small fox found a brass key under the old oak tree.")
    for _ in range(frames):
        engine.step(tree)
    out = {"overrides": overrides, "load_s": load, "device": str(pipe.device), "dtype": str(pipe.agent.dtype),
           "text_s_per_frame": statistics.median(text.seconds[1:] or text.seconds),
           "picture_s_per_frame": statistics.median(paint.seconds[1:] or paint.seconds),
           "text_tokens": n}
    if cuda:
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    _free(engine, pipe)
    return out


def context_ratio(preset: str, overrides: list[str], frames: int) -> dict:
    """LLM seconds per frame at frame ``frames`` with the context recomputed and with its cache kept."""
    pipe = SeedStoryPipeline.from_preset(preset, overrides)
    pipe.settings = pipe.settings.replace(min_new_tokens=pipe.settings.max_new_tokens)
    blank = Image.new("RGB", (pipe.settings.width, pipe.settings.height))
    out = {}
    for mode in ("recompute", "window"):
        engine = StoryEngine(pipe, mode=mode)
        engine._paint = lambda *args, **kwargs: blank
        tree = engine.start(_opening(), "Once upon a time, a small fox found a brass key under the old oak tree.")
        for _ in range(frames - 1):
            engine.step(tree)
        times = []
        for _ in range(3):  # three siblings of the last frame, each from the same context
            parent = tree.current
            _sync(pipe.device)
            t0 = time.perf_counter()
            frame = engine.step(tree, parent)
            _sync(pipe.device)
            times.append(time.perf_counter() - t0)
            tree.current = parent
            engine.delete(tree, frame.id)
        out[mode] = statistics.median(times)
    out["recompute_over_window"] = out["recompute"] / out["window"]
    _free(pipe)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="seed-story-random")
    p.add_argument("--proxy", action="store_true", help="reduced depth and picture size (a CPU)")
    p.add_argument("--options", default=",".join(OPTIONS), help=f"comma-separated: {', '.join(OPTIONS)}")
    p.add_argument("--frames", type=int, default=3, help="frames timed per option (the first is a warm-up)")
    p.add_argument("--context-frames", type=int, default=12, help="the frame where recompute and window are compared")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json")
    args = p.parse_args(argv)
    base = (PROXY if args.proxy else []) + args.overrides
    cuda = torch.cuda.is_available()
    print(f"{args.preset}{' (proxy: reduced depth)' if args.proxy else ''} on "
          f"{torch.cuda.get_device_name() if cuda else f'CPU, {torch.get_num_threads()} threads'}", flush=True)
    results = {"preset": args.preset, "proxy": args.proxy, "gpu": torch.cuda.get_device_name() if cuda else None,
               "options": {}}
    print(f"{'option':8s} {'dtype':>9s} {'load s':>7s} {'text s/frame':>13s} {'picture s/frame':>16s} "
          f"{'peak GPU GiB':>13s}")
    for name in args.options.split(","):
        if name == "8bit":
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                print(f"{name:8s} skipped: needs CUDA and bitsandbytes")
                continue
            if not cuda:
                print(f"{name:8s} skipped: needs CUDA")
                continue
        r = run_option(args.preset, base + OPTIONS[name], args.frames)
        results["options"][name] = r
        _write(args.json, results)  # as it goes: a run stopped by a time limit keeps what it measured
        peak = f"{r['peak_gpu_gib']:13.1f}" if "peak_gpu_gib" in r else f"{'-':>13s}"
        print(f"{name:8s} {r['dtype'].replace('torch.', ''):>9s} {r['load_s']:7.1f} {r['text_s_per_frame']:13.2f} "
              f"{r['picture_s_per_frame']:16.2f} {peak}", flush=True)
    ratio = context_ratio(args.preset, base, args.context_frames)
    results["context"] = ratio
    print(f"LLM s/frame at frame {args.context_frames}: recompute {ratio['recompute']:.2f}, window (KV kept) "
          f"{ratio['window']:.2f}: recompute / window = {ratio['recompute_over_window']:.2f}")
    _write(args.json, results)
    return 0


def _write(path, results) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
