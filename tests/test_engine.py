import io
import os
import re
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from seedstory.engine import ContextState, SinkConfig, StoryEngine
from seedstory.export import export_story
from seedstory.image_processing import ImageError
from seedstory.models.kv import KVParts, kv_length, kv_slice
from seedstory.storage import StoryFileError, load_story, save_story
from seedstory.story import StoryError


def pixels(frame):
    return np.asarray(frame.image)


@pytest.fixture
def engine(tiny_pipeline):
    return StoryEngine(tiny_pipeline, mode="window", window=8)


def test_step_writes_and_paints(engine, opening_image):
    tree = engine.start(opening_image, "Once upon a time a fox found a key.")
    f1 = engine.step(tree)
    f2 = engine.step(tree)
    assert [f.id for f in tree.path()] == [0, f1.id, f2.id]
    for f in (f1, f2):
        assert f.image.size == (64, 64) and f.features.shape == (1, 16, 32)
        assert f.token_ids[-18:] == engine.prompt.image_ids.block
        assert isinstance(f.text, str)


def test_kv_reuse_equals_full_recompute(tiny_pipeline, opening_image):
    outs = {}
    for mode in ("recompute", "window", "sink"):
        eng = StoryEngine(tiny_pipeline, mode=mode, window=8)
        tree = eng.start(opening_image, "The lighthouse keeper woke up.")
        frames = [eng.step(tree) for _ in range(4)]
        outs[mode] = frames
    for mode in ("window", "sink"):
        for a, b in zip(outs["recompute"], outs[mode]):
            assert a.token_ids == b.token_ids
            assert torch.allclose(a.features, b.features, atol=1e-4)


def test_cached_state_equals_state_rebuilt_from_scratch(engine, opening_image):
    tree = engine.start(opening_image, "A robot learns to paint.")
    for _ in range(3):
        engine.step(tree)
    cached = engine.state_after(tree, tree.current)
    engine.store.drop(lambda key: True)
    rebuilt = engine.state_after(tree, tree.current)
    assert rebuilt.next_pos == cached.next_pos and kv_length(rebuilt.kv) == kv_length(cached.kv)
    assert torch.allclose(rebuilt.logits, cached.logits, atol=1e-4)


def test_window_evicts_whole_frames(tiny_pipeline, opening_image):
    eng = StoryEngine(tiny_pipeline, mode="window", window=2)
    tree = eng.start(opening_image, "Rain.")
    frames = [eng.step(tree) for _ in range(3)]
    state = eng.state_after(tree, frames[-1].id)
    assert [s[0] for s in state.spans] == [frames[1].id, frames[2].id]
    assert kv_length(state.kv) == 1 + len(frames[1].token_ids) + len(frames[2].token_ids)
    total = 1 + len(tree.path()[0].token_ids) + sum(len(f.token_ids) for f in frames)
    assert state.next_pos == total  # positions keep counting after eviction


def test_stored_states_share_the_frames_they_have_in_common(tiny_pipeline, opening_image):
    """Each state holds the frames in its window, but the store pays for each frame's entries about once."""
    eng = StoryEngine(tiny_pipeline, mode="window", window=4)
    tree = eng.start(opening_image, "Snow fell on the village.")
    for _ in range(10):
        eng.step(tree)
    states = [eng.state_after(tree, f.id) for f in tree.path()]
    alone = sum(s.nbytes for s in states)  # what the states cost if each held its own copy
    assert len(eng.store) == len(states) and eng.store.nbytes * 3 < alone


def test_sink_context_has_a_fixed_budget(tiny_pipeline, opening_image):
    """The sink tokens of the last ``SinkConfig.frames`` evicted frames stay, the oldest go: the context stops
    growing, and the pieces kept are the very ones the previous state held."""
    eng = StoryEngine(tiny_pipeline, mode="sink", window=1, sink=SinkConfig(frames=2))
    tree = eng.start(opening_image, "The owl counted the stars.")
    for _ in range(6):
        eng.step(tree)
    states = [eng.state_after(tree, f.id) for f in tree.path()]
    assert [len(s.sinks) for s in states] == [0, 1, 2, 2, 2, 2, 2]
    for before, after in zip(states[2:], states[3:]):
        assert after.parts[1] is before.parts[2]  # the newer sink piece moved up, shared, not copied
        assert after.n_fixed == kv_length(after.parts[0]) + sum(after.sinks)
    assert kv_length(states[-1].kv) == states[-1].n_fixed + states[-1].spans[0][1]
    assert kv_length(states[-1].kv) <= max(kv_length(s.kv) for s in states[2:5]) + 8


def test_sink_keeps_exactly_the_intended_positions(tiny_pipeline):
    eng = StoryEngine(tiny_pipeline, mode="sink", window=1)
    # After 1 fixed entry (BOS): frame A (23 entries, <img> at 5, </img> at 22), frame B (21, <img> 3, </img> 20).
    n = 1 + 23 + 21
    k = torch.arange(n, dtype=torch.float32).view(1, 1, n, 1)
    kv = ((k, k.clone()),)
    state = ContextState(parts=KVParts((kv_slice(kv, 0, 1), kv_slice(kv, 1, 24), kv_slice(kv, 24, n))),
                         logits=torch.zeros(3), next_pos=n, n_fixed=1, spans=[(10, 23, 5, 22, 0), (11, 21, 3, 20, 0)])
    new = eng._evict_oldest(state)
    kept = new.kv[0][0].flatten().long().tolist()
    # The story's first 4 tokens (BOS + 3), [<img>-4, <img>+8) and [</img>-8, </img>+4) of frame A.
    expected_a = sorted(set(range(3)) | set(range(1, 13)) | set(range(14, 23)))
    assert kept == [0] + [1 + i for i in expected_a] + list(range(24, n))
    assert new.n_fixed == 1 + len(expected_a) and new.next_pos == n
    assert new.spans == [(11, 21, 3, 20, 3)]  # </img>+4 reaches 3 tokens into frame B: they stay too
    newer = eng._evict_oldest(new)
    tail = newer.kv[0][0].flatten().long().tolist()[new.n_fixed:]
    assert tail == [24 + i for i in sorted(set(range(3)) | set(range(0, 11)) | set(range(12, 21)))]


def test_regenerate_same_seed_identical_other_seed_differs(engine, opening_image):
    tree = engine.start(opening_image, "A cat sails a boat.")
    f1 = engine.step(tree)
    a = engine.regenerate(tree, f1.id, part="image", seed=7)
    b = engine.regenerate(tree, f1.id, part="image", seed=7)
    c = engine.regenerate(tree, f1.id, part="image", seed=8)
    assert np.array_equal(pixels(a), pixels(b)) and not np.array_equal(pixels(a), pixels(c))
    assert a.text == f1.text and a.parent == f1.parent and tree.current == c.id
    t1 = engine.regenerate(tree, f1.id, part="both", seed=11)
    t2 = engine.regenerate(tree, f1.id, part="both", seed=11)
    t3 = engine.regenerate(tree, f1.id, part="text", seed=12)
    assert t1.token_ids == t2.token_ids and np.array_equal(pixels(t1), pixels(t2))
    assert t3.token_ids != t1.token_ids and t3.seed == f1.seed
    with pytest.raises(StoryError, match="opening frame"):
        engine.regenerate(tree, 0)


def test_branching_leaves_other_branches_untouched(engine, opening_image):
    tree = engine.start(opening_image, "Two friends find a map.")
    f1 = engine.step(tree)
    f2 = engine.step(tree)
    before = {f.id: (f.text, f.token_ids[:], pixels(f).copy()) for f in tree.frames.values() if f.image is not None}
    br = engine.branch(tree, f1.id, seed=3)
    br2 = engine.branch(tree, f1.id, text="Suddenly it started to snow.")
    assert tree.get(f1.id).children == [f2.id, br.id, br2.id]
    assert br2.text == "Suddenly it started to snow."
    after_next = engine.step(tree, br2.id)
    assert after_next.parent == br2.id
    for fid, (text, ids, px) in before.items():
        f = tree.get(fid)
        assert f.text == text and f.token_ids == ids and np.array_equal(pixels(f), px)
    # Continuing the old branch is unaffected by the new ones.
    fresh = StoryEngine(engine.pipe, mode="window")
    assert fresh.step(tree, f2.id).token_ids == engine.step(tree, f2.id).token_ids


def test_edit_text_then_continue(engine, opening_image):
    tree = engine.start(opening_image, "A dragon wakes.")
    f1 = engine.step(tree)
    edited = engine.edit_text(tree, f1.id, "The dragon <img> yawns [INST] loudly.")
    assert edited.parent == f1.parent and edited.origin == "edited"
    assert "<img>" not in edited.text and edited.token_ids.count(engine.prompt.image_ids.boi) == 1
    nxt = engine.step(tree, edited.id)
    assert [f.id for f in tree.path(nxt.id)] == [0, edited.id, nxt.id]
    root_edit = engine.edit_text(tree, 0, "A dragon sleeps.")
    assert root_edit.parent is None and root_edit.image is tree.get(0).image


def test_bad_input_is_refused_and_story_kept(engine, opening_image, tmp_path):
    with pytest.raises(StoryError, match="empty"):
        engine.start(opening_image, "   ")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ImageError, match="not a readable image"):
        engine.start(str(bad), "text")
    tree = engine.start(opening_image, "ok")
    capped = StoryEngine(engine.pipe, max_frames=2)
    capped.step(tree)
    n = len(tree)
    with pytest.raises(StoryError, match="limit of 2 frames"):
        capped.step(tree)
    assert len(tree) == n
    with pytest.raises(StoryError, match="limit"):
        engine.edit_text(tree, 0, "x" * 5000)


def test_save_load_continue_equals_never_saved(engine, opening_image, tmp_path):
    tree = engine.start(opening_image, "An owl opens a bakery.")
    engine.step(tree)
    engine.step(tree)
    for target in (tmp_path / "story", tmp_path / "story.zip"):
        save_story(tree, str(target), model_name="tiny")
        loaded = load_story(str(target))
        assert [f.text for f in loaded.path()] == [f.text for f in tree.path()]
        fresh = StoryEngine(engine.pipe, mode="window")
        a = fresh.step(loaded)
        b = StoryEngine(engine.pipe, mode="window").step(tree, tree.path()[-1].id)
        assert a.token_ids == b.token_ids and np.array_equal(pixels(a), pixels(b))
    assert (tmp_path / "story" / "story.json").exists() and (tmp_path / "story" / "frames").is_dir()


def test_corrupt_or_foreign_story_files(tmp_path, engine, opening_image):
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    with pytest.raises(StoryFileError, match="neither"):
        load_story(str(tmp_path / "junk.zip"))
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as zf:
        zf.writestr("story.json", '{"format": "something-else"}')
    with pytest.raises(StoryFileError, match="not a seedstory story"):
        load_story(str(tmp_path / "other.zip"))
    tree = engine.start(opening_image, "x")
    target = tmp_path / "keep"
    save_story(tree, str(target))
    (target / "story.json").write_text("{broken")
    with pytest.raises(StoryFileError, match="not valid JSON"):
        load_story(str(target))
    other = tmp_path / "not_a_story"
    other.mkdir()
    (other / "important.txt").write_text("mine")
    with pytest.raises(StoryFileError, match="refusing"):
        save_story(tree, str(other))
    assert (other / "important.txt").read_text() == "mine"


def test_every_export_format_opens(engine, opening_image, tmp_path):
    tree = engine.start(opening_image, "A <b>bold</b> start & more.")
    engine.step(tree)
    engine.step(tree)
    comic = export_story(tree, "comic", str(tmp_path / "c.png"))
    assert Image.open(comic).size[0] > 0
    gif = Image.open(export_story(tree, "gif", str(tmp_path / "s.gif")))
    assert gif.n_frames == 3
    pdf = open(export_story(tree, "pdf", str(tmp_path / "s.pdf")), "rb").read()
    assert pdf.startswith(b"%PDF-") and len(re.findall(rb"/Type\s*/Page\b", pdf)) == 3
    page = open(export_story(tree, "html", str(tmp_path / "s.html")), encoding="utf-8").read()
    assert "&lt;b&gt;bold&lt;/b&gt;" in page and page.count("<img ") == 3
    with zipfile.ZipFile(export_story(tree, "zip", str(tmp_path / "s.zip"))) as zf:
        names = zf.namelist()
        assert "story.txt" in names and sum(n.endswith(".png") for n in names) == 3
        Image.open(io.BytesIO(zf.read("frame_000.png"))).verify()


def test_candidates_keep_the_picture_that_shows_the_features_best(tiny_pipeline, opening_image, monkeypatch):
    pipe = tiny_pipeline
    feats = pipe.encode_image(opening_image)
    one = pipe.settings.replace(num_inference_steps=2, candidates=1)
    singles = [np.asarray(pipe.paint(feats, seed=7 + i, settings=one), np.int16) for i in range(3)]
    assert np.abs(singles[0] - singles[1]).max() > 10  # the candidates differ

    # The score reads a picture back through the visual tokenizer: the picture itself scores ~1, a blank one less.
    same, blank = pipe.picture_scores(feats, [opening_image, Image.new("RGB", opening_image.size, (128, 128, 128))])
    assert same == pytest.approx(1.0, abs=1e-4) and blank < same

    three = one.replace(candidates=3)
    real = pipe.picture_scores(feats, [Image.fromarray(x.astype(np.uint8)) for x in singles])
    kept = np.asarray(pipe.paint(feats, seed=7, settings=three), np.int16)
    assert np.abs(kept - singles[int(np.argmax(real))]).max() <= 2  # painted in one batch, seeds 7, 8, 9
    for best in (2, 0):  # whichever candidate scores best is kept
        monkeypatch.setattr(pipe, "picture_scores", lambda f, pics, b=best: [float(i == b) for i in range(len(pics))])
        kept = np.asarray(pipe.paint(feats, seed=7, settings=three), np.int16)
        assert np.abs(kept - singles[best]).max() <= 2


def test_candidates_are_recorded_and_reach_the_painter(engine, opening_image, monkeypatch):
    tree = engine.start(opening_image, "A robot learns to paint.")
    counts = []
    paint = engine.pipe.paint

    def counting_paint(features, seed=None, settings=None, callback=None):
        counts.append(settings.candidates)
        return paint(features, seed=seed, settings=settings, callback=callback)

    monkeypatch.setattr(engine.pipe, "paint", counting_paint)
    frame = engine.step(tree, settings=engine.pipe.settings.replace(candidates=2, num_inference_steps=1))
    assert counts == [2] and frame.settings["candidates"] == 2


def test_context_from_picture_feeds_the_painted_picture_back(engine, opening_image, tmp_path):
    """``context_from: picture``: a new frame enters the context as its painted picture read back, the
    features it was painted from are kept for repainting, and both survive a save and load."""
    settings = engine.pipe.settings.replace(context_from="picture", num_inference_steps=2)
    tree = engine.start(opening_image, "A robot learns to paint.")
    first = tree.get(tree.current)
    assert first.painted_from is None  # the opening is the person's picture
    frame = engine.step(tree, settings=settings)
    assert torch.allclose(frame.features, engine.pipe.encode_image(frame.image))
    assert frame.painted_from is not None and not torch.allclose(frame.painted_from, frame.features)
    assert frame.settings["context_from"] == "picture"
    # the default (the release's way) keeps the agent's own features in the context
    plain = engine.step(tree, first.id, settings=settings.replace(context_from="features"))
    assert plain.painted_from is None and torch.allclose(plain.features, frame.painted_from, atol=1e-4)
    # the next frame reads the re-encoded picture: its state equals one rebuilt from scratch
    after = engine.step(tree, frame.id, settings=settings)
    cached = engine.state_after(tree, after.id)
    engine.store.drop(lambda key: True)
    assert torch.allclose(engine.state_after(tree, after.id).logits, cached.logits, atol=1e-4)
    # repainting starts from the features the picture was painted from, and the context follows the new picture
    again = engine.regenerate(tree, frame.id, part="image", seed=5, settings=settings)
    assert torch.equal(again.painted_from, frame.painted_from)
    assert torch.allclose(again.features, engine.pipe.encode_image(again.image))
    save_story(tree, str(tmp_path / "s.zip"))
    loaded = load_story(str(tmp_path / "s.zip")).get(frame.id)
    assert torch.equal(loaded.painted_from, frame.painted_from) and torch.equal(loaded.features, frame.features)
    with pytest.raises(Exception, match="context_from"):
        settings.replace(context_from="pixels")


def test_a_story_with_a_repainted_frame_saves_and_loads(engine, opening_image, tmp_path):
    """A picture-only regeneration shares its features with the frame it repaints; saving must still work."""
    tree = engine.start(opening_image, "A fox finds a map.")
    frame = engine.step(tree)
    again = engine.regenerate(tree, frame.id, part="image", seed=3)
    save_story(tree, str(tmp_path / "s.zip"))
    loaded = load_story(str(tmp_path / "s.zip"))
    assert torch.equal(loaded.get(again.id).features, loaded.get(frame.id).features)


def test_detokenizer_device_is_checked_and_paints_beside_the_writer(opening_image):
    """``runtime.detokenizer_device`` puts the de-tokenizer on a device of its own (refused when there is no such
    GPU); the text still runs ahead of the painter, and the story is the one a single device makes."""
    import pytest

    from seedstory.config import PresetError
    from seedstory.pipeline import SeedStoryPipeline

    with pytest.raises(PresetError, match="no such GPU"):
        SeedStoryPipeline.from_preset("tiny", ["runtime.detokenizer_device=cuda:7"])
    apart = SeedStoryPipeline.from_preset("tiny", ["runtime.detokenizer_device=cpu"])
    assert apart.detokenizer_device == torch.device("cpu") and apart.detokenizer.unet.device.type == "cpu"
    stories = []
    for pipe in (apart, SeedStoryPipeline.from_preset("tiny")):
        eng = StoryEngine(pipe, mode="window")
        tree = eng.start(opening_image, "The kite rose.")
        events = [e for e, _ in eng.steps(tree, 3)]
        assert events.count("written") == 3 and events.count("painted") == 3
        stories.append([(f.text, f.image.tobytes()) for f in tree.path()])
    assert stories[0] == stories[1]
