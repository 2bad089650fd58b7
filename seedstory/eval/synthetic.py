"""A story analyzer for the synthetic world (``seedstory.data.synthetic``): it reads stories with the world's
known visual signatures and caption grammar, so a model trained on that world can be measured without a
judge model.

    python -m seedstory.eval.synthetic stories DIR             # generated stories (``eval generate``'s output)
    python -m seedstory.eval.synthetic truth VAL.jsonl --images ROOT     # the data itself (must score ~100%)
    python -m seedstory.eval.synthetic self-check VAL.jsonl --images ROOT  # ground truth vs corrupted frames
    python -m seedstory.eval.synthetic roundtrip VAL.jsonl --images ROOT --preset demo    # the VAE alone
    python -m seedstory.eval.synthetic reconstruct VAL.jsonl --images ROOT --preset demo  # stage-1 fidelity
    python -m seedstory.eval.synthetic predict VAL.jsonl --images ROOT --preset demo      # the agent's next frame

What is measured, over the frames after the opening (the opening is the user's, not the model's):

* **caption validity** — the caption parses as the world's language (every sentence one of its templates).
* **story logic** — the caption is possible in the story so far (``seedstory.data.story_state``: only someone
  present leaves, waves or is waved at; only someone absent arrives; only a prop that is there is picked up),
  over the captions that parse.
* **caption-image agreement** — every character, setting and prop the caption names is drawn (a character
  recognised by its full signature, the setting by sky and ground, a prop held or on the ground). Frames whose
  caption names nothing are not counted. ``strict_agreement`` also checks positions, who holds what and who
  left (``caption_agrees``), over the frames whose caption parses.
* **presence** — everyone the story says is present (read from the captions so far) is drawn with their full
  signature; one count per character per frame, so a blank or half-drawn frame counts against it.
* **character consistency** — each figure drawn in a character's body colour has that character's shape and
  accessory: a character looks the same in every frame it appears in.
* **setting consistency** — from one frame to the next the drawn setting stays, or changes to a setting the
  new frame's caption names; an unrecognisable background counts as a break.
* **signs of trouble**, as rates of frames (lower is better): a blank picture (neither a recognisable setting
  nor a figure), a caption that repeats one of the last eight (a story going round in circles: the agent sees
  eight frames, and ground-truth stories do it for about 4% of their captions), repeats the previous one, or
  is empty.
* **VAE fidelity** (``roundtrip``) — held-out frames encoded and decoded by the de-tokenizer's VAE alone, read
  back the same way: what it loses, no de-tokenizer working in its latents can paint.
* **reconstruction fidelity** (``reconstruct``) — held-out frames through the visual tokenizer and the
  de-tokenizer (stage 1, no agent): the redrawn scene (setting, who stands where holding what, props on the
  ground) read back and compared with the frame's ground truth.
* **next-frame fidelity** (``predict``) — the same, from the features the agent predicts for a held-out frame
  given the real story before it and the frame's caption: the agent's share of what goes wrong in stories.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ..atomic import write_json
from ..data import synthetic as S
from ..data import world as W
from ..data.story_state import StoryState

METRICS = ("caption_validity", "story_logic", "caption_agreement", "strict_agreement", "presence",
           "character_consistency", "setting_consistency")
TARGETS = {"caption_validity": 0.95, "story_logic": 0.95, "caption_agreement": 0.80, "strict_agreement": 0.70,
           "presence": 0.90, "character_consistency": 0.90, "setting_consistency": 0.90}
# Signs of trouble: the share of frames showing them (lower is better), and the most a good model may show.
SIGNS = ("blank_picture", "looped_caption", "repeated_caption", "empty_caption")
SIGN_LIMITS = {"blank_picture": 0.01}
LOOP = 8  # a caption that repeats one of the last LOOP captions is a loop (A, B, A, B or a cycle of five)


# ============================================================================================= one frame
@dataclass
class FrameReading:
    """What the analyzer reads from one (caption, picture) pair."""

    text: str
    scene: dict  # detect() output
    parsed: Optional[dict]  # parse_caption() output, None when invalid

    @property
    def valid(self) -> bool:
        return self.parsed is not None

    def named(self) -> dict:
        """The characters, setting and props the caption says are in the frame: from the grammar when the
        caption parses (someone who leaves, or a prop carried away, is not), else a vocabulary scan."""
        if self.parsed is not None:
            exp = S.caption_expectations(self.text)
            held = [w["holding"] for w in exp["present"].values() if w["holding"] not in (S.ANY, None)]
            return {"characters": list(exp["present"]), "setting": exp["setting"],
                    "props": list(dict.fromkeys(held + list(exp["ground"])))}
        e = S.caption_entities(self.text)
        return {"characters": e["characters"], "setting": e["setting"], "props": e["props"]}

    def missing(self) -> list[str]:
        """Named entities that are not drawn ([] = the caption and the picture agree)."""
        named = self.named()
        drawn_chars = {c["name"] for c in self.scene["characters"] if c.get("name")}
        drawn_props = {c.get("holding") for c in self.scene["characters"]} | {p["name"] for p in self.scene["props"]}
        out = [f"{c} is not drawn" for c in named["characters"] if c not in drawn_chars]
        if named["setting"] is not None and named["setting"] != self.scene["setting"]:
            out.append(f"the {named['setting']} is not drawn (drawn: {self.scene['setting']})")
        out += [f"the {p} is not drawn" for p in named["props"] if p not in drawn_props]
        return out

    def names_anything(self) -> bool:
        named = self.named()
        return bool(named["characters"] or named["setting"] or named["props"])


def read_frame(text: str, image: Image.Image, world: Optional[dict] = None) -> FrameReading:
    return FrameReading(text=text or "", scene=S.detect(image, world), parsed=S.parse_caption(text or ""))


# ============================================================================================= one story
@dataclass
class StoryScore:
    name: str
    frames: int  # frames analysed (after the opening)
    counts: dict = field(default_factory=dict)  # metric -> [passed, total]; sign -> [frames showing it, frames]
    problems: list = field(default_factory=list)  # (frame index, metric, what)
    per_frame: dict = field(default_factory=dict)  # frame index -> metric -> [passed, total]

    def rate(self, metric: str) -> Optional[float]:
        ok, total = self.counts.get(metric, (0, 0))
        return ok / total if total else None

    def to_dict(self) -> dict:
        return {"name": self.name, "frames": self.frames,
                **{m: self.rate(m) for m in (*METRICS, *SIGNS)},
                "counts": {k: list(v) for k, v in self.counts.items()},
                "problems": [{"frame": i, "metric": m, "what": w} for i, m, w in self.problems]}


def _tally(score: StoryScore, key: str, hit: bool, frame: int) -> None:
    passed, total = score.counts.get(key, (0, 0))
    score.counts[key] = (passed + int(hit), total + 1)
    here = score.per_frame.setdefault(frame, {}).setdefault(key, [0, 0])
    here[0] += int(hit)
    here[1] += 1


def _count(score: StoryScore, metric: str, ok: bool, frame: int, what: str = "") -> None:
    """One more frame (or figure) for ``metric``; a miss is kept as a problem with ``what`` went wrong."""
    _tally(score, metric, ok, frame)
    if not ok and len(score.problems) < 200:
        score.problems.append((frame, metric, what))


def _sign(score: StoryScore, sign: str, shown: bool, frame: int) -> None:
    """One more frame for a sign of trouble: counts [frames showing it, frames]."""
    _tally(score, sign, shown, frame)


def _is_blank(scene: dict) -> bool:
    return scene["setting"] is None and not scene["figures"]


def score_story(name: str, frames: Sequence[tuple[str, Image.Image]], world: Optional[dict] = None,
                skip_opening: bool = True) -> StoryScore:
    """Score a story given as (caption, picture) pairs in order; frame 0 is the opening (its caption sets up the
    story's state and is never judged for story logic)."""
    from ..engine import caption_key

    readings = [read_frame(t, im, world) for t, im in frames]
    first = 1 if skip_opening else 0
    score = StoryScore(name, max(0, len(readings) - first))
    state = StoryState.opening(readings[0].text) if readings else StoryState()
    for i in range(first, len(readings)):
        r = readings[i]
        _count(score, "caption_validity", r.valid, i, "" if r.valid else f"does not parse: {r.text[:80]!r}")
        impossible = state.read(r.text) if i >= 1 else None  # the opening sets the story up: not judged
        if impossible is not None:
            _count(score, "story_logic", not impossible, i, "; ".join(impossible))
        if r.names_anything():
            miss = r.missing()
            _count(score, "caption_agreement", not miss, i, "; ".join(miss))
        if r.valid:
            strict = S.caption_agrees(r.text, r.scene)
            _count(score, "strict_agreement", not strict, i, "; ".join(strict))
        drawn = {c["name"] for c in r.scene["characters"] if c.get("name")}
        for who in state.present:
            _count(score, "presence", who in drawn, i, f"{who} is there but not drawn")
        for fig in r.scene["figures"]:
            ok = fig["shape_ok"] and fig["accessory_ok"]
            what = "" if ok else (f"{fig['colour_of']}'s colour {fig['position']} but "
                                  + ("wrong shape" if not fig["shape_ok"] else "no accessory")
                                  + (f" (looks like {fig['best_other']})" if not fig["shape_ok"] else ""))
            _count(score, "character_consistency", ok, i, what)
        if i >= 1:
            before, now = readings[i - 1].scene["setting"], r.scene["setting"]
            announced = now is not None and r.named()["setting"] == now
            ok = now is not None and (now == before or announced)
            what = ("unrecognisable background" if now is None
                    else f"{before} -> {now} without the caption saying so")
            _count(score, "setting_consistency", ok, i, "" if ok else what)
            recent = {caption_key(t.text) for t in readings[max(0, i - LOOP):i]}
            _sign(score, "looped_caption", caption_key(r.text) in recent, i)
            _sign(score, "repeated_caption", caption_key(r.text) == caption_key(readings[i - 1].text), i)
        _sign(score, "blank_picture", _is_blank(r.scene), i)
        _sign(score, "empty_caption", not r.text.strip(), i)
    return score


# ============================================================================================= many stories
@dataclass
class Report:
    stories: list[StoryScore]
    skipped: list = field(default_factory=list)  # (name, why)

    def totals(self) -> dict:
        agg: dict = {}
        for s in self.stories:
            for m, (ok, total) in s.counts.items():
                a = agg.setdefault(m, [0, 0])
                a[0] += ok
                a[1] += total
        return agg

    def overall(self) -> dict:
        return {m: (ok / total if total else None) for m, (ok, total) in self.totals().items()}

    def to_dict(self) -> dict:
        overall = self.overall()
        return {"stories": len(self.stories), "frames": sum(s.frames for s in self.stories),
                "overall": overall, "counts": self.totals(),
                "targets": self.targets(),
                "per_story": [s.to_dict() for s in self.stories],
                "skipped": [{"name": n, "why": w} for n, w in self.skipped]}

    def targets(self) -> dict:
        """Each target with the value reached: at least ``target`` for a metric, at most for a sign of trouble."""
        overall = self.overall()
        out = {m: {"target": t, "value": overall.get(m), "met": overall.get(m) is not None and overall[m] >= t}
               for m, t in TARGETS.items()}
        out.update({m: {"target": t, "at_most": True, "value": overall.get(m),
                        "met": overall.get(m) is not None and overall[m] <= t} for m, t in SIGN_LIMITS.items()})
        return out

    def markdown(self) -> str:
        totals, targets = self.totals(), self.targets()
        lines = [f"{len(self.stories)} stories, {sum(s.frames for s in self.stories)} frames analysed"
                 + (f" ({len(self.skipped)} skipped)" if self.skipped else ""), "",
                 "| metric | value | passed/counted | target |", "|---|---|---|---|"]
        for m in (*METRICS, *SIGNS):
            if m not in totals:
                continue
            ok, total = totals[m]
            target = ""
            if m in targets:
                t = targets[m]
                target = f"{'≤' if t.get('at_most') else '≥'} {t['target']:.0%} {'✓' if t['met'] else '✗'}"
            label = m.replace("_", " ") + (" (share of frames)" if m in SIGNS else "")
            lines.append(f"| {label} | {ok / total:.1%} | {ok}/{total} | {target} |")
        common = Counter((m, w.split(" (")[0]) for s in self.stories for _, m, w in s.problems)
        if common:
            lines += ["", "Most common problems:"]
            lines += [f"- {m}: {w} ×{n}" for (m, w), n in common.most_common(8)]
        return "\n".join(lines)


def analyze(stories: Iterable[tuple[str, Sequence[tuple[str, Image.Image]]]], world: Optional[dict] = None,
            skip_opening: bool = True, progress: bool = False) -> Report:
    from tqdm.auto import tqdm

    return Report([score_story(name, frames, world, skip_opening)
                   for name, frames in tqdm(stories, desc="analysing", unit="story", disable=not progress)])


def saved_stories(root: str, max_frames: int = 0):
    """(name, [(caption, picture)]) for each saved story under ``root`` (the current path of each tree)."""
    from ..eval.judge import discover_stories
    from ..storage import load_story

    for name, path in discover_stories(root):
        tree = load_story(path)
        if tree.current is None:
            continue
        frames = [(f.text, f.image) for f in tree.path(tree.leaf(tree.current)) if f.image is not None]
        yield name, frames[:max_frames] if max_frames else frames


def dataset_stories(jsonl: str, image_root: str, limit: int = 0, max_frames: int = 0):
    """(name, [(caption, picture)], truths) for each story of a synthetic-world jsonl."""
    with open(jsonl, encoding="utf-8") as f:
        n = 0
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            k = max_frames or len(rec["images"])
            frames = []
            for rel, cap in list(zip(rec["images"], rec["captions"]))[:k]:
                with Image.open(os.path.join(image_root, rel)) as im:
                    frames.append((cap, im.convert("RGB")))
            yield rec.get("id", f"story_{n}"), frames, rec.get("truth", [])[:k]
            n += 1
            if limit and n >= limit:
                return


def load_world(path: Optional[str]) -> Optional[dict]:
    """A dataset's ``world.json``, which must be the world this package draws: the analyzer reads pictures by
    its colours and calibration, and a file left by another version of the world misreads them (one with two
    retired colours made 30% of a bench's backgrounds unrecognisable). Raises ValueError naming what differs."""
    if not path:
        return None
    with open(path, encoding="utf-8") as f:
        world = json.load(f)
    current = S.world_json()
    if world != current:
        differ = sorted(k for k in set(world) | set(current) if world.get(k) != current.get(k))
        raise ValueError(f"{path} was written by another version of the synthetic world (its {', '.join(differ)} "
                         "differ from this package's); regenerate the data with python -m seedstory.data.synthetic "
                         "(same --out), or analyze without it")
    return world


# ============================================================================================= self-check
def _rgb(world: dict, name: str) -> np.ndarray:
    return np.asarray(world["colours"][name], np.float32)


def recolour_character(image: Image.Image, truth: dict, world: dict, rng: np.random.Generator) -> Optional[Image.Image]:
    """A character drawn in another character's body colour (that other has a different shape): the
    signature breaks. None when the frame has no character."""
    if not truth["characters"]:
        return None
    c = truth["characters"][int(rng.integers(len(truth["characters"])))]
    me = next(ch for ch in world["cast"] if ch["name"] == c["name"])
    others = [ch for ch in world["cast"] if ch["shape"] != me["shape"]]
    other = others[int(rng.integers(len(others)))]
    arr = np.asarray(image.convert("RGB"), np.float32).copy()
    n = arr.shape[0]
    x = world["layout"]["slot_x"][c["position"]]
    dx0, dx1, y0, y1 = world["layout"]["body_region"]
    box = (slice(max(0, int((y0 - 0.06) * n)), min(n, int(y1 * n) + 1)),
           slice(max(0, int((x + dx0) * n)), min(n, int((x + dx1) * n) + 1)))
    patch = arr[box]
    near = np.linalg.norm(patch - _rgb(world, me["colour"]), axis=-1) < 60
    patch[near] = _rgb(world, other["colour"])
    arr[box] = patch
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def change_setting(image: Image.Image, truth: dict, world: dict, rng: np.random.Generator,
                   avoid: Sequence[str] = ()) -> Image.Image:
    """The same frame with another setting's sky and ground colours, one the caption does not name (nor
    ``avoid``: the setting of the frame before, to which an unannounced change back would look like none)."""
    here = world["settings"][truth["setting"]]
    choices = [s for s in world["settings"] if s != truth["setting"] and s not in avoid]
    other = choices[int(rng.integers(len(choices)))]
    there = world["settings"][other]
    arr = np.asarray(image.convert("RGB"), np.float32).copy()
    for part in ("sky", "ground"):
        near = np.linalg.norm(arr - _rgb(world, here[part]), axis=-1) < 30
        arr[near] = _rgb(world, there[part])
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def without_character(truth: dict, rng: np.random.Generator) -> Optional[Image.Image]:
    """The frame redrawn with one of its characters left out (the story still says they are there). None when
    the frame has no character."""
    if not truth["characters"]:
        return None
    gone = int(rng.integers(len(truth["characters"])))
    kept = dict(truth, characters=[c for k, c in enumerate(truth["characters"]) if k != gone])
    return S.render_frame(kept, S.DETECT_SIZE)


def impossible_caption(truth: dict, rng: np.random.Generator) -> str:
    """A well-formed caption that cannot happen right after a frame whose ground ``truth`` is given (built from
    the data's truth, not from the analyzer's own reading): someone absent leaves or is waved at, someone present
    arrives, or a prop is picked up where it does not lie."""
    here = {c["name"]: c for c in truth["characters"]}
    present, absent = sorted(here), [c for c in W.CHARACTERS if c not in here]
    options = []
    if absent:
        options.append(f"{absent[int(rng.integers(len(absent)))]} leaves.")
    if present:
        c = present[int(rng.integers(len(present)))]
        options.append(f"{c} arrives {W.AT_PHRASE[W.POSITIONS[int(rng.integers(len(W.POSITIONS)))]]}.")
        if absent:
            options.append(f"{c} waves at {absent[int(rng.integers(len(absent)))]}.")
        if here[c]["holding"] is None:
            spot = next((p["name"] for p in truth["props"] if p["position"] == here[c]["position"]), None)
            elsewhere = [p for p in W.PROP_NAMES if p != spot]
            options.append(f"{c} picks up the {elsewhere[int(rng.integers(len(elsewhere)))]}.")
    return options[int(rng.integers(len(options)))]


def self_check(jsonl: str, image_root: str, stories: int = 20, max_frames: int = 0, seed: int = 0,
               world: Optional[dict] = None) -> dict:
    """Score ground-truth stories (should be ~100%), then the same stories with one frame in each corrupted
    in one way at a time, and report how often the analyzer catches each corruption (the metric it must
    lower does fail on that frame)."""
    world = world or S.world_json()
    rng = np.random.default_rng(seed)
    data = list(dataset_stories(jsonl, image_root, stories, max_frames))
    truth_report = analyze(((n, fr) for n, fr, _ in data), world)
    caught, tried = Counter(), Counter()
    captions = [cap for _, fr, _ in data for cap, _ in fr]
    for name, frames, truths in data:
        if len(frames) < 3:
            continue
        i = int(rng.integers(1, len(frames)))
        corruptions = {
            "character_consistency": recolour_character(frames[i][1], truths[i], world, rng),
            "setting_consistency": change_setting(frames[i][1], truths[i], world, rng,
                                                  avoid=[truths[i - 1]["setting"]]),
        }
        corruptions["presence"] = without_character(truths[i], rng)
        for metric, picture in corruptions.items():
            if picture is None:
                continue
            tried[metric] += 1
            caught[metric] += _caught(name, frames[:i] + [(frames[i][0], picture)], world, metric)
        tried["story_logic"] += 1
        caught["story_logic"] += _caught(name, frames[:i] + [(impossible_caption(truths[i - 1], rng), frames[i][1])],
                                         world, "story_logic")
        # a caption from elsewhere that names someone or something not drawn here
        reading = read_frame(frames[i][0], frames[i][1], world)
        for other in rng.permutation(len(captions))[:50]:
            cand = read_frame(captions[other], frames[i][1], world)
            if cand.valid and cand.missing():
                broken = list(frames)
                broken[i] = (captions[other], frames[i][1])
                tried["caption_agreement"] += 1
                caught["caption_agreement"] += _caught(name, broken[:i + 1], world, "caption_agreement")
                break
        words = reading.text.split()
        garbled = " ".join(words[: max(1, len(words) // 2)]) + " zorp blim."
        broken = list(frames)
        broken[i] = (garbled, frames[i][1])
        tried["caption_validity"] += 1
        caught["caption_validity"] += _caught(name, broken[:i + 1], world, "caption_validity")
    overall = truth_report.overall()
    return {"ground_truth": {m: overall[m] for m in METRICS if m in overall},
            "ground_truth_signs": {m: overall[m] for m in SIGNS if m in overall},
            "ground_truth_counts": truth_report.totals(),
            "corruptions_caught": {m: {"caught": caught[m], "tried": tried[m],
                                       "rate": caught[m] / tried[m] if tried[m] else None} for m in tried}}


def _caught(name: str, frames: Sequence[tuple], world: dict, metric: str) -> bool:
    """Does ``metric`` fail on the last of ``frames`` (scored after the story before it)?"""
    last = len(frames) - 1
    return any(i == last and m == metric for i, m, _ in score_story(name, frames, world).problems)


# ============================================================================================= reconstruction
class _SceneTally:
    """Redrawn frames read back and compared with their ground truth (``reconstruct`` and ``predict``)."""

    def __init__(self, world: Optional[dict]):
        self.world, self.counts, self.examples = world, Counter(), []

    def add(self, key: str, redrawn: Image.Image, truth: dict) -> None:
        got, want = S.detect(redrawn, self.world), S.truth_scene(truth)
        diffs = S.scene_diff(want, got)
        c = self.counts
        c["frames"] += 1
        c["exact"] += not diffs
        c["setting"] += got["setting"] == want["setting"]
        w = {f["position"]: f["name"] for f in want["characters"]}
        g = {f["position"]: f["name"] for f in got["characters"]}
        c["characters"] += sum(g.get(p) == n for p, n in w.items())
        c["characters_total"] += len(w)
        c["extra_figures"] += sum(1 for p in g if p not in w)
        held = {(f["position"], f["name"]): f["holding"] for f in got["characters"]}
        for f in want["characters"]:
            if f["holding"]:
                c["held_props"] += held.get((f["position"], f["name"])) == f["holding"]
                c["held_props_total"] += 1
        lying = {p["position"]: p["name"] for p in got["props"]}
        c["ground_props"] += sum(lying.get(p["position"]) == p["name"] for p in want["props"])
        c["ground_props_total"] += len(want["props"])
        if diffs and len(self.examples) < 10:
            self.examples.append({"frame": key, "diffs": diffs})

    def result(self) -> dict:
        c = self.counts
        n = max(1, c["frames"])
        return {"frames": c["frames"], "scene_exact": c["exact"] / n, "setting": c["setting"] / n,
                "characters": c["characters"] / max(1, c["characters_total"]),
                "extra_figures_per_frame": c["extra_figures"] / n,
                "held_props": c["held_props"] / c["held_props_total"] if c["held_props_total"] else None,
                "ground_props": c["ground_props"] / c["ground_props_total"] if c["ground_props_total"] else None,
                "examples": self.examples}


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="frame", disable=not enabled)


def _redrawn(jsonl: str, image_root: str, frames: int, seed: int, world: Optional[dict], progress: bool, desc: str,
             redraw: Callable[[Image.Image, int], Image.Image]) -> dict:
    """``frames`` held-out frames (spread over the file's stories, drawn with ``seed``), each redrawn by
    ``redraw(picture, index)``, read back and compared with its ground truth."""
    items = [(f"{name}/{k}", im, t) for name, fr, truths in dataset_stories(jsonl, image_root)
             for k, ((_, im), t) in enumerate(zip(fr, truths))]
    order = np.random.default_rng(seed).permutation(len(items))[:frames]
    tally, bar = _SceneTally(world), _progress(len(order), desc, progress)
    for j in order:
        key, image, truth = items[int(j)]
        tally.add(key, redraw(image, int(j)), truth)
        bar.update(1)
    bar.close()
    return tally.result()


@torch.no_grad()
def roundtrip(jsonl: str, image_root: str, preset: str, overrides: Optional[list[str]] = None, frames: int = 50,
              seed: int = 0, world: Optional[dict] = None, progress: bool = True) -> dict:
    """The VAE alone: ``frames`` held-out frames encoded (the posterior's mode) and decoded, read back and compared
    with the ground truth. Nothing the VAE loses can be painted by any de-tokenizer that works in its latents."""
    from diffusers.image_processor import VaeImageProcessor

    from ..pipeline import SeedStoryPipeline

    detokenizer = SeedStoryPipeline.from_preset(preset, overrides).detokenizer
    vae, pixels = detokenizer.vae, VaeImageProcessor(vae_scale_factor=detokenizer.vae_scale_factor)

    def redraw(image, _):
        x = pixels.preprocess(image.convert("RGB")).to(vae.device, vae.dtype)
        return pixels.postprocess(vae.decode(vae.encode(x).latent_dist.mode()).sample.float())[0]

    return _redrawn(jsonl, image_root, frames, seed, world, progress, "roundtrip", redraw)


def reconstruct(jsonl: str, image_root: str, preset: str, overrides: Optional[list[str]] = None, frames: int = 50,
                seed: int = 0, world: Optional[dict] = None, progress: bool = True) -> dict:
    """Stage-1 fidelity: ``frames`` held-out frames (spread over the file's stories) through the visual
    tokenizer and the de-tokenizer; the redrawn scene is read back and compared with the ground truth."""
    from ..pipeline import SeedStoryPipeline

    pipe = SeedStoryPipeline.from_preset(preset, overrides)
    return _redrawn(jsonl, image_root, frames, seed, world, progress, "reconstruct",
                    lambda image, j: pipe.paint(pipe.encode_image(image), seed=seed + j))


@torch.no_grad()
def predicted_features(pipe, captions: Sequence[str], images: Sequence[Image.Image]) -> torch.Tensor:
    """The agent's features for the last frame given the real frames before it and the last caption
    (teacher forcing, through the training serializer): [1, n_queries, D], fp32 on the CPU."""
    from ..data.datasets import collate_story_samples

    encoded = pipe.prompt.training_sample(list(captions), len(captions) - 2)
    if encoded is None:
        raise ValueError("the frames do not fit the prompt")
    agent = pipe.agent
    image_embeds = torch.cat([pipe.encode_image(im) for im in images])  # [n_images, n_queries, D]
    sample = dict(encoded.as_dict(), pixel_values=image_embeds)  # collated as the training batch's images
    batch = collate_story_samples([sample], pad_id=pipe.prompt.eos_id)
    image_embeds = batch.pop("pixel_values").to(agent.device, agent.dtype)
    out = agent(**{k: v.to(agent.device) for k, v in batch.items()}, image_embeds=image_embeds,
                return_recon_image_embeds=True)
    return out["recon_image_embeds"].float().cpu()


def predict(jsonl: str, image_root: str, preset: str, overrides: Optional[list[str]] = None, frames: int = 50,
            seed: int = 0, window: int = 8, world: Optional[dict] = None, progress: bool = True) -> dict:
    """The agent's next-frame fidelity: for ``frames`` held-out frames (none an opening), the agent reads the
    real story before it (up to ``window`` frames: pictures and captions) and the frame's own caption, the
    de-tokenizer paints the features it predicts, and the scene is read back and compared with the ground
    truth. Beside ``reconstruct`` (the real features) it tells the agent's errors from the de-tokenizer's."""
    from ..pipeline import SeedStoryPipeline

    if window < 1:
        raise ValueError("window must be at least 1 (one real frame before the predicted one)")
    pipe = SeedStoryPipeline.from_preset(preset, overrides)
    stories = list(dataset_stories(jsonl, image_root))
    items = [(si, k) for si, (_, fr, _) in enumerate(stories) for k in range(1, len(fr))]
    order = np.random.default_rng(seed).permutation(len(items))[:frames]
    tally, bar = _SceneTally(world), _progress(len(order), "predict", progress)
    for j in order:
        si, k = items[int(j)]
        name, fr, truths = stories[si]
        first = max(0, k - window)
        captions, images = [c for c, _ in fr[first:k + 1]], [im for _, im in fr[first:k + 1]]
        features = predicted_features(pipe, captions, images)
        tally.add(f"{name}/{k}", pipe.paint(features, seed=seed + int(j)), truths[k])
        bar.update(1)
    bar.close()
    return tally.result()


def logic(jsonl: str, image_root: str, preset: str, overrides: Optional[list[str]] = None, stories: int = 10,
          frames: int = 25, seed: int = 0, progress: bool = True) -> dict:
    """Teacher-forced story logic, the text's fast proxy: before each frame of ``stories`` held-out stories the
    agent reads the real story so far (pictures and captions, through the engine and the preset's window), writes
    the next caption with the preset's decoding, and ``StoryState`` judges it against the true story. A model that
    fails here cannot tell a logical story on its own; the bench's free-running figure is lower still."""
    from ..engine import StoryEngine
    from ..pipeline import SeedStoryPipeline

    engine = StoryEngine(SeedStoryPipeline.from_preset(preset, overrides))
    items = list(dataset_stories(jsonl, image_root, stories, frames))
    bar = _progress(sum(len(fr) - 1 for _, fr, _ in items), "logic", progress)
    possible = judged = unparsed = 0
    reasons: Counter = Counter()
    for si, (name, fr, _) in enumerate(items):
        tree = engine.start(fr[0][1], fr[0][0])
        state = StoryState.opening(fr[0][0])
        for k, (caption, picture) in enumerate(fr[1:], start=1):
            text = engine.draft_text(tree, tree.current, seed=seed + 1000 * si + k)
            why = copy.deepcopy(state).read(text)
            if why is None:
                unparsed += 1
            else:
                judged += 1
                possible += not why
                reasons.update(why)
            state.read(caption, judge=False)
            engine.add_given(tree, tree.current, picture, caption)
            bar.update(1)
    bar.close()
    return {"captions": judged + unparsed, "judged": judged, "story_logic": possible / judged if judged else None,
            "unparsed": unparsed, "problems": dict(reasons.most_common(10))}


# ============================================================================================= CLI
def _print(result, as_json: bool, text: str) -> None:
    print(json.dumps(result, indent=2) if as_json else text)


def _write(out: Optional[str], result) -> None:
    if out:
        write_json(out, result)


def add_arguments(sub) -> None:
    p = sub.add_parser("stories", help="analyse saved stories (a folder of story folders or .zip files)")
    p.add_argument("dir")
    p.add_argument("--max-frames", type=int, default=0, help="only the first N frames of each story")
    p = sub.add_parser("truth", help="analyse the dataset's own stories (the analyzer must score them ~100%%)")
    p.add_argument("jsonl")
    p.add_argument("--images", required=True, help="image root")
    p.add_argument("--stories", type=int, default=0, help="only the first N stories")
    p.add_argument("--max-frames", type=int, default=0)
    p = sub.add_parser("self-check", help="ground truth vs deliberately corrupted frames")
    p.add_argument("jsonl")
    p.add_argument("--images", required=True)
    p.add_argument("--stories", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    for name, help_text in (
        ("roundtrip", "the VAE alone: frames -> encode -> decode -> read (what no de-tokenizer can get back)"),
        ("reconstruct", "stage-1 fidelity: frames -> visual tokenizer -> de-tokenizer -> read"),
        ("predict", "the agent's next-frame fidelity: real story so far -> agent's features -> de-tokenizer -> read"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("jsonl")
        p.add_argument("--images", required=True)
        p.add_argument("--preset", default=None, help="model preset (default: the demo model when present)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
        p.add_argument("--frames", type=int, default=50)
        p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window", type=int, default=8, help="real frames before the predicted one (default 8)")
    p = sub.add_parser("logic", help="teacher-forced story logic: real story so far -> the agent's next caption -> "
                                     "is it possible?")
    p.add_argument("jsonl")
    p.add_argument("--images", required=True)
    p.add_argument("--preset", default=None, help="model preset (default: the demo model when present)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--stories", type=int, default=10)
    p.add_argument("--frames", type=int, default=25, help="frames of each story (the opening and what follows)")
    p.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    try:
        world = load_world(getattr(args, "world", None))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.what == "stories":
        if not os.path.isdir(args.dir):
            print(f"error: {args.dir} is not a folder of stories", file=sys.stderr)
            return 1
        report = analyze(saved_stories(args.dir, args.max_frames), world, progress=True)
        result, text = report.to_dict(), report.markdown()
    elif args.what in ("truth", "self-check", "roundtrip", "reconstruct", "predict", "logic"):
        for path in (args.jsonl, args.images):
            if not os.path.exists(path):
                print(f"error: {path} not found", file=sys.stderr)
                return 1
        if args.what == "truth":
            report = analyze(((n, fr) for n, fr, _ in dataset_stories(args.jsonl, args.images, args.stories,
                                                                         args.max_frames)), world, progress=True)
            result, text = report.to_dict(), report.markdown()
        elif args.what == "self-check":
            result = self_check(args.jsonl, args.images, args.stories, seed=args.seed, world=world)
            text = "ground truth: " + ", ".join(f"{m} {v:.1%}" for m, v in result["ground_truth"].items() if v is not None)
            text += "\nsigns of trouble in the ground truth (share of frames): " + ", ".join(
                f"{m} {v:.1%}" for m, v in result["ground_truth_signs"].items())
            text += "\ncorrupted frames caught: " + ", ".join(
                f"{m} {v['caught']}/{v['tried']}" for m, v in result["corruptions_caught"].items())
        else:
            from ..cli import default_preset

            if args.what == "logic":
                result = logic(args.jsonl, args.images, args.preset or default_preset(), args.overrides,
                               args.stories, args.frames, args.seed)
                rate = "n/a" if result["story_logic"] is None else f"{result['story_logic']:.1%}"
                text = (f"teacher-forced story logic {rate} of {result['judged']} captions ({result['unparsed']} did "
                        "not parse); most common problems: "
                        + "; ".join(f"{k} x{v}" for k, v in result["problems"].items()))
            elif args.what == "roundtrip":
                result = roundtrip(args.jsonl, args.images, args.preset or default_preset(), args.overrides,
                                   args.frames, args.seed, world)
            elif args.what == "reconstruct":
                result = reconstruct(args.jsonl, args.images, args.preset or default_preset(), args.overrides,
                                     args.frames, args.seed, world)
            else:
                result = predict(args.jsonl, args.images, args.preset or default_preset(), args.overrides,
                                 args.frames, args.seed, args.window, world)
            if args.what != "logic":
                done = {"roundtrip": "round-tripped", "reconstruct": "redrawn"}.get(args.what, "predicted")
                rate = lambda v: "n/a" if v is None else f"{v:.1%}"  # noqa: E731
                text = (f"{result['frames']} frames {done}: scene exact {result['scene_exact']:.1%}, setting "
                        f"{result['setting']:.1%}, characters {result['characters']:.1%}, held props "
                        f"{rate(result['held_props'])}, props on the ground {rate(result['ground_props'])}, extra "
                        f"figures/frame {result['extra_figures_per_frame']:.2f}")
    _write(args.out, result)
    _print(result, args.json, text)
    return 0


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options and sub-commands, for ``python -m seedstory.eval.synthetic`` and ``python -m seedstory.eval
    synthetic`` alike."""
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")
    parser.add_argument("--out", help="also write the full result as JSON to this file")
    parser.add_argument("--world", help="world.json of the dataset (default: this package's world)")
    sub = parser.add_subparsers(dest="what", required=True)
    add_arguments(sub)
    parser.set_defaults(func=run)
    return parser


def build_parser() -> argparse.ArgumentParser:
    return configure(argparse.ArgumentParser(prog="python -m seedstory.eval.synthetic", description=__doc__,
                                             formatter_class=argparse.RawDescriptionHelpFormatter))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
