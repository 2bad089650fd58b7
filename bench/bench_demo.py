"""The shipped demo model against its targets: stories from held-out openings of the synthetic world, read
by the synthetic-world analyzer (``seedstory.eval.synthetic``).

    python bench/bench_demo.py                       # 50 openings from data/world/val.jsonl, 25 frames each
    python bench/bench_demo.py --stories 10 --frames 24 --preset demo --out runs/bench_demo
    python bench/bench_demo.py --text-only --world-seed 2 --stories 20 --out runs/dev_text  # ~2 min, unseen openings
    python bench/bench_demo.py --world-seed 1 --out runs/bench_seed1   # openings of a world made with another seed

The opening (first picture + first caption of a validation story) is given; the model writes the next
``--frames`` frames with the preset's settings (the app's defaults), through ``seedstory.eval generate``
(resumable: an interrupted run continues, stories already made are kept). Then it prints:

- the analyzer's headline table with the targets (caption validity ≥ 95%, story logic ≥ 95%, caption-image
  agreement ≥ 80%, strict agreement ≥ 70%, presence ≥ 90%, character consistency ≥ 90%, setting consistency
  ≥ 90%, blank pictures ≤ 1%) and the other signs of trouble (captions repeating one of the last eight or the
  previous one, empty captions), overall and by thirds of the story, so a story that degenerates as it grows
  shows up as falling figures late in the story;
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
import shutil
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from seedstory.quiet import quiet_libraries  # noqa: E402
from seedstory.threads import passive_openmp  # noqa: E402

passive_openmp()
quiet_libraries()

import torch  # noqa: E402

from seedstory.data.synthetic import write_dataset  # noqa: E402
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
        out[f"frames {lo}-{hi - 1}"] = {m: ok[m] / total[m] for m in (*E.METRICS, *E.SIGNS) if total.get(m)}
    return out


RUN_FILE = "run.json"  # what made the stories in an output folder


def run_signature(args) -> dict:
    """Everything that decides the stories: two runs that differ here must not share a folder."""
    return {"preset": args.preset, "overrides": list(args.overrides), "val": os.path.abspath(args.val),
            "frames": args.frames, "text_only": bool(args.text_only)}


def claim_output(out: str, signature: dict):
    """Mark ``out`` as this run's, or say why it holds another run's stories (None when it is ours to use)."""
    path = os.path.join(out, RUN_FILE)
    stories = os.path.join(out, "stories")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            theirs = json.load(f)
        if theirs != signature:
            changed = ", ".join(k for k in signature if theirs.get(k) != signature[k])
            return (f"{out} holds stories of another run (its {changed} differ); use another --out, or --fresh "
                    "to replace them")
        return None
    if os.path.isdir(stories) and os.listdir(stories):
        return f"{out} holds stories of an unknown run; use another --out, or --fresh to replace them"
    os.makedirs(out, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(signature, f, indent=2)
    return None


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
                   help="paint 1-step drafts: minutes instead of half an hour, for decoding settings (the text is "
                        "written with context_from=features, so it never depends on the drafts)")
    p.add_argument("--fresh", action="store_true",
                   help="delete the stories already in --out first (otherwise an interrupted run of the same settings "
                        "continues, and a folder holding another run's stories is refused)")
    p.add_argument("--world-seed", type=int, default=None, metavar="SEED",
                   help="openings from a world generated with this seed (written under --out) instead of --val: "
                        "stories the model has never seen, as the targets require (training uses seed 0)")
    args = p.parse_args(argv)
    stories_dir = os.path.join(args.out, "stories")
    if args.fresh:
        shutil.rmtree(stories_dir, ignore_errors=True)
        if os.path.isfile(os.path.join(args.out, RUN_FILE)):
            os.remove(os.path.join(args.out, RUN_FILE))
    if args.world_seed is not None:
        world_dir = os.path.join(args.out, f"world-seed{args.world_seed}")
        if not os.path.isfile(os.path.join(world_dir, "val.jsonl")):
            write_dataset(world_dir, stories=args.stories, frames=1, size=128, seed=args.world_seed, val_fraction=1.0,
                          workers=1, progress=False)
        args.val, args.images = os.path.join(world_dir, "val.jsonl"), os.path.join(world_dir, "images")
    if args.text_only:  # a draft read back into the context would change the text: the agent's features go in
        args.overrides += ["generation.num_inference_steps=1", "generation.guidance_scale=1",
                           "generation.context_from=features"]
    if args.threads:
        torch.set_num_threads(args.threads)
    if not os.path.isfile(args.val):
        print(f"error: no validation split at {args.val}; see this script's docstring", file=sys.stderr)
        return 1
    world_file = os.path.join(os.path.dirname(args.val), "world.json")
    try:
        world = E.load_world(world_file) if os.path.isfile(world_file) else None
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    problem = claim_output(args.out, run_signature(args))
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    report = generate_stories(args.val, args.images, stories_dir, preset=args.preset, frames=args.frames,
                              overrides=args.overrides, limit=args.stories)
    wall = time.perf_counter() - start
    if report.failed:
        print(f"{len(report.failed)} stories failed: {report.failed[:3]}", file=sys.stderr)
    analysis = E.analyze(E.saved_stories(stories_dir), world)
    gaps = sorted(frame_seconds(stories_dir))
    result = {
        "preset": args.preset, "text_only": args.text_only, "stories": len(analysis.stories),
        "frames_per_story": args.frames + 1,
        "overall": analysis.overall(), "counts": analysis.totals(),
        "targets": analysis.targets(),
        "by_thirds": by_thirds(analysis, args.frames),
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
        print("text only: the pictures are 1-step drafts, so only caption validity, story logic and the captions' "
              "signs of trouble mean anything here\n")
    print(analysis.markdown())
    print("\nby thirds of the story:")
    for window, vals in result["by_thirds"].items():
        print(f"  {window}: " + ", ".join(f"{m.replace('_', ' ')} {v:.1%}" for m, v in vals.items()))
    spf = result["seconds_per_frame"]
    if spf["median"] is not None:
        print(f"seconds per frame: median {spf['median']:.2f}, p90 {spf['p90']:.2f} over {spf['frames']} frames "
              f"({result['machine']['cores']} cores, {result['machine']['torch_threads']} torch threads; "
              f"target ≤ 5 s on 2 CPU cores)")
    print(f"result: {os.path.join(args.out, 'result.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
