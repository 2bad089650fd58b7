"""Text ahead of the painter: a story told frame by frame (write, then paint, then the next) against the same story
told by ``StoryEngine.steps``, which writes frame k+1 while another thread paints frame k. With
``context_from: features`` both make the same frames (same seeds); the pipelined one should cost about
max(LLM total, painter total) instead of their sum. One torch thread per Python thread, so on two cores the
writer and the painter each have one. Runs interleaved (sequential, pipelined, pipelined, sequential, ...),
``--repeats`` rounds; min and median.

    python bench/bench_pipeline.py --preset demo --frames 25
"""
from __future__ import annotations

import argparse
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


class TimedPaint:
    """Wraps ``pipe.paint`` to add up the painter's time (whichever thread calls it)."""

    def __init__(self, pipe):
        self.pipe, self.paint, self.seconds = pipe, pipe.paint, 0.0

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.paint(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0


def tell(engine: StoryEngine, opening: Image.Image, text: str, frames: int, pipelined: bool, timer: TimedPaint):
    tree = engine.start(opening, text)
    engine.store.drop(lambda key: True)
    timer.seconds = 0.0
    t0 = time.perf_counter()
    if pipelined:
        for _ in engine.steps(tree, frames):
            pass
    else:
        for _ in range(frames):
            engine.step(tree)
    total = time.perf_counter() - t0
    return total, timer.seconds, [f.text for f in tree.path()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="demo")
    p.add_argument("--frames", type=int, default=25)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    pipe = SeedStoryPipeline.from_preset(args.preset, ["generation.context_from=features", *args.overrides])
    timer = TimedPaint(pipe)
    pipe.paint = timer
    engine = StoryEngine(pipe, mode="window")
    examples = os.path.join(ROOT, "assets", "examples")
    opening = Image.open(os.path.join(examples, sorted(f for f in os.listdir(examples) if f.endswith(".png"))[0]))
    text = "Once upon a time."
    tell(engine, opening, text, 2, True, timer)  # warm-up
    runs = {"sequential": [], "pipelined": []}
    texts = {}
    for r in range(args.repeats):
        order = ["sequential", "pipelined"] if r % 2 == 0 else ["pipelined", "sequential"]
        for name in order:
            total, paint, story = tell(engine, opening, text, args.frames, name == "pipelined", timer)
            runs[name].append({"total": total, "paint": paint})
            texts[name] = story
            print(f"round {r + 1} {name:10s}: {total:7.1f} s ({paint:6.1f} s painting)", flush=True)
    seq = runs["sequential"]
    llm = statistics.median(x["total"] - x["paint"] for x in seq)
    paint = statistics.median(x["paint"] for x in seq)
    pipe_total = [x["total"] for x in runs["pipelined"]]
    seq_total = [x["total"] for x in seq]
    bound = max(llm, paint)
    print(f"\n{args.frames} frames, {args.preset}, 1 torch thread per Python thread ({os.cpu_count()} cores):")
    print(f"  sequential: min {min(seq_total):.1f} / median {statistics.median(seq_total):.1f} s "
          f"(LLM {llm:.1f} s + painter {paint:.1f} s)")
    print(f"  pipelined:  min {min(pipe_total):.1f} / median {statistics.median(pipe_total):.1f} s")
    print(f"  pipelined / max(LLM, painter) = {statistics.median(pipe_total) / bound:.2f}  (target <= 1.15)")
    print(f"  sequential / pipelined = {statistics.median(seq_total) / statistics.median(pipe_total):.2f}")
    print(f"  same story both ways: {texts['sequential'] == texts['pipelined']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "frames": args.frames, "runs": runs, "llm": llm, "painter": paint,
                       "same_story": texts["sequential"] == texts["pipelined"]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
