"""Corrected stories: the agent's own stories, kept to the world's rules (DAgger-style data for stage 2).

    python -m training.corrected_stories --preset demo --out data/world/corrected.jsonl --stories 400 --workers 2

From each training story's opening the agent writes the next caption as the story engine does (the preset's
decoding, window and caption candidates), reading the true pictures of the story so far. A caption the world
could have told in that state is kept and its picture is drawn from the world's state; one it could not
(impossible, or not the world's language) is replaced by the world's own next event (``_Story.step``). The
stories thus go where the agent's own choices lead, and every caption in them is possible: trained on them
(mixed with the true stories), the agent is shown what to say exactly where it used to go wrong, in the
states its own stories reach, which the true stories rarely visit.

Each story is one line of ``--out`` (the dataset's format, plus ``written``: who wrote each frame, "agent" or
"world", and ``proposed``: the agent's caption where the world's replaced it), written once its pictures are
saved under ``--image-root``; a rerun skips the stories already there, so an interrupted run continues.
``--workers`` processes share the stories, each with its own engine and core.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import time

from seedstory.atomic import write_text
from seedstory.config import resolve_path
from seedstory.data import synthetic as S

ID_RE = re.compile(r"s(\d+)_(\d+)")


def corrected_story(engine, record: dict, seed: int, frames: int, size: int, image_root: str, prefix: str) -> dict:
    """One corrected story grown from ``record``'s opening (a story of ``seedstory.data.synthetic``)."""
    m = ID_RE.fullmatch(record["id"])
    if m is None:
        raise ValueError(f"{record['id']!r} is not a synthetic-world story id (s<seed>_<index>)")
    world = S._Story(S.story_rng(int(m[1]), int(m[2])))
    sentences, events = world.opening()
    opening = " ".join(sentences)
    if opening != record["captions"][0]:
        raise ValueError(f"story {record['id']}: the world's opening differs from the record's; "
                         "was the data made with another version of the world?")
    sid = f"{prefix}{record['id']}"
    os.makedirs(os.path.join(image_root, sid), exist_ok=True)

    def save(f: int, truth: dict):
        rel = f"{sid}/{f:03d}.png"
        picture = S.render_frame(truth, size)
        picture.save(os.path.join(image_root, rel), compress_level=6)
        return rel, picture

    truth = world.truth(events)
    rel, picture = save(0, truth)
    out = {"id": sid, "images": [rel], "captions": [opening], "orders": [0], "truth": [truth],
           "written": ["opening"], "proposed": [None]}
    tree = engine.start(picture, opening)
    for f in range(1, frames):
        text = engine.draft_text(tree, tree.current, seed=seed + f)
        followed = S.follow_caption(world, text, allow_travel=f >= 2)
        if followed is not None:
            world, events = followed
            caption, who, proposed = " ".join(text.split()), "agent", None
        else:
            sentences, events = world.step(allow_travel=f >= 2)
            caption, who, proposed = " ".join(sentences), "world", text
        truth = world.truth(events)
        rel, picture = save(f, truth)
        engine.add_given(tree, tree.current, picture, caption)
        for key, value in (("images", rel), ("captions", caption), ("orders", f), ("truth", truth),
                           ("written", who), ("proposed", proposed)):
            out[key].append(value)
    return out


def _done(path: str) -> set[str]:
    """The ids already written to ``path``; a torn last line (an interrupted run) is dropped."""
    if not os.path.exists(path):
        return set()
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            kept.append(json.loads(line))
        except json.JSONDecodeError:
            break
    if len(kept) != len(lines) or (lines and not lines[-1].endswith("\n")):
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
    return {r["id"] for r in kept}


def _grow(job: tuple) -> None:
    """One worker: the stories ``records``, appended to ``part`` one by one."""
    preset, overrides, records, part, seed, frames, size, image_root, prefix = job
    import torch

    from seedstory.engine import StoryEngine
    from seedstory.pipeline import SeedStoryPipeline

    torch.set_num_threads(1)  # one core per worker: the workers are the parallelism
    torch.manual_seed(seed)
    if not records:
        return
    engine = StoryEngine(SeedStoryPipeline.from_preset(preset, overrides))
    t0 = time.perf_counter()
    for n, (i, record) in enumerate(records, start=1):
        story = corrected_story(engine, record, seed + 1000 * i, frames, size, image_root, prefix)
        with open(part, "a") as f:
            f.write(json.dumps(story) + "\n")
        print(f"{os.path.basename(part)}: {n}/{len(records)} {story['id']}: {story['written'].count('agent')} of "
              f"{frames - 1} captions the agent's ({time.perf_counter() - t0:.0f} s)", flush=True)


def write_corrected(preset: str, out: str, data: str, image_root: str, stories: int, overrides=(), start: int = 0,
                    frames: int = 30, size: int = 128, seed: int = 0, prefix: str = "corrected_",
                    workers: int = 1) -> dict:
    """Grow ``stories`` corrected stories from the openings of ``data`` (from its ``start``-th story) into ``out``,
    with ``workers`` processes (each its own engine and core). Resumable. Returns who wrote the captions."""
    with open(data) as f:
        records = [(i, json.loads(line)) for i, line in enumerate(f) if start <= i < start + stories]
    if not records:
        raise ValueError(f"no story of {data} from its {start}-th on")
    t0 = time.perf_counter()
    if not os.path.exists(out):
        workers = max(1, min(int(workers), len(records)))
        # Stories already grown in any part file (an interrupted run, perhaps with other workers) stay.
        done = set().union(*(_done(part) for part in glob.glob(f"{out}.part*")))
        todo = [(i, r) for i, r in records if f"{prefix}{r['id']}" not in done]
        jobs = [(preset, list(overrides), todo[w::workers], f"{out}.part{w}", seed, frames, size, image_root, prefix)
                for w in range(workers)]
        if workers == 1:
            _grow(jobs[0])
        else:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(workers) as pool:  # (a forked torch can hang in its thread pool)
                pool.map(_grow, jobs)
        grown = {}
        every_part = glob.glob(f"{out}.part*")
        for part in every_part:
            with open(part) as f:
                grown.update((r["id"], r) for r in map(json.loads, f))
        order = [f"{prefix}{r['id']}" for _, r in records]
        write_text(out, "".join(json.dumps(grown[sid]) + "\n" for sid in order))
        for part in every_part:
            os.remove(part)
    with open(out) as f:
        written = [w for line in f for w in json.loads(line)["written"][1:]]
    agent, world = written.count("agent"), written.count("world")
    return {"stories": len(records), "agent": agent, "world": world,
            "agent_share": agent / len(written) if written else None, "seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="demo", help="the model that writes and its decoding (a preset or folder)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="preset override key=value")
    p.add_argument("--data", default="data/world/train.jsonl", help="the true stories whose openings are used")
    p.add_argument("--image-root", default="data/world/images")
    p.add_argument("--out", default="data/world/corrected.jsonl")
    p.add_argument("--start", type=int, default=0, help="the first story of --data to grow")
    p.add_argument("--stories", type=int, default=100)
    p.add_argument("--frames", type=int, default=30)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="processes, one core each")
    p.add_argument("--prefix", default="corrected_", help="put before each story's id (its image folder, too)")
    args = p.parse_args(argv)
    result = write_corrected(args.preset, resolve_path(args.out), resolve_path(args.data),
                             resolve_path(args.image_root), args.stories, args.overrides, args.start, args.frames,
                             args.size, args.seed, args.prefix, args.workers)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
