"""The story so far, read from the captions alone: where the story is, who is present where holding what,
who left carrying what, and what lies where. ``StoryState.read(caption)`` applies one frame's caption and
says why it is impossible in the story so far ([] when it is possible); the synthetic-world analyzer uses it
for **story logic** (is each caption possible?) and **presence** (is everyone the story says is there drawn?).

The rules are the world's (``seedstory.data.world``): a reader's rules, as far as a picture can show them.

* Only someone present leaves, moves, swaps, acts, waves or is waved at, picks up, drops, gives or travels;
  only someone absent arrives; two characters never stand at one position.
* A prop is picked up only where it lies, dropped only by whoever holds it onto a free spot, given only by its
  holder to someone empty-handed, read only by whoever holds the book; someone who arrives with a prop
  cannot bring one that is known to be elsewhere (held, lying somewhere, or carried off by another).
* Travel goes somewhere else; whoever the sentence does not name stays behind (leaves the picture). What
  lies in a place is stated when the story first gets there and must match when it comes back.

A caption that does not parse (``parse_caption`` is None) is not judged; its sentences that parse are applied.
An impossible sentence is counted once, then the story is taken at its word (as a reader reads on): the state
changes as little as it takes for the sentence to have happened, so "Pim and Tansy walk to the beach" with Pim
absent makes Pim present on the beach, and Pim's next wave is possible, not a second mistake.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .synthetic import parse_caption, parse_sentence, split_sentences
from .world import AT_PHRASE

__all__ = ["StoryState"]


def _at(position: Optional[str]) -> str:
    return AT_PHRASE.get(position, "somewhere")


def _the(prop: Optional[str]) -> str:
    return f"the {prop}" if prop else "nothing"


@dataclass
class StoryState:
    setting: Optional[str] = None
    present: dict = field(default_factory=dict)  # name -> {"position": str | None, "holding": str | None}
    away: dict = field(default_factory=dict)     # name -> the prop they carried off (None: nothing)
    ground: dict = field(default_factory=dict)   # setting -> {position: prop}
    visited: set = field(default_factory=set)

    # ------------------------------------------------------------------------------------------ reading
    @classmethod
    def opening(cls, caption: str) -> "StoryState":
        """The state the opening caption sets up (the user's frame: taken as it is, never judged)."""
        state = cls()
        state.read(caption, judge=False)
        return state

    def read(self, caption: str, judge: bool = True) -> Optional[list[str]]:
        """Apply one frame's caption. Returns what makes it impossible ([] = possible), or None when the caption
        does not parse (then only its sentences that parse are applied, as facts). With ``judge=False`` every
        sentence is taken as a fact."""
        parsed = parse_caption(caption)
        if parsed is None:
            # Not judged; the sentences that do parse are taken as facts, so one garbled sentence does not make
            # every later caption look impossible.
            self._apply([p for p in map(parse_sentence, split_sentences(" ".join(caption.split()))) if p], False)
            return None
        return self._apply(parsed["sentences"], judge)

    def _apply(self, sentences: list[dict], judge: bool) -> list[str]:
        problems: list[str] = []
        entered: Optional[str] = None
        for s in sentences:
            why, entered = self.apply_sentence(s, entered, judge)
            if why and judge:
                problems.append(why)
        return problems

    def apply_sentence(self, s: dict, entered: Optional[str], judge: bool = True) -> tuple[Optional[str], Optional[str]]:
        """Apply one parsed sentence of a caption. ``entered`` is the setting this caption first reached (its
        ground is being stated; None at the caption's start). Returns (why it is impossible or None, entered)."""
        why = self._sentence(s, entered, judge)
        if why:
            self._make_true(s)
        if s["event"] in ("travel", "travel_group", "scene") and self.setting not in self.visited:
            entered = self.setting
            self.visited.add(self.setting)
        return why, entered

    def copy(self) -> "StoryState":
        return StoryState(self.setting, {n: dict(c) for n, c in self.present.items()}, dict(self.away),
                          {s: dict(g) for s, g in self.ground.items()}, set(self.visited))

    def where(self, prop: str) -> Optional[str]:
        """Where a prop is known to be, in words; None when the story has not placed it."""
        for name, c in self.present.items():
            if c["holding"] == prop:
                return f"{name} holds it"
        for name, held in self.away.items():
            if held == prop:
                return f"{name} carried it away"
        for setting, spots in self.ground.items():
            for pos, p in spots.items():
                if p == prop:
                    return f"it lies {_at(pos)}" + ("" if setting == self.setting else f" in the {setting}")
        return None

    # ------------------------------------------------------------------------------------------ taking the story's word
    def _lose(self, prop: Optional[str]) -> None:
        """Take ``prop`` from wherever the state has it."""
        for c in self.present.values():
            if c["holding"] == prop:
                c["holding"] = None
        for name, held in self.away.items():
            if held == prop:
                self.away[name] = None
        for spots in self.ground.values():
            for pos in [q for q, r in spots.items() if r == prop]:
                del spots[pos]

    def _send_away(self, name: str) -> None:
        self.away[name] = self.present.pop(name)["holding"]

    def _put(self, name: str, position: Optional[str] = None, holding: Optional[str] = None,
             keep: bool = False, named: tuple = ()) -> None:
        """Make ``name`` present at ``position`` (None: where they are, else a free spot) holding ``holding``
        (``keep``: what they hold or carried off). Whoever stood there steps to a free spot; with none free (the
        world has two), someone the sentence does not name (``named``) leaves."""
        now = self.present.get(name)
        if keep:
            holding = now["holding"] if now else self.away.get(name)
        if position is None:
            position = now["position"] if now else None
        if position is None:
            taken = {c["position"] for n, c in self.present.items() if n != name}
            position = next((q for q in AT_PHRASE if q not in taken), None)
        if position is None:  # no spot free: whoever the sentence does not name makes room
            other = next((n for n in self.present if n != name and n not in named), None)
            position = self.present[other]["position"] if other else next(iter(AT_PHRASE))
        other = self._who_at(position, but=name)
        if other is not None:
            taken = {c["position"] for n, c in self.present.items() if n not in (name, other)} | {position}
            free = next((q for q in AT_PHRASE if q not in taken), None)
            if free is None:
                self._send_away(other)
            else:
                self.present[other]["position"] = free
        if holding is not None:
            self._lose(holding)
        self._place(name, position, holding)

    def _make_true(self, s: dict) -> None:
        """After an impossible sentence: change the state as little as it takes for the sentence to have happened."""
        e, cs, p, pos = s["event"], s["characters"], s["prop"], s["position"]
        c = cs[0] if cs else None
        named = tuple(cs)
        if e == "scene":
            self.setting = s["setting"]
        elif e in ("stand", "stand_holding", "arrive", "arrive_holding"):
            self._put(c, pos, p if e.endswith("_holding") else None)
        elif e == "lies":
            self._lose(p)
            self._here()[pos] = p
        elif e in ("leave", "leave_holding"):
            if e == "leave_holding":
                self._put(c, holding=p)
            if c in self.present:
                self._send_away(c)
            else:
                self.away.setdefault(c, None)
        elif e == "move":
            self._put(c, pos, keep=True)
        elif e in ("pickup", "fetch"):
            self._put(c, pos if e == "fetch" else None, p)
        elif e == "drop":
            self._put(c)  # empty-handed now, where they stand
            self._lose(p)
            self._here()[self.present[c]["position"]] = p
        elif e in ("travel", "travel_group"):
            if s["setting"] != self.setting:
                for name in [n for n in self.present if n not in cs]:  # whoever is not named stays behind
                    self._send_away(name)
                self.setting = s["setting"]
            for name in cs:
                self._put(name, keep=True, named=named)
        else:  # give, swap, actions
            for name in cs:
                self._put(name, keep=True, named=named)
            if e == "give":
                self.present[cs[0]]["holding"] = None
                self._put(cs[1], holding=p, named=named)
            if e == "swap":
                a, b = self.present[cs[0]], self.present[cs[1]]
                a["position"], b["position"] = b["position"], a["position"]
            if e == "reads":
                self._put(c, holding="book")

    # ------------------------------------------------------------------------------------------ rules
    def _here(self) -> dict:
        return self.ground.setdefault(self.setting, {})

    def _who_at(self, position: Optional[str], but: Optional[str] = None) -> Optional[str]:
        return next((n for n, c in self.present.items() if c["position"] == position and n != but), None)

    def _absent(self, *names: str) -> Optional[str]:
        missing = [n for n in names if n not in self.present]
        return f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not there" if missing else None

    def _place(self, name: str, position: Optional[str], holding: Optional[str]) -> None:
        self.away.pop(name, None)
        self.present[name] = {"position": position, "holding": holding}

    def _sentence(self, s: dict, entered: Optional[str], judge: bool) -> Optional[str]:
        """Check one parsed sentence against the state, then apply it. Returns the reason it is impossible."""
        e, cs, p, pos = s["event"], s["characters"], s["prop"], s["position"]
        c = cs[0] if cs else None
        if e == "scene":
            if self.setting is not None and s["setting"] != self.setting:
                return f"the story is in the {self.setting}, not the {s['setting']}"
            self.setting = s["setting"]
            return None
        if e in ("stand", "stand_holding"):
            held = p if e == "stand_holding" else None
            if not judge:
                self._place(c, pos, held)
                return None
            if c not in self.present:
                return f"{c} is not there"
            now = self.present[c]
            if now["position"] != pos:
                return f"{c} is {_at(now['position'])}, not {_at(pos)}"
            if now["holding"] != held:
                return f"{c} holds {_the(now['holding'])}, not {_the(held)}"
            return None
        if e == "lies":
            spots = self._here()
            if not judge or entered == self.setting:
                why = None
                if self.where(p) is not None:
                    why = f"the {p} cannot lie here: {self.where(p)}"
                elif pos in spots:
                    why = f"the {spots[pos]} already lies {_at(pos)}"
                spots.setdefault(pos, p)
                return why
            return None if spots.get(pos) == p else f"no {p} lies {_at(pos)}"
        if e in ("arrive", "arrive_holding"):
            if c in self.present:
                return f"{c} is already there"
            if self._who_at(pos):
                return f"{self._who_at(pos)} already stands {_at(pos)}"
            held = p if e == "arrive_holding" else None
            why = None
            if held is not None and self.away.get(c) != held and self.where(held) is not None:
                why = f"{c} cannot bring the {held}: {self.where(held)}"
            self.away.pop(c, None)  # whatever they carried off and do not bring back is gone from the story
            self._place(c, pos, held)
            return why
        if e in ("leave", "leave_holding"):
            if c not in self.present:
                return self._absent(c)
            held = self.present[c]["holding"]
            if e == "leave_holding" and held != p:
                return f"{c} holds {_the(held)}, not the {p}"
            self._send_away(c)
            return None
        if e == "move":
            if c not in self.present:
                return self._absent(c)
            if self.present[c]["position"] == pos:
                return f"{c} is already {_at(pos)}"
            if self._who_at(pos, but=c):
                return f"{self._who_at(pos, but=c)} already stands {_at(pos)}"
            self.present[c]["position"] = pos
            return None
        if e == "swap":
            if self._absent(*cs):
                return self._absent(*cs)
            a, b = self.present[cs[0]], self.present[cs[1]]
            a["position"], b["position"] = b["position"], a["position"]
            return None
        if e in ("pickup", "fetch"):
            if c not in self.present:
                return self._absent(c)
            me = self.present[c]
            if me["holding"] is not None:
                return f"{c} already holds the {me['holding']}"
            spot = pos if e == "fetch" else me["position"]
            if e == "fetch" and self._who_at(spot, but=c):
                return f"{self._who_at(spot, but=c)} already stands {_at(spot)}"
            if self._here().get(spot) != p:
                return f"no {p} lies {_at(spot)}" + (f" ({self.where(p)})" if self.where(p) else "")
            del self._here()[spot]
            me.update(position=spot, holding=p)
            return None
        if e == "drop":
            if c not in self.present:
                return self._absent(c)
            me = self.present[c]
            if me["holding"] != p:
                return f"{c} holds {_the(me['holding'])}, not the {p}"
            if me["position"] in self._here():
                return f"the {self._here()[me['position']]} already lies {_at(me['position'])}"
            me["holding"] = None
            self._here()[me["position"]] = p
            return None
        if e == "give":
            if self._absent(*cs):
                return self._absent(*cs)
            giver, taker = self.present[cs[0]], self.present[cs[1]]
            if giver["holding"] != p:
                return f"{cs[0]} holds {_the(giver['holding'])}, not the {p}"
            if taker["holding"] is not None:
                return f"{cs[1]} already holds the {taker['holding']}"
            giver["holding"], taker["holding"] = None, p
            return None
        if e in ("travel", "travel_group"):
            if self._absent(*cs):
                return self._absent(*cs)
            if s["setting"] == self.setting:
                return f"the story is already in the {self.setting}"
            for name in [n for n in self.present if n not in cs]:  # whoever is not named stays behind
                self._send_away(name)
            self.setting = s["setting"]
            return None
        # actions: waves, waves_at, jumps, sleeps, sings, reads
        if self._absent(*cs):
            return self._absent(*cs)
        if e == "reads" and self.present[c]["holding"] != "book":
            return f"{c} holds {_the(self.present[c]['holding'])}, not the book"
        return None
