"""Corrected stories: the agent's own stories, kept to the world's rules (DAgger-style data for stage 2).

    python -m training.corrected_stories --preset demo --out data/world/corrected.jsonl --stories 200 [--start 0]

From each training story's opening the agent writes the next caption as the story engine does (the preset's
decoding, window and caption candidates), reading the true pictures of the story so far. A caption the world
could have told in that state is kept and its picture is drawn from the world's state; one it could not
(impossible, or not the world's language) is replaced by the world's own next event (``_Story.step``). The
stories thus go where the agent's own choices lead, and every caption in them is possible: trained on them
(mixed with the true stories), the agent is shown what to say exactly where it used to go wrong, in the
states its own stories reach, which the true stories rarely visit.

Each story is one line of ``--out`` (the dataset's format, plus ``written``: who wrote each frame, "agent" or
"world", and ``proposed``: the agent's caption where the world's replaced it), written once its pictures are
saved under ``--image-root``; a rerun skips the stories already there, so an interrupted run continues. Two runs with other ``--start`` values and ``--out`` files can share the cores.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import time

from seedstory.config import resolve_path
from seedstory.data import synthetic as S
from seedstory.data.story_state import StoryState

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
        followed = S.follow_caption(world, text)
        if followed is not None:
            world, events = followed
            caption, who, proposed = " ".join(text.split()), "agent", None
        else:
            world.actions = {}
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
    if len(kept) != len(lines):
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
    return {r["id"] for r in kept}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="demo", help="the model that writes (a preset name or model folder)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="preset override key=value")
    p.add_argument("--data", default="data/world/train.jsonl", help="the true stories whose openings are used")
    p.add_argument("--image-root", default="data/world/images")
    p.add_argument("--out", default="data/world/corrected.jsonl")
    p.add_argument("--start", type=int, default=0, help="the first story of --data to grow")
    p.add_argument("--stories", type=int, default=100)
    p.add_argument("--frames", type=int, default=30)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefix", default="corrected_", help="put before each story's id (its image folder, too)")
    args = p.parse_args(argv)

    import torch

    from seedstory.engine import StoryEngine
    from seedstory.pipeline import SeedStoryPipeline

    torch.manual_seed(args.seed)
    engine = StoryEngine(SeedStoryPipeline.from_preset(args.preset, args.overrides))
    out, image_root = resolve_path(args.out), resolve_path(args.image_root)
    done = _done(out)
    with open(resolve_path(args.data)) as f:
        records = [json.loads(line) for line in f][args.start:args.start + args.stories]
    counts = {"agent": 0, "world": 0}
    t0 = time.perf_counter()
    for i, record in enumerate(records):
        if f"{args.prefix}{record['id']}" in done:
            continue
        story = corrected_story(engine, record, args.seed + 1000 * (args.start + i), args.frames, args.size,
                                image_root, args.prefix)
        with open(out, "a") as f:
            f.write(json.dumps(story) + "\n")
        for who in story["written"][1:]:
            counts[who] += 1
        print(f"{i + 1}/{len(records)} {story['id']}: {story['written'].count('agent')} of {args.frames - 1} "
              f"captions the agent's ({time.perf_counter() - t0:.0f} s)", flush=True)
    total = counts["agent"] + counts["world"]
    result = {**counts, "agent_share": counts["agent"] / total if total else None,
              "seconds": time.perf_counter() - t0}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
