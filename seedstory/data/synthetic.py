"""A synthetic picture-story world: procedural StoryStream-format stories with per-frame ground truth,
a caption grammar with a parser, and a pixel-side detector. Our own data, for tests and the demo model.

    python -m seedstory.data.synthetic --out data/world --stories 3000 --frames 30 --size 128 --seed 0

writes ``DIR/images/<story_id>/<frame>.png``, ``DIR/train.jsonl`` and ``DIR/val.jsonl`` (one story a line:
``{"id", "images", "captions", "orders", "truth"}``, image paths relative to ``DIR/images``) and
``DIR/world.json`` (cast, settings, props, colours, layout, grammar and the detector's calibration).

The world (``seedstory.data.world``): six characters with unique (shape, colour, accessory) signatures,
six settings, five props, three positions, five actions. A story is a state machine: a setting, who is
present where holding what, what lies on the ground of each place. Frame 0 describes the opening scene;
every later frame applies one or two events (arrive, leave, move, swap, pick up, fetch, drop, give, an
action, or travel) whose caption sentences always state what the frame shows. The setting changes only on
a travel event, whose caption names the new place.

For the analyzer:

* ``parse_caption(text)`` -> dict or None (None: not a sentence sequence of the world's language);
  ``caption_entities(text)`` -> the characters, setting and props a text names (any text);
  ``caption_expectations(text)`` / ``caption_agrees(text, scene)``: what a caption says must be drawn;
* ``detect(image, world=None)`` -> ``{"setting", "characters": [{"name", "position", "holding"}], "props",
  "figures"}`` read from pixels at any size (resized to 128 internally); ``scene_diff(truth, detected)``.

Deterministic: story ``i`` of seed ``s`` depends only on (s, i), never on the number of stories or workers.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import re
import string
from functools import lru_cache
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

from . import world as W
from .world import (
    ACCESSORIES, AT_PHRASE, BY_NAME, CHARACTERS, COLOURS, FEET_Y, HELD_DY, JUMP, POSITIONS, PROP_NAMES,
    PROPS, SETTING_NAMES, SETTINGS, SHAPES, SLOT_X, TEMPLATES, setting_phrase,
)

__all__ = [
    "parse_caption", "parse_sentence", "split_sentences", "caption_entities", "caption_expectations",
    "caption_agrees", "generate_story", "render_frame", "detect", "scene_diff", "truth_scene", "world_json", "main",
]

DETECT_SIZE = 128

# ================================================================================================ grammar
_NAME = "|".join(CHARACTERS)
_PROP = "|".join(sorted(PROP_NAMES, key=len, reverse=True))
_SETTING = "|".join(sorted(SETTING_NAMES, key=len, reverse=True))
_IN_S = "|".join(setting_phrase(s) for s in SETTING_NAMES)
_SLOT_RE = {
    "c": rf"(?P<c>{_NAME})", "c2": rf"(?P<c2>{_NAME})",
    "cs": rf"(?P<cs>(?:{_NAME})(?:, (?:{_NAME}))* and (?:{_NAME}))",
    "p": rf"(?P<p>{_PROP})", "ap": rf"(?P<art>a|an) (?P<p>{_PROP})", "AP": rf"(?P<art>A|An) (?P<p>{_PROP})",
    "at": rf"(?P<at>{'|'.join(AT_PHRASE[p] for p in POSITIONS)})", "to": rf"(?P<to>{'|'.join(POSITIONS)})",
    "s": rf"(?P<s>{_SETTING})", "in_s": rf"(?P<in_s>{_IN_S})",
}
_AT = {v: k for k, v in AT_PHRASE.items()}
_IN_S_TO_SETTING = {setting_phrase(s): s for s in SETTING_NAMES}


def _template_regex(template: str) -> re.Pattern:
    out = []
    for literal, field, _, _ in string.Formatter().parse(template):
        out.append(re.escape(literal))
        if field is not None:
            out.append(_SLOT_RE[field])
    return re.compile("".join(out))


_PATTERNS = [(event, _template_regex(t)) for event, ts in TEMPLATES.items() for t in ts]


def _names(list_text: str) -> list[str]:
    head, last = list_text.rsplit(" and ", 1)
    return head.split(", ") + [last]


def parse_sentence(sentence: str) -> Optional[dict]:
    for event, pattern in _PATTERNS:
        m = pattern.fullmatch(sentence)
        if m is None:
            continue
        g = m.groupdict()
        chars = []
        if g.get("c"):
            chars.append(g["c"])
        if g.get("c2"):
            chars.append(g["c2"])
        if g.get("cs"):
            chars.extend(_names(g["cs"]))
        if len(set(chars)) != len(chars):
            continue  # "Pim gives the apple to Pim."
        prop = g.get("p")
        if g.get("art") is not None and g["art"].lower() != PROPS[prop]["article"]:
            continue  # "a apple"
        setting = g.get("s") or (_IN_S_TO_SETTING[g["in_s"]] if g.get("in_s") else None)
        position = _AT[g["at"]] if g.get("at") else g.get("to")
        return {"event": event, "characters": chars, "prop": prop, "position": position, "setting": setting}
    return None


def split_sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=\.)\s+", text.strip()) if s]


def parse_caption(text: str) -> Optional[dict]:
    """``{"sentences": [{"event", "characters", "prop", "position", "setting"}...], "characters", "setting",
    "props"}`` when every sentence of ``text`` is one of the world's templates; otherwise None."""
    if not isinstance(text, str) or not text.strip():
        return None
    sentences = []
    for s in split_sentences(" ".join(text.split())):
        parsed = parse_sentence(s)
        if parsed is None:
            return None
        sentences.append(parsed)
    chars, props, settings = [], [], []
    for s in sentences:
        chars += [c for c in s["characters"] if c not in chars]
        if s["prop"] and s["prop"] not in props:
            props.append(s["prop"])
        if s["setting"] and s["setting"] not in settings:
            settings.append(s["setting"])
    if len(settings) > 1:
        return None  # one frame shows one place
    return {"sentences": sentences, "characters": chars, "setting": settings[0] if settings else None,
            "props": props}


_WORD_RE = re.compile(rf"\b(?:{_NAME}|{_PROP}|{_SETTING})\b")


def caption_entities(text: str) -> dict:
    """The characters, setting(s) and props any text names (vocabulary scan; works on invalid text too)."""
    chars, props, settings = [], [], []
    for m in _WORD_RE.finditer(text or ""):
        w = m.group(0)
        bucket = chars if w in BY_NAME else props if w in PROPS else settings
        if w not in bucket:
            bucket.append(w)
    return {"characters": chars, "settings": settings, "setting": settings[0] if len(settings) == 1 else None,
            "props": props}


ANY = "?"  # expectation wildcard: present, position / holding not stated


def caption_expectations(text: str) -> Optional[dict]:
    """What the frame a caption describes must show, or None when the caption does not parse:
    ``{"setting": name | None, "present": {name: {"position": pos | "?", "holding": prop | None | "?"}},
    "absent": [names], "ground": {prop: pos | "?"}}``."""
    parsed = parse_caption(text)
    if parsed is None:
        return None
    exp = {"setting": parsed["setting"], "present": {}, "absent": [], "ground": {}}

    def present(name, position=ANY, holding=ANY):
        cur = exp["present"].setdefault(name, {"position": ANY, "holding": ANY})
        if position != ANY:
            cur["position"] = position
        if holding != ANY:
            cur["holding"] = holding

    for s in parsed["sentences"]:
        e, cs, p, pos = s["event"], s["characters"], s["prop"], s["position"]
        if e in ("stand", "arrive"):
            present(cs[0], pos, None)
        elif e in ("stand_holding", "arrive_holding"):
            present(cs[0], pos, p)
        elif e == "lies":
            exp["ground"][p] = pos
        elif e in ("leave", "leave_holding"):
            exp["absent"].append(cs[0])
        elif e == "move":
            present(cs[0], pos)
        elif e == "pickup":
            present(cs[0], holding=p)
        elif e == "fetch":
            present(cs[0], pos, p)
        elif e == "drop":
            present(cs[0], holding=None)
            exp["ground"][p] = ANY
        elif e == "give":
            present(cs[0], holding=None)
            present(cs[1], holding=p)
        elif e == "reads":
            present(cs[0], holding="book")
        else:  # swap, actions, travel: the named are there
            for c in cs:
                present(c)
    return exp


def caption_agrees(text: str, scene: dict) -> list[str]:
    """Problems between what ``text`` says and ``scene`` (a frame's truth or ``detect()`` output); [] = agrees."""
    exp = caption_expectations(text)
    if exp is None:
        return ["caption does not parse"]
    problems = []
    if exp["setting"] is not None and scene.get("setting") != exp["setting"]:
        problems.append(f"setting is {scene.get('setting')}, caption says {exp['setting']}")
    chars = {c["name"]: c for c in scene.get("characters", []) if c.get("name")}
    for name, want in exp["present"].items():
        got = chars.get(name)
        if got is None:
            problems.append(f"{name} is not drawn")
            continue
        if want["position"] != ANY and got.get("position") != want["position"]:
            problems.append(f"{name} is {got.get('position')}, caption says {want['position']}")
        if want["holding"] != ANY and got.get("holding") != want["holding"]:
            problems.append(f"{name} holds {got.get('holding')}, caption says {want['holding']}")
    for name in exp["absent"]:
        if name in chars:
            problems.append(f"{name} is drawn but leaves")
    ground = {p["name"]: p.get("position") for p in scene.get("props", [])}
    for prop, pos in exp["ground"].items():
        if prop not in ground:
            problems.append(f"the {prop} is not on the ground")
        elif pos != ANY and ground[prop] != pos:
            problems.append(f"the {prop} lies {ground[prop]}, caption says {pos}")
    return problems


# ================================================================================================ stories
def join_names(names: list[str]) -> str:
    """The names as the grammar's {cs} slot says them: "A and B", "A, B and C"."""
    return ", ".join(names[:-1]) + " and " + names[-1]


class _Story:
    """Mutable story state; every event method checks nothing (callers pick feasible events) and returns
    (sentence, event dict)."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.setting = rng.choice(SETTING_NAMES)
        self.chars: dict[str, dict] = {}     # present: name -> {"position", "holding"}
        self.away: dict[str, Optional[str]] = {n: None for n in CHARACTERS}  # absent: name -> holding
        self.ground: dict[str, dict] = {s: {} for s in SETTING_NAMES}        # setting -> {position: prop}
        self.visited = {self.setting}
        self.pool = list(PROP_NAMES)         # props not yet in the story
        self.actions: dict[str, str] = {}    # this frame's actions

    # ---------------------------------------------------------------- helpers
    def say(self, kind: str, **slots) -> str:
        return self.rng.choice(TEMPLATES[kind]).format(**slots)

    def free_slots(self) -> list[str]:
        taken = {c["position"] for c in self.chars.values()}
        return [p for p in POSITIONS if p not in taken]

    def here(self) -> dict:
        return self.ground[self.setting]

    def take_from_pool(self) -> str:
        prop = self.rng.choice(self.pool)
        self.pool.remove(prop)
        return prop

    def lies_sentence(self, prop: str, pos: str) -> str:
        art = PROPS[prop]["article"]
        return self.say("lies", ap=f"{art} {prop}", AP=f"{art.capitalize()} {prop}", at=AT_PHRASE[pos])

    def char_at(self, pos: str) -> Optional[str]:
        for n, c in self.chars.items():
            if c["position"] == pos:
                return n
        return None

    # ---------------------------------------------------------------- opening
    def opening(self) -> tuple[list[str], list[dict]]:
        rng = self.rng
        n = rng.choices(list(W.OPENING_CAST), weights=list(W.OPENING_CAST.values()))[0]
        names = rng.sample(CHARACTERS, n)
        slots = rng.sample(list(POSITIONS), n)
        for name, pos in zip(names, slots):
            holding = self.take_from_pool() if rng.random() < 0.35 else None
            self.chars[name] = {"position": pos, "holding": holding}
            del self.away[name]
        for pos in rng.sample(list(POSITIONS), rng.choice(W.GROUND_PROPS)):
            self.here()[pos] = self.take_from_pool()
        sentences = [self.say("scene", in_s=setting_phrase(self.setting))]
        for pos in POSITIONS:
            name = self.char_at(pos)
            if name:
                held = self.chars[name]["holding"]
                if held:
                    sentences.append(self.say("stand_holding", c=name, at=AT_PHRASE[pos], p=held))
                else:
                    sentences.append(self.say("stand", c=name, at=AT_PHRASE[pos]))
        for pos in POSITIONS:
            if pos in self.here():
                sentences.append(self.lies_sentence(self.here()[pos], pos))
        return sentences, [{"type": "open", "setting": self.setting}]

    # ---------------------------------------------------------------- events
    def candidates(self, busy_chars: set, busy_props: set, allow_travel: bool) -> list[tuple[float, tuple]]:
        """Feasible events (weight, (kind, args...)) not touching ``busy_chars`` / ``busy_props``."""
        out = []
        present = [n for n in CHARACTERS if n in self.chars and n not in busy_chars]
        free = self.free_slots()
        here = self.here()

        def ok_prop(p):
            return p is None or p not in busy_props

        arrivals = [n for n in CHARACTERS if n in self.away and n not in busy_chars and ok_prop(self.away[n])]
        if arrivals and free:
            w = 2.5 if len(self.chars) == 1 else 1.0
            out += [(w / len(arrivals) / len(free), ("arrive", n, p)) for n in arrivals for p in free]
        if len(self.chars) >= 2:
            leavers = [n for n in present if ok_prop(self.chars[n]["holding"])]
            out += [(0.5 / len(leavers), ("leave", n)) for n in leavers]
        if free:
            movers = [(n, p) for n in present for p in free]
            out += [(0.7 / len(movers), ("move", n, p)) for n, p in movers]
        if len(present) >= 2:
            pairs = [(a, b) for i, a in enumerate(present) for b in present[i + 1:]]
            out += [(0.3 / len(pairs), ("swap", a, b)) for a, b in pairs]
        empty_handed = [n for n in present if self.chars[n]["holding"] is None]
        pick = [(n,) for n in empty_handed
                if here.get(self.chars[n]["position"]) and here[self.chars[n]["position"]] not in busy_props]
        out += [(1.5 / len(pick), ("pickup",) + a) for a in pick]
        fetch = [(n, p) for n in empty_handed for p in free if here.get(p) and here[p] not in busy_props]
        out += [(1.2 / len(fetch), ("fetch",) + a) for a in fetch]
        holders = [n for n in present if self.chars[n]["holding"] and ok_prop(self.chars[n]["holding"])]
        drop = [n for n in holders if self.chars[n]["position"] not in here]
        out += [(0.8 / len(drop), ("drop", n)) for n in drop]
        give = [(a, b) for a in holders for b in empty_handed if a != b]
        out += [(0.9 / len(give), ("give", a, b)) for a, b in give]
        acts = []
        for n in present:
            acts += [("act", n, a) for a in ("waves", "jumps", "sleeps", "sings")]
            acts += [("act", n, "waves_at", m) for m in self.chars if m != n and m not in busy_chars]
            if self.chars[n]["holding"] == "book" and "book" not in busy_props:
                acts += [("act", n, "reads")] * 3
        out += [(1.6 / len(acts), a) for a in acts]
        if allow_travel and self.chars:
            dests = [s for s in SETTING_NAMES if s != self.setting]
            out += [(0.4 / len(dests), ("travel", s)) for s in dests]
        return out

    def apply(self, ev: tuple) -> tuple[list[str], dict, set, set]:
        """Apply one event; returns (sentences, event dict, characters touched, props touched)."""
        kind = ev[0]
        if kind == "arrive":
            _, n, pos = ev
            held = self.away.pop(n)
            self.chars[n] = {"position": pos, "holding": held}
            if held:
                s = self.say("arrive_holding", c=n, at=AT_PHRASE[pos], p=held)
            else:
                s = self.say("arrive", c=n, at=AT_PHRASE[pos])
            return [s], {"type": "arrive", "character": n, "position": pos, "holding": held}, {n}, {held} - {None}
        if kind == "leave":
            n = ev[1]
            held = self.chars.pop(n)["holding"]
            self.away[n] = held
            if held and self.rng.random() < 0.5:
                s = self.say("leave_holding", c=n, p=held)
            else:
                s = self.say("leave", c=n)
            return [s], {"type": "leave", "character": n}, {n}, {held} - {None}
        if kind == "move":
            _, n, pos = ev
            self.chars[n]["position"] = pos
            return [self.say("move", c=n, to=pos)], {"type": "move", "character": n, "position": pos}, {n}, set()
        if kind == "swap":
            _, a, b = ev
            pa, pb = self.chars[a]["position"], self.chars[b]["position"]
            self.chars[a]["position"], self.chars[b]["position"] = pb, pa
            return [self.say("swap", c=a, c2=b)], {"type": "swap", "characters": [a, b]}, {a, b}, set()
        if kind == "pickup":
            n = ev[1]
            p = self.here().pop(self.chars[n]["position"])
            self.chars[n]["holding"] = p
            return [self.say("pickup", c=n, p=p)], {"type": "pickup", "character": n, "prop": p}, {n}, {p}
        if kind == "fetch":
            _, n, pos = ev
            p = self.here().pop(pos)
            self.chars[n].update(position=pos, holding=p)
            return ([self.say("fetch", c=n, to=pos, p=p)],
                    {"type": "fetch", "character": n, "position": pos, "prop": p}, {n}, {p})
        if kind == "drop":
            n = ev[1]
            p = self.chars[n]["holding"]
            self.chars[n]["holding"] = None
            self.here()[self.chars[n]["position"]] = p
            return [self.say("drop", c=n, p=p)], {"type": "drop", "character": n, "prop": p}, {n}, {p}
        if kind == "give":
            _, a, b = ev
            p = self.chars[a]["holding"]
            self.chars[a]["holding"], self.chars[b]["holding"] = None, p
            return ([self.say("give", c=a, c2=b, p=p)], {"type": "give", "character": a, "to": b, "prop": p},
                    {a, b}, {p})
        if kind == "act":
            n, action = ev[1], ev[2]
            if action == "waves_at":
                self.actions[n] = "waves"
                return ([self.say("waves_at", c=n, c2=ev[3])],
                        {"type": "action", "character": n, "action": "waves", "target": ev[3]}, {n, ev[3]}, set())
            self.actions[n] = action
            props = {"book"} if action == "reads" else set()
            return [self.say(action, c=n)], {"type": "action", "character": n, "action": action}, {n}, props
        if kind == "travel":
            dest = ev[1]
            names = [n for n in CHARACTERS if n in self.chars]
            self.setting = dest
            if dest not in self.visited:
                self.visited.add(dest)
                for pos in self.rng.sample(list(POSITIONS), min(len(self.pool), self.rng.choice(W.GROUND_PROPS))):
                    self.here()[pos] = self.take_from_pool()
            if len(names) == 1:
                s = [self.say("travel", c=names[0], s=dest)]
            else:
                s = [self.say("travel_group", cs=join_names(names), s=dest)]
            s += [self.lies_sentence(self.here()[pos], pos) for pos in POSITIONS if pos in self.here()]
            return s, {"type": "travel", "setting": dest, "characters": names}, set(names), set()
        raise ValueError(kind)

    def step(self, allow_travel: bool) -> tuple[list[str], list[dict]]:
        self.actions = {}
        cands = self.candidates(set(), set(), allow_travel)
        ev = self.rng.choices([c[1] for c in cands], weights=[c[0] for c in cands])[0]
        sentences, event, busy_c, busy_p = self.apply(ev)
        events = [event]
        if ev[0] != "travel" and self.rng.random() < 0.4:
            # A second event touching other characters and props; its caption holds with the first's.
            touched_pos = {event.get("position")} | {self.chars[n]["position"] for n in busy_c if n in self.chars}
            cands = [c for c in self.candidates(busy_c, busy_p, False)
                     if not (c[1][0] in ("arrive", "move", "fetch") and c[1][-1] in touched_pos)]
            if cands:
                ev2 = self.rng.choices([c[1] for c in cands], weights=[c[0] for c in cands])[0]
                s2, e2, _, _ = self.apply(ev2)
                sentences += s2
                events.append(e2)
        return sentences, events

    def truth(self, events: list[dict]) -> dict:
        order = {p: i for i, p in enumerate(POSITIONS)}
        chars = sorted(self.chars.items(), key=lambda kv: order[kv[1]["position"]])
        return {
            "setting": self.setting,
            "characters": [{"name": n, "position": c["position"], "holding": c["holding"],
                            "action": self.actions.get(n)} for n, c in chars],
            "props": [{"name": p, "position": pos} for pos, p in sorted(self.here().items(), key=lambda kv: order[kv[0]])],
            "event": events,
        }


def _event_of(st: _Story, s: dict) -> Optional[tuple]:
    """The world's event (as ``_Story.candidates`` writes it) that a parsed sentence tells, when the world could
    have chosen it in ``st``; None otherwise (a sentence only openings and travel say, or an impossible one)."""
    e, cs, p, pos = s["event"], s["characters"], s["prop"], s["position"]
    c = cs[0] if cs else None
    here, present = st.here(), st.chars
    if e in ("arrive", "arrive_holding"):
        if c not in st.away or pos not in st.free_slots():
            return None
        held = st.away[c]
        if e == "arrive" and held is None:
            return ("arrive", c, pos)
        if e == "arrive_holding" and held == p:
            return ("arrive", c, pos)
        return None
    if c not in present or any(n not in present for n in cs):
        return None
    holding = present[c]["holding"]
    if e == "leave" and len(present) >= 2:
        return ("leave", c)
    if e == "leave_holding" and len(present) >= 2 and holding == p:
        return ("leave", c)
    if e == "move" and pos in st.free_slots():
        return ("move", c, pos)
    if e == "swap":
        return ("swap", cs[0], cs[1])
    if e == "pickup" and holding is None and here.get(present[c]["position"]) == p:
        return ("pickup", c)
    if e == "fetch" and holding is None and pos in st.free_slots() and here.get(pos) == p:
        return ("fetch", c, pos)
    if e == "drop" and holding == p and present[c]["position"] not in here:
        return ("drop", c)
    if e == "give" and holding == p and present[cs[1]]["holding"] is None:
        return ("give", c, cs[1])
    if e in ("waves", "jumps", "sleeps", "sings") or (e == "reads" and holding == "book"):
        return ("act", c, e)
    if e == "waves_at":
        return ("act", c, "waves_at", cs[1])
    return None


def follow_caption(st: _Story, caption: str, allow_travel: bool = True) -> Optional[tuple[_Story, list[dict]]]:
    """The world's story after ``caption`` (a copy of ``st``) and its events, when the world could have told the
    caption as ``_Story.step`` tells a frame: one event, or two where the second touches none of the first's
    characters and props (nor arrives, moves or fetches where the first happened), or travel (``allow_travel``:
    not on the first frame) with what lies in a place the story has not been yet. None otherwise (the caption is
    impossible, or says what only openings say). This is how a model's own caption joins a true story
    (``training.corrected_stories``)."""
    parsed = parse_caption(caption)
    if parsed is None:
        return None
    st = copy.deepcopy(st)
    st.actions = {}
    sentences = parsed["sentences"]
    if sentences[0]["event"] in ("travel", "travel_group"):
        s = sentences[0]
        dest, names = s["setting"], [n for n in CHARACTERS if n in st.chars]
        if not allow_travel or dest == st.setting or sorted(s["characters"]) != sorted(names):
            return None
        lies = sentences[1:]
        if any(x["event"] != "lies" for x in lies) or len({x["position"] for x in lies}) != len(lies):
            return None
        ground = {x["position"]: x["prop"] for x in lies}
        if dest in st.visited:
            if ground != st.ground[dest]:
                return None
        elif any(p not in st.pool for p in ground.values()) or len(set(ground.values())) != len(ground):
            return None
        else:
            for p in ground.values():
                st.pool.remove(p)
            st.ground[dest] = ground
            st.visited.add(dest)
        st.setting = dest
        return st, [{"type": "travel", "setting": dest, "characters": names}]
    if len(sentences) > 2:
        return None
    first = _event_of(st, sentences[0])
    if first is None:
        return None
    _, event, busy_chars, busy_props = st.apply(first)
    events = [event]
    if len(sentences) == 2:
        touched = {event.get("position")} | {st.chars[n]["position"] for n in busy_chars if n in st.chars}
        second = _event_of(st, sentences[1])
        if second is None or (second[0] in ("arrive", "move", "fetch") and second[-1] in touched):
            return None
        _, event, chars, props = st.apply(second)  # (``st`` is this call's copy: a refusal changes nothing)
        if chars & busy_chars or props & busy_props:
            return None
        events.append(event)
    return st, events


def story_rng(seed: int, index: int) -> random.Random:
    return random.Random(f"seedstory-synthetic:{seed}:{index}")


def story_id(seed: int, index: int) -> str:
    return f"s{seed}_{index:06d}"


def generate_story(seed: int, index: int, frames: int = 30) -> dict:
    """Story ``index`` of ``seed``: ``{"id", "captions", "truth"}`` (no images)."""
    rng = story_rng(seed, index)
    st = _Story(rng)
    sentences, events = st.opening()
    captions, truth = [" ".join(sentences)], [st.truth(events)]
    for f in range(1, frames):
        sentences, events = st.step(allow_travel=f >= 2)
        captions.append(" ".join(sentences))
        truth.append(st.truth(events))
    return {"id": story_id(seed, index), "captions": captions, "truth": truth}


def is_val(seed: int, index: int, fraction: float) -> bool:
    return random.Random(f"seedstory-split:{seed}:{index}").random() < fraction


# ================================================================================================ drawing
def _rgb(name: str) -> tuple:
    return COLOURS[name]


def _edge(shape: str, t: float) -> float:
    """Half-width of a body at relative height t (0 = top, 1 = bottom), in body widths."""
    if shape == "round":
        return 0.5 * math.sqrt(max(0.0, 1 - (2 * t - 1) ** 2))
    if shape == "cone":
        return 0.5 * t
    return 0.5


class _Canvas:
    def __init__(self, image: Image.Image):
        self.im = image
        self.S = image.size[0]
        self.d = ImageDraw.Draw(image)
        self.ow = max(1, round(self.S * 0.008))

    def xy(self, *pts):
        return [v * self.S for v in pts]

    def ellipse(self, cx, cy, rx, ry, fill, outline=W.OUTLINE, width=None):
        self.d.ellipse(self.xy(cx - rx, cy - ry, cx + rx, cy + ry), fill=fill, outline=outline,
                       width=self.ow if width is None else width)

    def rect(self, x0, y0, x1, y1, fill, outline=W.OUTLINE, radius=0.0, corners=None):
        self.d.rounded_rectangle(self.xy(x0, y0, x1, y1), radius=radius * self.S, fill=fill, outline=outline,
                                 width=self.ow, corners=corners)

    def poly(self, pts, fill, outline=W.OUTLINE):
        self.d.polygon([(x * self.S, y * self.S) for x, y in pts], fill=fill, outline=outline, width=self.ow)

    def line(self, pts, fill=W.OUTLINE, width=1.0):
        self.d.line([(x * self.S, y * self.S) for x, y in pts], fill=fill, width=max(1, round(self.ow * width)),
                    joint="curve")

    def glyph(self, pts):
        """A white stroke with a dark rim (Z's, notes), readable on dark and light skies."""
        self.line(pts, W.OUTLINE, 3.0)
        self.line(pts, _rgb("white"), 1.2)


def _draw_background(c: _Canvas, setting: str) -> None:
    s = SETTINGS[setting]
    sky, ground = _rgb(s["sky"]), _rgb(s["ground"])
    H = W.HORIZON
    c.d.rectangle(c.xy(0, 0, 1, 1), fill=sky)
    if setting == "meadow":
        c.ellipse(0.22, 0.64, 0.4, 0.12, _rgb("hill"), outline=None)
        c.ellipse(0.85, 0.64, 0.35, 0.09, _rgb("hill"), outline=None)
        c.d.rectangle(c.xy(0, H, 1, 1), fill=ground)
        c.rect(0.32, 0.36, 0.35, 0.62, _rgb("trunk"))
        c.ellipse(0.335, 0.30, 0.085, 0.1, _rgb("crown"))
        c.ellipse(0.90, 0.48, 0.03, 0.012, _rgb("crown"), outline=None)
    elif setting == "beach":
        c.ellipse(0.8, 0.2, 0.07, 0.07, _rgb("sun"), outline=None)
        c.d.rectangle(c.xy(0, 0.5, 1, H), fill=_rgb("sea"))
        for x in (0.12, 0.45, 0.72):
            c.line([(x, 0.54), (x + 0.04, 0.525), (x + 0.08, 0.54)], _rgb("white"), 1.0)
        c.d.rectangle(c.xy(0, H, 1, 1), fill=ground)
    elif setting == "snowy hill":
        c.poly([(0.0, H), (0.2, 0.26), (0.38, 0.45), (0.55, 0.18), (0.75, 0.42), (0.9, 0.3), (1.0, 0.4), (1.0, H)],
               _rgb("mountain"))
        for px, py in ((0.2, 0.26), (0.55, 0.18), (0.9, 0.3)):
            c.poly([(px, py), (px + 0.05, py + 0.07), (px - 0.05, py + 0.07)], _rgb("snow"), outline=None)
        c.d.rectangle(c.xy(0, H, 1, 1), fill=ground)
        c.line([(0, H), (1, H)], W.OUTLINE, 1.0)
    elif setting == "cave":
        c.d.rectangle(c.xy(0, H, 1, 1), fill=ground)
        for x, length in ((0.08, 0.14), (0.25, 0.08), (0.42, 0.16), (0.6, 0.1), (0.78, 0.15), (0.95, 0.09)):
            c.poly([(x - 0.05, W.SKY_BAND + 0.005), (x + 0.05, W.SKY_BAND + 0.005), (x, W.SKY_BAND + length)],
                   _rgb("rock"), outline=None)
        c.d.rectangle(c.xy(0, W.SKY_BAND * 0.0 + 0.105, 1, 0.12), fill=_rgb("rock"))
        for x in (0.335, 0.665):
            c.poly([(x - 0.04, 0.62), (x - 0.025, 0.52), (x, 0.47), (x + 0.02, 0.53), (x + 0.04, 0.62)],
                   _rgb("crystal"))
    if setting != "snowy hill":
        c.line([(0, H), (1, H)], W.OUTLINE, 0.6)


def _draw_prop(c: _Canvas, prop: str, x: float, y: float) -> None:
    col = _rgb(PROPS[prop]["colour"])
    if prop == "apple":
        c.line([(x, y - 0.04), (x + 0.01, y - 0.062)], _rgb("trunk"), 1.5)
        c.ellipse(x + 0.024, y - 0.056, 0.016, 0.009, _rgb("leaf"))
        c.ellipse(x, y + 0.004, 0.048, 0.045, col)
    elif prop == "book":
        c.rect(x - 0.05, y - 0.042, x + 0.05, y + 0.042, col, radius=0.008)
        c.rect(x + 0.026, y - 0.034, x + 0.04, y + 0.034, _rgb("white"))
        c.line([(x - 0.036, y - 0.04), (x - 0.036, y + 0.04)], W.OUTLINE, 1.0)
    elif prop == "kite":
        c.line([(x, y + 0.06), (x - 0.018, y + 0.075), (x + 0.012, y + 0.09)], W.OUTLINE, 1.0)
        c.poly([(x, y - 0.062), (x + 0.052, y - 0.01), (x, y + 0.062), (x - 0.052, y - 0.01)], col)
    elif prop == "flower":
        c.line([(x, y + 0.02), (x, y + 0.06)], _rgb("leaf"), 1.5)
        for k in range(5):
            a = -math.pi / 2 + k * 2 * math.pi / 5
            c.ellipse(x + 0.026 * math.cos(a), y + 0.026 * math.sin(a), 0.025, 0.025, col)
        for k in range(5):  # fill the gaps between the petals
            a = -math.pi / 2 + k * 2 * math.pi / 5
            c.ellipse(x + 0.026 * math.cos(a), y + 0.026 * math.sin(a), 0.024, 0.024, col, outline=None)
        c.ellipse(x, y, 0.014, 0.014, _rgb("white"))
    elif prop == "bucket":
        c.d.arc(c.xy(x - 0.04, y - 0.075, x + 0.04, y - 0.0), 180, 360, fill=W.OUTLINE, width=c.ow)
        c.poly([(x - 0.05, y - 0.036), (x + 0.05, y - 0.036), (x + 0.037, y + 0.05), (x - 0.037, y + 0.05)], col)
    else:
        raise ValueError(prop)


def _body_box(name: str, position: str, lift: float) -> tuple[float, float, float, float]:
    ch = BY_NAME[name]
    shp = SHAPES[ch["shape"]]
    cx = SLOT_X[position]
    bottom = FEET_Y - lift
    return cx - shp["w"] / 2, bottom - shp["h"], cx + shp["w"] / 2, bottom


def _acc_box(name: str, box: tuple) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    a = ACCESSORIES[BY_NAME[name]["accessory"]]["box"]
    return x0 + a[0] * w, y0 + a[1] * h, x0 + a[2] * w, y0 + a[3] * h


def _draw_character(c: _Canvas, name: str, position: str, holding: Optional[str], action: Optional[str]) -> None:
    ch = BY_NAME[name]
    shape, acc = ch["shape"], ch["accessory"]
    shp = SHAPES[shape]
    lift = JUMP if action == "jumps" else 0.0
    x0, y0, x1, y1 = _body_box(name, position, lift)
    w, h, cx = x1 - x0, y1 - y0, (x0 + x1) / 2
    body = _rgb(ch["colour"])
    ax0, ay0, ax1, ay1 = _acc_box(name, (x0, y0, x1, y1))
    if acc == "backpack":
        c.rect(ax0, ay0, ax1 + 0.02, ay1, _rgb("brown"), radius=0.012)
    if action == "waves":
        t = 0.45
        ex = cx - _edge(shape, t) * w  # the left arm, raised over the head's left side
        hx, hy = x0 + 0.02, y0 - 0.06
        c.line([(ex, y0 + t * h), (hx, hy)], W.OUTLINE, 2.2)
    if shape == "round":
        c.ellipse(cx, (y0 + y1) / 2, w / 2, h / 2, body)
    elif shape == "box":
        c.rect(x0, y0, x1, y1, body, radius=0.02)
    elif shape == "cone":
        c.poly([(cx, y0), (x1, y1), (x0, y1)], body)
    elif shape == "pillar":
        c.rect(x0, y0, x1, y1, body, radius=w / 2 * 0.9, corners=(True, True, False, False))
    if action == "jumps":
        for dx in (-0.05, 0.0, 0.05):
            c.line([(cx + dx, FEET_Y - JUMP + 0.025), (cx + dx, FEET_Y - 0.005)], W.OUTLINE, 1.0)
    if action == "waves":
        c.ellipse(hx, hy, 0.022, 0.022, _rgb("white"))
    # accessory
    if acc == "scarf":
        c.rect(ax0 - 0.012, ay0, ax1 + 0.012, ay1, _rgb("teal"), radius=0.01)
        c.rect(x1 - 0.03, ay0 - 0.005, x1 + 0.02, ay1 + 0.02, _rgb("teal"), radius=0.008)
    elif acc == "top hat":
        c.rect(ax0, ay0, ax1, ay1, _rgb("black"))
        c.rect(x0 + 0.08 * w, ay1 - 0.008, x1 - 0.08 * w, ay1 + 0.012, _rgb("black"))
    elif acc == "pom-pom":
        c.ellipse(cx, y0 - 0.03, 0.057, 0.057, _rgb("white"))
    # face
    ey = y0 + shp["eye_y"] * h
    for sx in (cx - shp["eye_dx"], cx + shp["eye_dx"]):
        if action == "sleeps":
            c.d.arc(c.xy(sx - 0.02, ey - 0.02, sx + 0.02, ey + 0.012), 20, 160, fill=W.OUTLINE, width=c.ow * 2)
        else:
            c.ellipse(sx, ey, 0.026, 0.026, _rgb("white"))
            c.ellipse(sx, ey + (0.01 if action == "reads" else 0.003), 0.012, 0.012, W.PUPIL, outline=None)
    c.d.arc(c.xy(cx - 0.02, ey + 0.025, cx + 0.02, ey + 0.05), 20, 160, fill=W.OUTLINE, width=c.ow)
    if holding:
        hy = FEET_Y - HELD_DY - lift - (0.03 if action == "reads" else 0.0)
        _draw_prop(c, holding, cx, hy)
    gx, gy = x1 - 0.01, y0 - 0.06  # marks float over the head's right side
    if action == "sleeps":
        for zx, zy, zs in ((gx, gy, 0.035), (gx + 0.03, gy - 0.045, 0.025)):
            c.glyph([(zx - zs / 2, zy - zs / 2), (zx + zs / 2, zy - zs / 2), (zx - zs / 2, zy + zs / 2),
                     (zx + zs / 2, zy + zs / 2)])
    elif action == "sings":
        c.glyph([(gx + 0.012, gy + 0.03), (gx + 0.012, gy - 0.03), (gx + 0.035, gy - 0.015)])
        c.ellipse(gx, gy + 0.032, 0.016, 0.012, _rgb("white"), width=c.ow)


@lru_cache(maxsize=64)
def _background(setting: str, S: int) -> Image.Image:
    im = Image.new("RGB", (S, S))
    _draw_background(_Canvas(im), setting)
    return im


def render_frame(truth: dict, size: int = 128) -> Image.Image:
    """The frame a truth dict describes, ``size`` x ``size`` RGB (drawn at 2x and box-downsampled)."""
    S = 2 * size
    im = _background(truth["setting"], S).copy()
    c = _Canvas(im)
    for p in truth.get("props", []):
        _draw_prop(c, p["name"], SLOT_X[p["position"]], W.GROUND_PROP_Y)
    for ch in truth.get("characters", []):
        _draw_character(c, ch["name"], ch["position"], ch.get("holding"), ch.get("action"))
    return im.reduce(2)


# ================================================================================================ detection
def _palette(world: dict) -> tuple[list[str], np.ndarray]:
    names = list(world["colours"])
    return names, np.asarray([world["colours"][n] for n in names], dtype=np.float32)


def _labels(arr: np.ndarray, palette: np.ndarray, tol: float) -> np.ndarray:
    """Nearest palette index per pixel, -1 where no palette colour is within ``tol``."""
    flat = arr.reshape(-1, 3)
    d2 = (flat ** 2).sum(1, keepdims=True) - 2 * flat @ palette.T + (palette ** 2).sum(1)[None]
    idx = d2.argmin(1)
    best = d2[np.arange(len(flat)), idx]
    idx[best > tol * tol] = -1
    return idx.reshape(arr.shape[:2])


def _region(labels: np.ndarray, x: float, reg: tuple) -> tuple[np.ndarray, int, int]:
    n = labels.shape[0]
    x0, x1 = max(0, int(round((x + reg[0]) * n))), min(n, int(round((x + reg[1]) * n)))
    y0, y1 = max(0, int(round(reg[2] * n))), min(n, int(round(reg[3] * n)))
    return labels[y0:y1, x0:x1], x0, y0


def _shape_mask(shape: str, box: tuple, n: int) -> np.ndarray:
    """Filled silhouette of a body shape whose box (x0, y0, x1, y1) is in pixels of an n x n frame."""
    q = 4  # supersampling
    im = Image.new("L", (n * q, n * q))
    d = ImageDraw.Draw(im)
    x0, y0, x1, y1 = (v * q for v in box)
    w, h = x1 - x0, y1 - y0
    if shape == "round":
        d.ellipse((x0, y0, x1, y1), fill=255)
    elif shape == "box":
        d.rounded_rectangle((x0, y0, x1, y1), radius=0.1 * w, fill=255)
    elif shape == "cone":
        d.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=255)
    elif shape == "pillar":
        d.rounded_rectangle((x0, y0, x1, y1), radius=0.45 * w, fill=255, corners=(True, True, False, False))
    else:
        raise ValueError(shape)
    return np.asarray(im.reduce(q)) >= 128


def _grow(mask: np.ndarray, r: int) -> np.ndarray:
    """Dilate by r pixels (4-neighbourhood steps)."""
    m = mask.copy()
    for _ in range(r):
        g = m.copy()
        g[1:] |= m[:-1]
        g[:-1] |= m[1:]
        g[:, 1:] |= m[:, :-1]
        g[:, :-1] |= m[:, 1:]
        m = g
    return m


@lru_cache(maxsize=4096)
def _placed(shape: str, w: float, h: float, cx: float, bottom: float, n: int, dx: int, dy: int, r: int) -> tuple:
    """(inside, outside, pixel box) of a shape placed with its feet at (cx, bottom), shifted by (dx, dy):
    ``inside`` / ``outside`` leave out a band of r pixels along the outline, where anti-aliasing and
    resampling blend the body with whatever is next to it."""
    box = ((cx - w / 2) * n + dx, (bottom - h) * n + dy, (cx + w / 2) * n + dx, bottom * n + dy)
    mask = _shape_mask(shape, box, n)
    return ~_grow(~mask, r), ~_grow(mask, r), box


SHIFTS = (-2, 0, 2)  # pixels at 128: a generated frame's figures may sit a little off their marks


def _fit(body: np.ndarray, covering: np.ndarray, world: dict, ch: dict, x: float, r: int = 1) -> tuple:
    """Best (score, box) of ``ch``'s silhouette over the ``body`` mask near position x, standing or jumping.
    The score is an IoU that ignores the outline band and pixels of ``covering`` (eyes, outline, props,
    accessories: whatever may cover a body): body pixels inside / (inside pixels not covered + body pixels
    outside)."""
    n = body.shape[0]
    lay = world["layout"]
    shp = world["shapes"][ch["shape"]]
    free = ~covering
    best = (0.0, None)
    for lift in (0.0, lay["jump"]):
        bottom = lay["feet_y"] - lift
        for dx in SHIFTS:
            for dy in SHIFTS:
                inside, outside, box = _placed(ch["shape"], shp["w"], shp["h"], x, bottom, n, dx, dy, r)
                inter = int((inside & body).sum())
                union = int((inside & (body | free)).sum()) + int((outside & body).sum())
                score = inter / union if union else 0.0
                if score > best[0]:
                    best = (score, box)
    return best


def _accessory_count(labels: np.ndarray, names: list[str], world: dict, ch: dict, box: tuple) -> int:
    """Accessory-colour pixels where ``ch``'s accessory belongs on a body drawn in ``box`` (pixels)."""
    n = labels.shape[0]
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    acc = world["accessories"][ch["accessory"]]
    a = acc["box"]
    pad = 0.015 * n
    ax0, ax1 = max(0, int(x0 + a[0] * w - pad)), min(n, int(math.ceil(x0 + a[2] * w + pad)))
    ay0, ay1 = max(0, int(y0 + a[1] * h - pad)), min(n, int(math.ceil(y0 + a[3] * h + pad)))
    return int((labels[ay0:ay1, ax0:ax1] == names.index(acc["colour"])).sum())


def _masks(labels: np.ndarray, names: list[str], world: dict, x: float,
           setting: Optional[str]) -> tuple[np.ndarray, np.ndarray]:
    """Region mask around position x, and the "covering" mask: labels that are neither the setting's
    scenery nor a body colour (eyes, outlines and their blends, props, accessories)."""
    n = labels.shape[0]
    r = world["layout"]["body_region"]
    region = np.zeros_like(labels, dtype=bool)
    region[max(0, int(round(r[2] * n))):int(round(r[3] * n)),
           max(0, int(round((x + r[0]) * n))):int(round((x + r[1]) * n))] = True
    settings = [world["settings"][setting]] if setting else list(world["settings"].values())
    scenery = [names.index(c) for sd in settings for c in sd["scenery"]] + [names.index(c["colour"]) for c in world["cast"]]
    covering = ~np.isin(labels, scenery)
    return region, covering


def _figure(labels: np.ndarray, names: list[str], world: dict, ch: dict, x: float, setting: Optional[str],
            r: int = 1) -> dict:
    region, covering = _masks(labels, names, world, x, setting)
    body = region & (labels == names.index(ch["colour"]))
    iou, box = _fit(body, covering, world, ch, x, r)
    others = {c["name"]: _fit(body, covering, world, c, x, r)[0] for c in world["cast"] if c["shape"] != ch["shape"]}
    other = max(others, key=others.get) if others else None
    return {"body_pixels": int(body.sum()), "iou": iou, "best_other": others.get(other, 0.0), "looks_like": other,
            "accessory_pixels": _accessory_count(labels, names, world, ch, box) if box else 0}


@lru_cache(maxsize=1)
def _calibration() -> dict:
    """Per character, measured on a clean 128px render (middle position, first setting, nothing held): body
    pixels and accessory pixels."""
    out = {}
    base = W.world_dict()
    names, palette = _palette(base)
    middle, setting = POSITIONS[len(POSITIONS) // 2], SETTING_NAMES[0]
    for ch in base["cast"]:
        truth = {"setting": setting, "props": [],
                 "characters": [{"name": ch["name"], "position": middle, "holding": None, "action": None}]}
        labels = _labels(np.asarray(render_frame(truth, DETECT_SIZE), np.float32), palette, 70)
        fig = _figure(labels, names, base, ch, base["layout"]["slot_x"][middle], setting)
        out[ch["name"]] = {"body_pixels": fig["body_pixels"], "accessory_pixels": fig["accessory_pixels"]}
    return out


def world_json() -> dict:
    """``world.json``'s content: ``seedstory.data.world.world_dict()`` plus the detector's calibration."""
    d = W.world_dict()
    d["calibration"] = {"size": DETECT_SIZE, "tolerance": 70, "characters": _calibration()}
    return d


@lru_cache(maxsize=1)
def _default_world() -> dict:
    return world_json()


def detect(image: Image.Image, world: Optional[dict] = None, tol: Optional[float] = None) -> dict:
    """Read a frame: ``{"setting", "characters": [{"name", "position", "holding"}], "props": [{"name",
    "position"}], "figures": [...]}``. ``figures`` has one entry per position where a body colour was found,
    with ``colour_of`` (whose body colour), ``shape_ok``, ``accessory_ok`` and the shape features; a figure
    whose shape or accessory does not match its colour's character appears in ``characters`` with name None.
    Works on any image size (resized to 128 internally)."""
    world = world or _default_world()
    calib = world.get("calibration") or _default_world()["calibration"]
    tol = float(tol if tol is not None else calib.get("tolerance", 70))
    n = int(calib.get("size", DETECT_SIZE))
    lay = world["layout"]
    image = image.convert("RGB")
    band = 1 if min(image.size) >= n else 2  # outline band to ignore: wider for upsampled small frames
    if image.size != (n, n):
        image = image.resize((n, n), Image.Resampling.BOX if image.size[0] > n else Image.Resampling.BILINEAR)
    arr = np.asarray(image, np.float32)
    names, palette = _palette(world)
    labels = _labels(arr, palette, tol)
    # setting: sky band on top, ground band at the bottom
    top = labels[: max(1, int(lay["sky_band"] * n))]
    bot = labels[int(lay["ground_band"] * n):]
    setting, best = None, 0.0
    for s, sd in world["settings"].items():
        ft = float((top == names.index(sd["sky"])).mean())
        fb = float((bot == names.index(sd["ground"])).mean())
        if ft > 0.5 and fb > 0.5 and ft + fb > best:
            setting, best = s, ft + fb
    out = {"setting": setting, "characters": [], "props": [], "figures": []}
    cast = world["cast"]
    chars = calib["characters"]
    for pos in world["positions"]:
        x = lay["slot_x"][pos]
        reg, _, _ = _region(labels, x, lay["body_region"])
        count, ch = max(((int((reg == names.index(c["colour"])).sum()), c) for c in cast), key=lambda t: t[0])
        if count < 0.35 * chars[ch["name"]]["body_pixels"]:
            continue
        fig = _figure(labels, names, world, ch, x, setting, band)
        shape_ok = fig["iou"] >= 0.5 and fig["iou"] >= fig["best_other"]
        acc_ok = fig["accessory_pixels"] >= 0.15 * chars[ch["name"]]["accessory_pixels"]
        hreg, _, _ = _region(labels, x, lay["held_region"])
        out["characters"].append({"name": ch["name"] if shape_ok and acc_ok else None, "position": pos,
                                  "holding": _best_prop(hreg, world, names, n)})
        out["figures"].append({"position": pos, "colour_of": ch["name"], "shape_ok": shape_ok,
                               "accessory_ok": acc_ok, "body_pixels": fig["body_pixels"],
                               "accessory_pixels": fig["accessory_pixels"], "iou": round(fig["iou"], 3),
                               "best_other_iou": round(fig["best_other"], 3), "best_other": fig["looks_like"]})
    for pos in world["positions"]:
        greg, _, _ = _region(labels, lay["slot_x"][pos], lay["ground_region"])
        prop = _best_prop(greg, world, names, n)
        if prop:
            out["props"].append({"name": prop, "position": pos})
    return out


def _core(mask: np.ndarray) -> np.ndarray:
    """Pixels whose four neighbours share their label: drops the 1-pixel seams anti-aliasing mixes."""
    m = mask.copy()
    m[1:] &= mask[:-1]
    m[:-1] &= mask[1:]
    m[:, 1:] &= mask[:, :-1]
    m[:, :-1] &= mask[:, 1:]
    return m


def _best_prop(reg: np.ndarray, world: dict, names: list[str], n: int) -> Optional[str]:
    best, best_count = None, 0
    for p, pd in world["props"].items():
        k = int(_core(reg == names.index(pd["colour"])).sum())
        if k > best_count:
            best, best_count = p, k
    min_count = 0.0006 * n * n  # ~10 px at 128 (a prop's core covers ~25-50 px of its region)
    return best if best_count >= min_count else None


def truth_scene(truth: dict) -> dict:
    """The part of a frame's truth that ``detect`` reads: setting, characters (name, position, holding), props."""
    return {"setting": truth["setting"],
            "characters": [{"name": c["name"], "position": c["position"], "holding": c.get("holding")}
                           for c in truth["characters"]],
            "props": [{"name": p["name"], "position": p["position"]} for p in truth["props"]]}


def scene_diff(expected: dict, detected: dict) -> list[str]:
    """Differences between two scenes (``truth_scene`` / ``detect`` output); [] = same."""
    diffs = []
    if expected.get("setting") != detected.get("setting"):
        diffs.append(f"setting {detected.get('setting')} != {expected.get('setting')}")
    e = {c["position"]: (c["name"], c.get("holding")) for c in expected.get("characters", [])}
    d = {c["position"]: (c["name"], c.get("holding")) for c in detected.get("characters", [])}
    for pos in POSITIONS:
        if e.get(pos) != d.get(pos):
            diffs.append(f"{pos}: {d.get(pos)} != {e.get(pos)}")
    ep = {p["position"]: p["name"] for p in expected.get("props", [])}
    dp = {p["position"]: p["name"] for p in detected.get("props", [])}
    for pos in POSITIONS:
        if ep.get(pos) != dp.get(pos):
            diffs.append(f"ground {pos}: {dp.get(pos)} != {ep.get(pos)}")
    return diffs


# ================================================================================================ dataset
def _render_story(job: tuple) -> dict:
    seed, index, frames, size, image_dir, val_fraction = job
    story = generate_story(seed, index, frames)
    sid = story["id"]
    os.makedirs(os.path.join(image_dir, sid), exist_ok=True)
    images = []
    for f, truth in enumerate(story["truth"]):
        rel = f"{sid}/{f:03d}.png"
        render_frame(truth, size).save(os.path.join(image_dir, rel), compress_level=6)
        images.append(rel)
    return {"id": sid, "images": images, "captions": story["captions"], "orders": list(range(frames)),
            "truth": story["truth"], "_val": is_val(seed, index, val_fraction)}


def write_dataset(out: str, stories: int, frames: int = 30, size: int = 128, seed: int = 0,
                  val_fraction: float = 0.05, workers: Optional[int] = None, progress: bool = True) -> dict:
    """Render ``stories`` stories into ``out``; returns counts and timing."""
    import time

    from tqdm import tqdm

    if frames < 1 or stories < 1 or size < 16:
        raise ValueError("need stories >= 1, frames >= 1, size >= 16")
    workers = max(1, workers or os.cpu_count() or 1)
    image_dir = os.path.join(out, "images")
    os.makedirs(image_dir, exist_ok=True)
    with open(os.path.join(out, "world.json"), "w") as f:
        json.dump(world_json(), f, indent=1)
    jobs = [(seed, i, frames, size, image_dir, val_fraction) for i in range(stories)]
    t0 = time.perf_counter()
    n_train = n_val = 0
    pool = None
    if workers > 1:
        import multiprocessing as mp

        pool = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn").Pool(workers)
        it = pool.imap(_render_story, jobs, chunksize=max(1, min(16, stories // (workers * 8))))
    else:
        it = map(_render_story, jobs)
    records = []
    try:
        for rec in tqdm(it, total=stories, disable=not progress, desc="stories", unit="story"):
            records.append(rec)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    if val_fraction > 0 and stories >= 2 and not any(r["_val"] for r in records):
        records[-1]["_val"] = True  # a non-empty split for small runs
    with open(os.path.join(out, "train.jsonl"), "w") as ft, open(os.path.join(out, "val.jsonl"), "w") as fv:
        for rec in records:
            val = rec.pop("_val")
            (fv if val else ft).write(json.dumps(rec) + "\n")
            n_val += val
            n_train += not val
    dt = time.perf_counter() - t0
    return {"train": n_train, "val": n_val, "seconds": dt, "stories_per_s": stories / dt}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m seedstory.data.synthetic",
                                description="Render synthetic StoryStream-format stories (images, captions, truth).")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--stories", type=int, default=1000)
    p.add_argument("--frames", type=int, default=30)
    p.add_argument("--size", type=int, default=128, help="frame side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--workers", type=int, default=None, help="processes (default: all CPUs)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    stats = write_dataset(args.out, args.stories, args.frames, args.size, args.seed, args.val_fraction,
                          args.workers, progress=not args.no_progress)
    print(f"wrote {args.out}: {stats['train']} train + {stats['val']} val stories in {stats['seconds']:.1f}s "
          f"({stats['stories_per_s']:.1f} stories/s)")
    return stats


if __name__ == "__main__":
    main()
