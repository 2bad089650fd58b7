"""Corrected stories (stage 2c's data): the agent's captions are kept where the world could have told them and
replaced by the world's own next event where not, every frame's picture is the world's state, and an interrupted
run goes on where it stopped."""
import json

import numpy as np
from PIL import Image

from seedstory.data import synthetic as S
from seedstory.data.story_state import StoryState
from training import corrected_stories as C
from training.stage2c_corrected import mix


class ScriptedEngine:
    """The engine's surface that ``corrected_story`` uses, with the agent's captions given in advance."""

    def __init__(self, captions):
        self.captions, self.given = list(captions), []

    def start(self, picture, text):
        self.given.append((picture, text))
        self.tree = type("Tree", (), {"current": 0})()
        return self.tree

    def draft_text(self, tree, frame_id, seed):
        assert tree is self.tree and frame_id == tree.current == len(self.given) - 1
        return self.captions.pop(0)

    def add_given(self, tree, parent_id, picture, text):
        assert tree is self.tree and parent_id == tree.current
        self.given.append((picture, text))
        tree.current += 1


def test_the_agents_possible_captions_stay_and_the_others_are_the_worlds(tmp_path):
    record = S.generate_story(7, 0, 30)  # the meadow: Tansy on the left, Wex on the right with the bucket
    record["id"] = "s7_000000"
    engine = ScriptedEngine(["Wex gives the bucket to Tansy.",   # possible: kept
                             "Wex gives the bucket to Tansy.",   # Wex holds nothing now: the world's event instead
                             "Tansy is very happy.",             # not the world's language: the world's event
                             "Pim arrives on the left."])        # depends on the world's events before
    story = C.corrected_story(engine, record, seed=0, frames=5, size=64, image_root=str(tmp_path), prefix="c_")
    assert story["id"] == "c_s7_000000" and story["captions"][0] == record["captions"][0]
    assert story["written"][:4] == ["opening", "agent", "world", "world"]
    assert story["proposed"][:4] == [None, None, "Wex gives the bucket to Tansy.", "Tansy is very happy."]
    assert story["captions"][1] == "Wex gives the bucket to Tansy."
    assert story["truth"][1]["characters"][0] == {"name": "Tansy", "position": "left", "holding": "bucket",
                                                  "action": None}
    # every caption is possible in the story so far, and each picture is its frame's true state
    state = StoryState.opening(story["captions"][0])
    for caption in story["captions"][1:]:
        assert state.read(caption) == []
    for rel, truth, (given, text), caption in zip(story["images"], story["truth"], engine.given, story["captions"]):
        drawn = np.asarray(S.render_frame(truth, 64))
        assert np.array_equal(np.asarray(Image.open(tmp_path / rel)), drawn)
        assert np.array_equal(np.asarray(given), drawn)
        assert text == caption


def test_an_interrupted_run_keeps_its_whole_stories_and_mixing_keeps_every_story(tmp_path):
    part = tmp_path / "part"
    part.write_text(json.dumps({"id": "a"}) + "\n" + json.dumps({"id": "b"}) + "\n" + '{"id": "c", "capt')
    assert C._done(str(part)) == {"a", "b"}
    assert part.read_text().splitlines() == ['{"id": "a"}', '{"id": "b"}']  # the torn line is gone
    other = tmp_path / "other"
    other.write_text('{"id": "x"}\n{"id": "y"}')
    assert mix(str(tmp_path / "mixed"), [str(part), str(other)], seed=0) == 4
    mixed = [json.loads(line)["id"] for line in open(tmp_path / "mixed")]
    assert sorted(mixed) == ["a", "b", "x", "y"]


def test_a_resumed_run_grows_only_the_missing_stories_whatever_the_workers_before(tmp_path, monkeypatch):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"id": f"s0_{i:06d}"}) + "\n" for i in range(5)))
    out = tmp_path / "corrected.jsonl"

    def story(i):
        return {"id": f"c_s0_{i:06d}", "written": ["opening", "agent", "world"]}

    # an earlier run with three workers grew stories 3 and 1, the last line torn off
    (tmp_path / "corrected.jsonl.part2").write_text(json.dumps(story(3)) + "\n")
    (tmp_path / "corrected.jsonl.part0").write_text(json.dumps(story(1)) + "\n" + json.dumps(story(0))[:-1])
    asked = []

    def grow(job):
        records, part = job[2], job[3]
        asked.extend(r["id"] for _, r in records)
        with open(part, "a") as f:
            f.writelines(json.dumps(story(int(r["id"][3:]))) + "\n" for _, r in records)

    monkeypatch.setattr(C, "_grow", grow)
    result = C.write_corrected("demo", str(out), str(data), str(tmp_path), 5, prefix="c_", workers=1)
    assert asked == ["s0_000000", "s0_000002", "s0_000004"]
    assert [json.loads(line)["id"] for line in open(out)] == [story(i)["id"] for i in range(5)]
    assert not list(tmp_path.glob("corrected.jsonl.part*"))
    assert result.pop("seconds") >= 0 and result == {"stories": 5, "agent": 5, "world": 5, "agent_share": 0.5}
