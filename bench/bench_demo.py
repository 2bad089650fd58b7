"""The shipped demo model against its targets: stories from held-out openings of the synthetic world, read
by the synthetic-world analyzer (``seedstory.eval.synthetic``).

    python bench/bench_demo.py                       # 50 openings from data/world/val.jsonl, 25 frames each
    python bench/bench_demo.py --stories 10 --frames 24 --preset demo --out runs/bench_demo
    python bench/bench_demo.py --text-only --val data/world/dev.jsonl --stories 20 --out runs/dev_text  # ~2 min

The opening (first picture + first caption of a validation story) is given; the model writes the next
``--frames`` frames with the preset's settings (the app's defaults), through ``seedstory.eval generate``
(resumable: an interrupted run continues, stories already made are kept). Then it prints:

- the analyzer's four metrics with the targets (caption validity ≥ 95%, caption-image agreement ≥ 80%,
  character consistency ≥ 90%, setting consistency ≥ 90%), overall and by thirds of the story, so a
  story that degenerates as it grows shows up as falling figures late in the story;
- degeneration signs: captions repeating the previous frame's, captions repeating one of the last four
  (two-frame loops: A, B, A, B, ...), empty captions, pictures with neither a recognisable setting nor a
  figure;
- seconds per frame (text + picture), from the frames' creation times: median and 90th percentile, with
  the number of threads torch used (``--threads``; default: torch's).

Needs the world's validation split (``python -m training.build_demo`` writes it to ``data/world``, or
``python -m seedstory.data.synthetic --out data/world --stories 2000 --frames 30 --size 128 --seed 0``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from seedstory.engine import caption_key  # noqa: E402
from seedstory.eval import synthetic as E  # noqa: E402
from seedstory.eval.generate import generate_stories  # noqa: E402
from seedstory.storage import load_story  # noqa: E402


def frame_seconds(out: str) -> list[float]:
    """Seconds each generated frame took: the gap between its creation and its parent's."""
    from seedstory.eval.judge import discover_stories

    gaps = []
    for _, path in discover_stories(out):
        tree = load_story(path)
        frames = tree.path(tree.leaf(tree.current))
        gaps += [b.created - a.created for a, b in zip(frames, frames[1:])]
    return gaps


def by_thirds(report: E.Report, frames: int) -> dict:
    """Each metric over the first, middle and last third of the generated frames of every story."""
    edges = [1 + round(frames * j / 3) for j in range(4)]
    out = {}
    for lo, hi in zip(edges, edges[1:]):
        ok, total = {}, {}
        for s in report.stories:
            for i in range(lo, hi):
                for m, (passed, n) in s.per_frame.get(i, {}).items():
                    ok[m], total[m] = ok.get(m, 0) + passed, total.get(m, 0) + n
        out[f"frames {lo}-{hi - 1}"] = {m: ok[m] / total[m] for m in E.METRICS if total.get(m)}
    return out


LOOP = 4  # a caption that repeats one of the last LOOP captions counts as a loop (A, B, A, B, ...)


def degeneration(out: str, world) -> dict:
    from seedstory.data import synthetic as S

    repeats = loops = empty = blank = n = 0
    for name, frames in E.saved_stories(out):
        for k in range(1, len(frames)):
            text, image = frames[k]
            n += 1
            repeats += text.strip() == frames[k - 1][0].strip()
            loops += caption_key(text) in {caption_key(t) for t, _ in frames[max(0, k - LOOP):k]}
            empty += not text.strip()
            scene = S.detect(image, world)
            blank += scene["setting"] is None and not scene["figures"]
    return {"frames": n, "repeated_caption": repeats / max(1, n), "looped_caption": loops / max(1, n),
            "empty_caption": empty / max(1, n),
            "blank_picture": blank / max(1, n)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--val", default=os.path.join(ROOT, "data", "world", "val.jsonl"))
    p.add_argument("--images", default=os.path.join(ROOT, "data", "world", "images"))
    p.add_argument("--stories", type=int, default=50, help="held-out openings (default 50)")
    p.add_argument("--frames", type=int, default=24, help="frames the model writes after the opening (default 24)")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "bench_demo"))
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--text-only", action="store_true",
                   help="paint 1-step drafts: minutes instead of half an hour, for decoding settings (the text never "
                        "depends on the pictures: the agent feeds back its own predicted features)")
    args = p.parse_args(argv)
    if args.text_only:
        args.overrides += ["generation.num_inference_steps=1", "generation.guidance_scale=1"]
    if args.threads:
        torch.set_num_threads(args.threads)
    if not os.path.isfile(args.val):
        print(f"error: no validation split at {args.val}; see this script's docstring", file=sys.stderr)
        return 1
    stories_dir = os.path.join(args.out, "stories")
    start = time.perf_counter()
    report = generate_stories(args.val, args.images, stories_dir, preset=args.preset, frames=args.frames,
                              overrides=args.overrides, limit=args.stories)
    wall = time.perf_counter() - start
    if report.failed:
        print(f"{len(report.failed)} stories failed: {report.failed[:3]}", file=sys.stderr)
    world = E.load_world(os.path.join(os.path.dirname(args.val), "world.json")) \
        if os.path.isfile(os.path.join(os.path.dirname(args.val), "world.json")) else None
    analysis = E.analyze(E.saved_stories(stories_dir), world)
    gaps = sorted(frame_seconds(stories_dir))
    result = {
        "preset": args.preset, "text_only": args.text_only, "stories": len(analysis.stories),
        "frames_per_story": args.frames + 1,
        "overall": analysis.overall(), "counts": analysis.totals(),
        "targets": analysis.to_dict()["targets"],
        "by_thirds": by_thirds(analysis, args.frames),
        "degeneration": degeneration(stories_dir, world),
        "seconds_per_frame": {"median": statistics.median(gaps) if gaps else None,
                              "p90": gaps[int(0.9 * (len(gaps) - 1))] if gaps else None, "frames": len(gaps)},
        "made_now": len(report.made), "wall_seconds_now": round(wall, 1),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()},
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "result.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    if args.text_only:
        print("text only: the pictures are 1-step drafts, so only caption validity and the text's degeneration "
              "signs mean anything here\n")
    print(analysis.markdown())
    print("\nby thirds of the story:")
    for window, vals in result["by_thirds"].items():
        print(f"  {window}: " + ", ".join(f"{m.replace('_', ' ')} {v:.1%}" for m, v in vals.items()))
    d = result["degeneration"]
    print(f"\ndegeneration over {d['frames']} frames: repeated caption {d['repeated_caption']:.1%}, "
          f"caption from the last {LOOP} {d['looped_caption']:.1%}, "
          f"empty caption {d['empty_caption']:.1%}, blank picture {d['blank_picture']:.1%}")
    spf = result["seconds_per_frame"]
    if spf["median"] is not None:
        print(f"seconds per frame: median {spf['median']:.2f}, p90 {spf['p90']:.2f} over {spf['frames']} frames "
              f"({result['machine']['cores']} cores, {result['machine']['torch_threads']} torch threads; "
              f"target ≤ 5 s on 2 CPU cores)")
    print(f"result: {os.path.join(args.out, 'result.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
