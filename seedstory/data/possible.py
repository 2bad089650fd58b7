"""What the synthetic world allows next, token by token: a training signal for the demo's agent.

For every caption of a story after the first, ``PossibleNext.for_story`` gives, at each of the caption's tokens
and at the ``<img>`` that ends it, the token ids that continue the caption so far into one that is still
possible in the story so far (``StoryState``'s rules, the analyzer's story logic). Stage 2 can train the agent
to keep its probability on them (``train.possible_loss_scale``): the LM loss spreads its gradient over the
story's free choices (who waves, which wording), this loss only over what the story so far decides (who is
there to leave, who holds what to give).

The sentences are every filling of the world's templates (a finite set, a few thousand); the tokenizer must
split on spaces and punctuation first (byte-level BPE as ours), so that a caption's tokens are its sentences'
tokens one after another.
"""
from __future__ import annotations

import itertools
import string
from functools import lru_cache
from typing import Optional, Sequence

from .story_state import StoryState
from .synthetic import join_names, parse_caption, parse_sentence, split_sentences
from .world import AT_PHRASE, CHARACTERS, POSITIONS, PROPS, SETTING_NAMES, TEMPLATES, setting_phrase

__all__ = ["PossibleNext", "grammar_sentences"]


def _fillings(field: str) -> list[str]:
    if field in ("c", "c2"):
        return list(CHARACTERS)
    if field == "cs":
        sizes = range(2, len(CHARACTERS) + 1)
        return [join_names(list(g)) for n in sizes for g in itertools.permutations(CHARACTERS, n)]
    if field == "p":
        return list(PROPS)
    if field == "ap":
        return [f"{PROPS[p]['article']} {p}" for p in PROPS]
    if field == "AP":
        return [f"{PROPS[p]['article'].capitalize()} {p}" for p in PROPS]
    if field == "at":
        return [AT_PHRASE[p] for p in POSITIONS]
    if field == "to":
        return list(POSITIONS)
    if field == "s":
        return list(SETTING_NAMES)
    if field == "in_s":
        return [setting_phrase(s) for s in SETTING_NAMES]
    raise KeyError(field)


def _key(parsed: dict) -> tuple:
    return (parsed["event"], tuple(parsed["characters"]), parsed["prop"], parsed["position"], parsed["setting"])


@lru_cache(maxsize=1)
def grammar_sentences() -> tuple[dict, dict]:
    """Every sentence the world's grammar can say, grouped by meaning: ({meaning: parsed}, {meaning: [texts]})."""
    parsed_by, texts_by = {}, {}
    for templates in TEMPLATES.values():
        for template in templates:
            fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
            for values in itertools.product(*(_fillings(f) for f in fields)):
                text = template.format(**dict(zip(fields, values)))
                parsed = parse_sentence(text)  # as the analyzer reads it
                if parsed is None:  # "Pim gives the apple to Pim."
                    continue
                key = _key(parsed)
                parsed_by.setdefault(key, parsed)
                texts_by.setdefault(key, []).append(text)
    return parsed_by, texts_by


def possible_sentences(state: StoryState, entered: Optional[str]) -> list[str]:
    """The sentences possible as the next one of a caption, ``state`` being the story with the caption's earlier
    sentences applied (``entered``: the setting the caption first reached, as ``StoryState.apply_sentence``)."""
    parsed_by, texts_by = grammar_sentences()
    out = []
    for key, parsed in parsed_by.items():
        why, _ = state.copy().apply_sentence(parsed, entered, True)
        if why is None:
            out.extend(texts_by[key])
    return out


class PossibleNext:
    """Possible next tokens of a story's captions, for a tokenizer whose ``end_id`` closes a caption (``<img>``)."""

    def __init__(self, tokenizer, end_id: int):
        self.tokenizer, self.end_id = tokenizer, int(end_id)
        self._ids: dict[tuple[str, bool], tuple[int, ...]] = {}

    def ids(self, text: str, lead: bool) -> tuple[int, ...]:
        """Token ids of a sentence at a caption's start (``lead`` False) or after another one (True)."""
        key = (text, lead)
        if key not in self._ids:
            self._ids[key] = tuple(self.tokenizer.encode((" " + text) if lead else text, add_special_tokens=False))
        return self._ids[key]

    def for_story(self, captions: Sequence[str]) -> list[Optional[list[list[int]]]]:
        """One entry per caption: None for the opening and for a caption the world's rules do not allow (or that
        does not parse); else, for each token of the caption and then its end, the sorted possible token ids."""
        out: list[Optional[list[list[int]]]] = [None]
        state = StoryState.opening(captions[0])
        for caption in captions[1:]:
            out.append(self._caption(state, caption))
            state.read(caption)
        return out

    def _caption(self, state: StoryState, caption: str) -> Optional[list[list[int]]]:
        text = " ".join(str(caption).split())
        parsed = parse_caption(text)
        if parsed is None:
            return None
        sentences = split_sentences(text)  # the sentences parse_caption read, in order
        mine = [self.ids(s, i > 0) for i, s in enumerate(sentences)]
        if sum(map(len, mine)) != len(self.tokenizer.encode(text, add_special_tokens=False)):
            return None  # the tokenizer merged across sentences: positions would not line up
        state = state.copy()
        entered = None
        allowed: list[list[int]] = []
        for i, (tokens, meaning) in enumerate(zip(mine, parsed["sentences"])):
            sets = [set() for _ in tokens]
            if i > 0:
                sets[0].add(self.end_id)  # the caption could have ended here
            for text_option in possible_sentences(state, entered):
                seq = self.ids(text_option, i > 0)
                same = 0
                while same < min(len(seq), len(tokens)) and seq[same] == tokens[same]:
                    same += 1
                for j in range(min(same + 1, len(tokens), len(seq))):
                    sets[j].add(seq[j])
            why, entered = state.apply_sentence(meaning, entered, True)
            if why is not None or any(t not in s for t, s in zip(tokens, sets)):
                return None
            allowed += [sorted(s) for s in sets]
        ends = {self.end_id} | {self.ids(t, True)[0] for t in possible_sentences(state, entered)}
        allowed.append(sorted(ends))
        return allowed
