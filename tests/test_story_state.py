"""The story so far, read from captions: the world's own stories are always possible and tracked exactly; each
kind of impossible caption is named."""
import pytest

from seedstory.data.story_state import StoryState
from seedstory.data.synthetic import generate_story


def _scene(state: StoryState) -> tuple:
    return ({n: (c["position"], c["holding"]) for n, c in state.present.items()}, state.setting,
            dict(state.ground.get(state.setting, {})))


def _truth_scene(truth: dict) -> tuple:
    return ({c["name"]: (c["position"], c["holding"]) for c in truth["characters"]}, truth["setting"],
            {p["position"]: p["name"] for p in truth["props"]})


@pytest.mark.parametrize("seed", [0, 7])
def test_the_worlds_own_stories_are_possible_and_tracked_exactly(seed):
    for index in range(150):
        story = generate_story(seed, index, 30)
        state = StoryState.opening(story["captions"][0])
        assert _scene(state) == _truth_scene(story["truth"][0])
        for k, caption in enumerate(story["captions"][1:], start=1):
            assert state.read(caption) == [], (story["id"], k, caption)
            assert _scene(state) == _truth_scene(story["truth"][k]), (story["id"], k, caption)


OPENING = ("It is a bright day in the meadow. Pim is on the left, holding the apple. Bodo stands on the right. "
           "A kite lies on the left.")


@pytest.mark.parametrize("caption, why", [
    ("Wex leaves.", "Wex is not there"),
    ("Wex waves at Tansy.", "Wex and Tansy are not there"),
    ("Pim waves at Tansy.", "Tansy is not there"),
    ("Bodo arrives on the right.", "Bodo is already there"),
    ("Wex arrives on the left.", "Pim already stands on the left"),
    ("Bodo leaves. Wex arrives on the right with the apple.", "Wex cannot bring the apple: Pim holds it"),
    ("Bodo picks up the kite.", "no kite lies on the right (it lies on the left)"),
    ("Pim picks up the kite.", "Pim already holds the apple"),
    ("Bodo gives the apple to Pim.", "Bodo holds nothing, not the apple"),
    ("Pim gives the apple to Bodo. Bodo drops the apple.", None),  # possible: Bodo holds it after the first
    ("Bodo moves to the left.", "Pim already stands on the left"),
    ("Bodo walks to the right.", "Bodo is already on the right"),
    ("Bodo reads the book.", "Bodo holds nothing, not the book"),
    ("Pim leaves with the kite.", "Pim holds the apple, not the kite"),
    ("Pim and Bodo go to the meadow.", "the story is already in the meadow"),
    ("Pim drops the apple.", "the kite already lies on the left"),
    ("Pim leaves. Bodo walks to the left and picks up the kite.", None),
])
def test_impossible_captions_are_named(caption, why):
    state = StoryState.opening(OPENING)
    assert state.read(caption) == ([] if why is None else [why])


def test_whoever_travel_does_not_name_stays_behind_and_places_remember_their_props():
    state = StoryState.opening(OPENING)
    assert state.read("Pim travels to the beach. A book lies on the right.") == []
    assert set(state.present) == {"Pim"} and state.away == {"Bodo": None}
    assert state.copy().read("Bodo waves.") == ["Bodo is not there"]
    assert state.read("Pim drops the apple. Bodo arrives on the right.") == []
    assert state.read("Together, Pim and Bodo walk to the meadow. A kite lies on the left.") == []
    # each place remembers what lies there: the meadow's kite, the beach's book
    assert state.read("Pim and Bodo go to the beach. A kite lies on the left.") == ["no kite lies on the left"]
    fresh = StoryState.opening(OPENING)
    assert fresh.read("Pim and Bodo go to the beach. There is a book on the left.") == []
    assert fresh.read("Pim and Bodo travel to the meadow. A book lies on the right.") == ["no book lies on the right"]
    # a place first reached cannot hold a prop that is known to be elsewhere
    # (the meadow's book: the caption before said so, and a mistake is counted once, then taken as said)
    assert fresh.read("Pim and Bodo go to the cave. A book lies on the right.") == [
        "the book cannot lie here: it lies on the right in the meadow"]


def test_a_caption_that_does_not_parse_is_not_judged_but_its_good_sentences_count():
    state = StoryState.opening(OPENING)
    before = _scene(state)
    assert state.read("Then the moon ate a sandwich.") is None
    assert _scene(state) == before
    assert state.read("Bodo leaves. zorp blim.") is None
    assert "Bodo" not in state.present and "Bodo" in state.away
    assert state.read("Bodo arrives on the right.") == []


@pytest.mark.parametrize("caption, then, present, holding", [
    # travel with someone absent: Pim is taken to have come along; Bodo, not named, stays behind
    ("Pim and Tansy go to the beach.", "Tansy waves at Pim.", {"Pim", "Tansy"}, {"Pim": "apple", "Tansy": None}),
    # an arrival where someone stands and no spot is free: the newcomer is there, the one in the way leaves
    ("Wex arrives on the left.", "Wex waves at Bodo.", {"Bodo", "Wex"}, {"Wex": None}),
    # a give of a prop the giver does not hold: the taker holds it now, nobody else does
    ("Bodo gives the kite to Pim.", "Pim drops the kite.", {"Pim", "Bodo"}, {"Pim": None, "Bodo": None}),
    # a drop by someone empty-handed: the prop lies at their feet from now on
    ("Bodo drops the apple.", "Bodo picks up the apple.", {"Pim", "Bodo"}, {"Pim": None, "Bodo": "apple"}),
    # a swap with someone absent: they are there, in the other's place
    ("Wex and Pim swap places.", "Wex waves at Pim.", {"Pim", "Wex"}, {"Pim": "apple"}),
    # an absent character's wave: they are there from now on (someone not named makes room)
    ("Wex waves.", "Wex leaves.", {"Bodo"}, {"Bodo": None}),
    # a drop of a prop one does not hold: it lies at one's feet, and one's hands are empty
    ("Pim drops the kite.", "Pim picks up the kite.", {"Pim", "Bodo"}, {"Pim": "kite"}),
    # an impossible travel to the place the story is in takes nobody away
    ("Pim goes to the meadow.", "Bodo waves at Pim.", {"Pim", "Bodo"}, {"Pim": "apple"}),
])
def test_an_impossible_sentence_counts_once_then_the_story_is_taken_at_its_word(caption, then, present, holding):
    state = StoryState.opening(OPENING)
    assert state.read(caption) != []
    assert state.read(then) == [], "the caption after a mistake that follows it is possible"
    assert set(state.present) == present
    for name, prop in holding.items():
        assert state.present[name]["holding"] == prop
    held = [c["holding"] for c in state.present.values() if c["holding"]] + [h for h in state.away.values() if h]
    lying = [p for spots in state.ground.values() for p in spots.values()]
    assert len(held + lying) == len(set(held + lying)), "a prop is in one place only"
    placed = [c["position"] for c in state.present.values()]
    assert None not in placed and len(placed) == len(set(placed)), "one figure per spot, at a spot"
    assert all(None not in spots for spots in state.ground.values()), "a prop lies at a spot"
    if caption.endswith("swap places."):
        assert state.present["Wex"]["position"] == "left", "Wex stands where Pim stood"
