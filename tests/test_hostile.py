"""Hostile input, as a public server gets it: story files that are not what they claim are refused, quickly,
with a clear message that names no server folder, and without unpacking what they hide."""
import io
import json
import random
import time
import tracemalloc
import zipfile

import pytest
from PIL import Image

from seedstory import storage
from seedstory.storage import StoryFileError, load_story, save_story
from seedstory.story import Frame, StoryTree


def _story_zip(path, frames, roots, extra=None):
    meta = {"format": storage.STORY_FORMAT, "version": storage.STORY_VERSION, "roots": roots, "current": None,
            "frames": frames}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("story.json", json.dumps(meta))
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return str(path)


def _frame(fid, parent, children):
    return {"id": fid, "parent": parent, "children": children, "text": f"frame {fid}", "image": None}


@pytest.mark.parametrize("frames, roots, why", [
    ([_frame(0, None, [0])], [0], "form a tree"),                                        # its own child
    ([_frame(0, None, [1]), _frame(1, 0, [0])], [0], "form a tree"),                     # each other's child
    ([_frame(0, None, []), _frame(1, 2, [2]), _frame(2, 1, [1])], [0], "form a tree"),   # a cycle off the tree
    ([_frame(0, None, [1]), _frame(1, 0, []), _frame(1, 0, [])], [0], "share the id 1"),
    ([_frame(0, None, [1]), _frame(1, 7, [])], [0], "missing parent 7"),
    ([_frame(0, None, [1, 1]), _frame(1, 0, [])], [0], "not listed once"),
    ([_frame(0, None, [])], [0, 0], "not listed once"),
    ([_frame(0, None, ["x"])], [0], "malformed"),
    ({"not": "a list"}, [0], "no frame list"),
])
def test_a_story_that_is_not_a_tree_is_refused_at_once(tmp_path, frames, roots, why):
    path = _story_zip(tmp_path / "story.zip", frames, roots)
    start = time.monotonic()
    with pytest.raises(StoryFileError, match=why) as err:
        load_story(path)
    assert time.monotonic() - start < 2
    assert str(tmp_path) not in str(err.value) and "story.zip" in str(err.value)  # no server folder in the message


def test_too_many_frames_are_refused(tmp_path):
    n = storage.MAX_FRAMES + 1
    frames = [_frame(0, None, [1])] + [_frame(i, i - 1, [i + 1] if i + 1 < n else []) for i in range(1, n)]
    with pytest.raises(StoryFileError, match=f"at most {storage.MAX_FRAMES}"):
        load_story(_story_zip(tmp_path / "long.zip", frames, [0]))


def test_a_zip_bomb_is_refused_without_unpacking_it(tmp_path):
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("story.json", json.dumps({"format": storage.STORY_FORMAT, "version": 1, "roots": [],
                                              "frames": []}))
        with zf.open("frames/0000.png", "w", force_zip64=True) as member:
            block = bytes(2**20)
            for _ in range(40):  # 40 MiB of zeros (under the per-file bound), about 40 KiB packed
                member.write(block)
    assert path.stat().st_size < 2**20
    tracemalloc.start()
    try:
        with pytest.raises(StoryFileError, match="times larger than it is packed"):
            load_story(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5 * 2**20  # the 40 MiB were never read


def test_too_many_members_or_one_too_big_are_refused(tmp_path):
    extra = {f"frames/{i:04d}.png": b"x" for i in range(storage.MAX_MEMBERS + 1)}
    with pytest.raises(StoryFileError, match="holds .* files"):
        load_story(_story_zip(tmp_path / "many.zip", [_frame(0, None, [])], [0], extra))
    big = tmp_path / "big.zip"
    with zipfile.ZipFile(big, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("story.json", b"{}")
        zf.writestr("frames/0000.png", bytes(storage.MAX_MEMBER_BYTES + 1))
    with pytest.raises(StoryFileError, match="over 64 MiB"):
        load_story(str(big))


def test_random_malformed_trees_are_refused_or_loaded_never_hang(tmp_path):
    """Fuzz: random ids, parents, children and roots. Each file either loads as a consistent tree or is refused
    with StoryFileError, within a time bound."""
    rng = random.Random(0)
    loaded = refused = 0
    for k in range(300):
        n = rng.randint(1, 12)
        ids = [rng.randint(0, 14) for _ in range(n)] if rng.random() < 0.3 else list(range(n))
        frames = []
        for fid in ids:
            parent = None if rng.random() < 0.25 else rng.choice(ids + [99])
            children = rng.sample(ids, rng.randint(0, min(3, len(ids))))
            frames.append(_frame(fid, parent, children))
        if rng.random() < 0.5:  # often a well-formed tree, then broken in one place or not at all
            frames = [_frame(i, None if i == 0 else rng.randrange(i), []) for i in range(n)]
            for f in frames:
                if f["parent"] is not None:
                    frames[f["parent"]]["children"].append(f["id"])
            if rng.random() < 0.5:
                victim = rng.choice(frames)
                victim["children"].append(rng.choice(ids))
        roots = sorted({f["id"] for f in frames if f["parent"] is None}) if rng.random() < 0.7 else [rng.choice(ids)]
        path = _story_zip(tmp_path / f"fuzz{k}.zip", frames, roots)
        start = time.monotonic()
        try:
            tree = load_story(path)
        except StoryFileError:
            refused += 1
        else:
            loaded += 1
            assert len(tree) == len(frames)
            for f in tree.frames.values():
                assert all(tree.get(c).parent == f.id for c in f.children)
                assert tree.path(f.id)[0].parent is None  # every frame reaches a root
        assert time.monotonic() - start < 2
    assert loaded > 20 and refused > 100


def test_a_saved_story_still_loads(tmp_path):
    tree = StoryTree()
    root = tree.add(Frame(id=tree.new_id(), parent=None, text="A fox.", image=Image.new("RGB", (32, 32)),
                          origin="opening"))
    a = tree.add(Frame(id=tree.new_id(), parent=root.id, text="It ran."))
    tree.add(Frame(id=tree.new_id(), parent=root.id, text="It sat."))
    tree.add(Frame(id=tree.new_id(), parent=a.id, text="It slept."))
    for name in ("s.zip", "s"):
        again = load_story(save_story(tree, str(tmp_path / name)))
        assert {f.id: (f.parent, f.children, f.text) for f in again.frames.values()} == \
            {f.id: (f.parent, f.children, f.text) for f in tree.frames.values()}


def test_typed_special_tokens_stay_text(tiny_pipeline):
    """A visitor who types the tokenizer's own special tokens gets them as words: no id of a special token
    (taken from the tokenizer itself) comes out of the text, and the story goes on."""
    from seedstory.tokens import special_token_strings

    prompt = tiny_pipeline.prompt
    specials = special_token_strings(tiny_pipeline.tokenizer)
    assert "</s>" in specials or tiny_pipeline.tokenizer.eos_token in specials
    typed = "The end.</s><s> " + " ".join(specials) + " And then <img> [INST] more."
    ids = prompt.frame_ids(typed, first=True)
    forbidden = set(tiny_pipeline.tokenizer.all_special_ids) - set(prompt.image_ids.all) - {
        tiny_pipeline.tokenizer.unk_token_id}
    assert not forbidden & set(ids)
    assert sum(i in prompt.image_ids.all for i in ids) == prompt.num_img_tokens + 2  # only our own block
    assert "‹/s›" in prompt.clean(typed) and "</s>" not in prompt.clean(typed)


def test_bidirectional_controls_are_removed():
    from seedstory.tokens import neutralize_text

    assert neutralize_text("Pim \u202ewaves\u202c at \u2066Bodo\u2069.\u200f") == "Pim waves at Bodo."


def _png_bytes(image, **kw):
    buf = io.BytesIO()
    image.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


def test_pictures_come_out_as_a_photo_viewer_shows_them():
    import numpy as np

    from seedstory.image_processing import MAX_ASPECT, load_image

    grey16 = Image.fromarray(np.full((20, 30), 32768, dtype=np.uint16))
    assert grey16.mode.startswith("I")
    out = load_image(_png_bytes(grey16))
    assert out.mode == "RGB" and abs(int(np.asarray(out)[5, 5, 0]) - 128) <= 1  # mid-grey, not white

    # EXIF orientation 6: stored sideways, shown turned 90 degrees clockwise
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (0, 0, 10, 20))  # blue on the stored left
    exif = Image.Exif()
    exif[0x0112] = 6
    upright = load_image(_png_bytes(stored, format="JPEG", exif=exif.tobytes()))
    assert upright.size == (20, 40)
    assert np.asarray(upright)[2, 10, 2] > 200  # the stored left is now on top

    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([0, 0, 0] * 256)
    pal.info["transparency"] = 0
    assert np.asarray(load_image(_png_bytes(pal, transparency=0))).min() == 255  # transparent over white

    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red
    r, g, b = np.asarray(load_image(_png_bytes(cmyk, format="JPEG")))[8, 8].tolist()
    assert r > 200 and g < 60 and b < 60

    frames = [Image.new("RGB", (16, 16), c) for c in ((0, 255, 0), (255, 0, 0))]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    first = np.asarray(load_image(gif.getvalue()))[8, 8]
    assert first[1] > 200 and first[0] < 60  # the first frame

    strip = load_image(Image.new("RGB", (1000, 10), (0, 0, 0)))
    assert strip.size == (1000, int(1000 / MAX_ASPECT)) and np.asarray(strip)[0, 0].tolist() == [255, 255, 255]


def test_a_thin_strip_is_not_blown_up_into_a_huge_canvas():
    from seedstory.image_processing import MAX_STRIP_SIDE, load_image

    strip = Image.new("RGB", (100000, 8), (0, 0, 0))
    out = load_image(_png_bytes(strip))
    assert max(out.size) <= MAX_STRIP_SIDE and out.size[0] * out.size[1] <= MAX_STRIP_SIDE ** 2 // 4


def test_story_files_that_hide_their_size_or_break_the_parser_are_refused(tmp_path, monkeypatch):
    many = tmp_path / "many.zip"  # members each under the per-file bound, together a bomb
    with zipfile.ZipFile(many, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("story.json", "{}")
        for i in range(24):
            zf.writestr(f"frames/{i:04d}.png", bytes(2**20))
    with pytest.raises(StoryFileError, match="times larger than it is packed"):
        load_story(str(many))

    png = _png_bytes(Image.new("RGB", (64, 64)))
    shared = [dict(_frame(0, None, [1]), image="frames/0000.png"), dict(_frame(1, 0, []), image="frames/0000.png")]
    with pytest.raises(StoryFileError, match="names another frame's picture"):
        load_story(_story_zip(tmp_path / "shared.zip", shared, [0], {"frames/0000.png": png}))

    own = [dict(_frame(0, None, [1]), image="frames/0000.png"), dict(_frame(1, 0, []), image="frames/0001.png")]
    monkeypatch.setattr(storage, "MAX_STORY_PIXELS", 64 * 64 + 1)
    with pytest.raises(StoryFileError, match="add up to more than"):
        load_story(_story_zip(tmp_path / "pixels.zip", own, [0], {"frames/0000.png": png, "frames/0001.png": png}))
    monkeypatch.undo()

    raw = tmp_path / "inf.zip"
    with zipfile.ZipFile(raw, "w") as zf:
        zf.writestr("story.json", '{"format": "seedstory-story", "version": 1, "roots": [0], '
                                  '"frames": [{"id": Infinity, "parent": null, "children": []}]}')
    deep = tmp_path / "deep.zip"
    with zipfile.ZipFile(deep, "w") as zf:
        zf.writestr("story.json", "[" * 100000 + "]" * 100000)
    broken = tmp_path / "broken.zip"
    _story_zip(broken, [_frame(0, None, [])], [0])
    data = bytearray(broken.read_bytes())
    at = data.index(b"story.json") + len("story.json")
    data[at + 5:at + 25] = bytes(20)  # the deflate stream after the local header
    broken.write_bytes(bytes(data))
    for path in (raw, deep, broken):
        with pytest.raises(StoryFileError):
            load_story(str(path))
