"""What the web app does, without a browser: ``seedstory.app_logic`` on the tiny preset, and ``app.build_app``."""
import dataclasses
import io
import re
import threading
import zipfile

import numpy as np
import pytest
from PIL import Image

from seedstory import app_logic as logic
from seedstory.holder import ModelHolder
from seedstory.image_processing import ImageError
from seedstory.storage import StoryFileError
from seedstory.story import StoryError

OPENING = "A fox with a red scarf sat under the old oak."
API_NAMES = ["start_story", "next_frame", "next_frames", "stop", "regenerate_frame", "edit_frame", "branch_story",
             "select_frame", "previous_version", "next_version", "delete_frame", "undo_delete", "export_story",
             "save_session", "load_session", "configure", "read_branch"]


@pytest.fixture(scope="module")
def holder():
    h = ModelHolder("tiny")
    h.pipeline()
    return h


@pytest.fixture(scope="module")
def ui():
    return logic.UISettings()


@pytest.fixture(scope="module")
def picture():
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8))


def three_frames(holder, ui, picture):
    s = logic.StorySession()
    logic.start_story(s, holder, picture, OPENING, ui)
    frames = list(logic.next_frames(s, holder, 2, ui))
    assert [f.id for f in frames] == [1, 2]
    return s


@pytest.fixture
def session(holder, ui, picture):
    """A story with an opening frame and two generated frames: #0 -> #1 -> #2, current #2."""
    return three_frames(holder, ui, picture)


@pytest.fixture(scope="module")
def shared(holder, ui, picture):
    """The same, shared by the tests that must not change it (failed actions, exports)."""
    return three_frames(holder, ui, picture)


def snapshot(s):
    """Everything a failed action must leave as it was."""
    t = s.tree
    if t is None:
        return None
    return (t.uid, t.current, list(t.roots), {i: (f.parent, f.text, list(f.children)) for i, f in t.frames.items()})


def parents(s):
    return {i: f.parent for i, f in s.tree.frames.items()}


# -- starting and stepping -----------------------------------------------------------------------------
def test_start_story_from_path_and_views(holder, ui, tmp_path):
    path = tmp_path / "opening.png"
    Image.fromarray(np.full((48, 64, 3), 200, np.uint8)).save(path)
    s = logic.StorySession()
    assert logic.storyboard(s) == [] and logic.frame_choices(s) == [] and "No story yet" in logic.tree_html(s)
    tree = logic.start_story(s, holder, str(path), "  Once upon a   time.  ", ui)
    assert s.tree is tree and len(tree) == 1 and tree.current == 0
    opening = tree.get(0)
    assert opening.text == "Once upon a time." and opening.origin == "opening" and opening.image.size == (64, 48)
    board = logic.storyboard(s)
    assert len(board) == 1 and board[0][1] == "▶ 0. Once upon a time."  # the selected frame is marked
    assert logic.frame_choices(s) == ["#0 · Once upon a time."]
    assert "**Frame #0**" in logic.frame_info(s) and "version 1 of 1" in logic.frame_info(s)


def test_next_frames_yields_one_by_one(holder, ui, picture):
    """With ``context_from: picture`` each text reads the picture before it: written and painted in turn."""
    ui = dataclasses.replace(ui, context_from="picture")
    s = logic.StorySession()
    logic.start_story(s, holder, picture, OPENING, ui)
    stages = []
    gen = logic.next_frames(s, holder, 3, ui, progress=lambda stage, f: stages.append((stage, f)))
    first = next(gen)
    # The first frame is in the story (and on the storyboard) before the second is started.
    assert first.id == 1 and len(s.tree) == 2 and s.tree.current == 1 and len(logic.storyboard(s)) == 2
    assert not any(stage.startswith("frame 2/3") for stage, _ in stages)
    rest = list(gen)
    assert [f.id for f in rest] == [2, 3]
    assert [f.id for f in s.tree.path()] == [0, 1, 2, 3]
    board = logic.storyboard(s)
    assert len(board) == 4 and [c.split(". ", 1)[0] for _, c in board] == ["0", "1", "2", "▶ 3"]
    assert all(isinstance(img, Image.Image) for img, _ in board)
    assert [s.split(":")[0] for s, _ in stages if s.endswith("writing text")] == ["frame 1/3", "frame 2/3", "frame 3/3"]
    assert any(stage.startswith("frame 3/3: painting image") for stage, _ in stages)


def test_next_frames_write_ahead_of_the_painter(holder, ui, picture):
    """With ``context_from: features`` a frame's text is shown as soon as it is written (a placeholder picture
    marked as being painted), and every frame gets its picture, in order."""
    s = logic.StorySession()
    logic.start_story(s, holder, picture, OPENING, ui)
    events, boards = [], []
    for frame in logic.next_frames(s, holder, 3, ui, as_written=True):
        events.append((frame.id, frame.image is not None))
        boards.append(logic.storyboard(s))
    assert [e for e in events if not e[1]] == [(1, False), (2, False), (3, False)]
    assert [e for e in events if e[1]] == [(1, True), (2, True), (3, True)]
    assert all(events.index((i, False)) < events.index((i, True)) for i in (1, 2, 3))
    first = boards[0]  # frame 1 written, nothing painted yet
    assert first[-1][1].endswith(logic.PAINTING_MARK) and first[-1][0].size == first[0][0].size
    assert all(f.image is not None for f in s.tree.frames.values())
    assert not any(c.endswith(logic.PAINTING_MARK) for _, c in logic.storyboard(s))
    # the same story as written and painted one frame at a time (same seeds, same settings)
    seq = logic.StorySession()
    logic.start_story(seq, holder, picture, OPENING, ui)
    for _ in range(3):
        next(logic.next_frames(seq, holder, 1, ui))
    assert [f.text for f in seq.tree.path()] == [f.text for f in s.tree.path()]
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(seq.tree.path(), s.tree.path()))


def test_stop_while_the_text_runs_ahead(holder, ui, picture):
    """Stop: the frame already written ahead of the painter is painted too, and nothing more is written."""
    s = logic.StorySession()
    logic.start_story(s, holder, picture, OPENING, ui)
    gen = logic.next_frames(s, holder, 5, ui)
    assert next(gen).id == 1
    logic.stop(s)
    assert [f.id for f in gen] == [2]
    assert len(s.tree) == 3 and all(f.image is not None for f in s.tree.frames.values())


def test_next_frames_progress_is_monotonic_within_0_1(holder, ui, picture):
    s = logic.StorySession()
    logic.start_story(s, holder, picture, OPENING, ui)
    fractions = []
    list(logic.next_frames(s, holder, 2, ui, progress=lambda stage, f: fractions.append(f)))
    assert fractions and fractions == sorted(fractions) and 0 <= fractions[0] and fractions[-1] <= 1


def test_stop_ends_after_the_frame_in_progress(holder, ui, session):
    """stop() from another thread while frame 2 of 5 is being made: frame 2 is finished and kept, no more follow."""
    in_frame_2, stopped = threading.Event(), threading.Event()

    def progress(stage, fraction):
        if stage.startswith("frame 2/5") and not in_frame_2.is_set():
            in_frame_2.set()
            assert stopped.wait(30), "stop() was not called"

    made, errors = [], []

    def run():
        try:
            for frame in logic.next_frames(session, holder, 5, ui, progress=progress):
                made.append(frame)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    worker = threading.Thread(target=run)
    worker.start()
    assert in_frame_2.wait(60), "frame 2 never started"
    logic.stop(session)
    stopped.set()
    worker.join(60)
    assert not worker.is_alive() and not errors
    assert [f.id for f in made] == [3, 4]  # the frame in progress when stop() came is finished and kept
    assert all(session.tree.get(f.id).image is not None for f in made)
    assert [f.id for f in session.tree.path()] == [0, 1, 2, 3, 4] and session.tree.current == 4
    # Stop does not stick: the next request runs in full.
    assert [f.id for f in logic.next_frames(session, holder, 1, ui)] == [5]


def test_stop_between_frames(holder, ui, session):
    ui = dataclasses.replace(ui, context_from="picture")  # one frame at a time: nothing written ahead
    gen = logic.next_frames(session, holder, 4, ui)
    assert next(gen).id == 3
    logic.stop(session)
    assert list(gen) == []
    assert len(session.tree) == 4 and session.tree.current == 3


@pytest.mark.parametrize("n", [0, -1, logic.MAX_FRAMES_PER_CLICK + 1])
def test_next_frames_count_is_bounded(holder, ui, session, n):
    before = snapshot(session)
    with pytest.raises(StoryError, match=f"between 1 and {logic.MAX_FRAMES_PER_CLICK} frames"):
        list(logic.next_frames(session, holder, n, ui))
    assert snapshot(session) == before


# -- regenerate, edit, branch, select, versions, delete -----------------------------------------------
def test_regenerate_replaces_frame_by_a_sibling(holder, ui, session):
    f = logic.regenerate(session, holder, "#1 · whatever the label says", "both", 7, ui)
    assert f.id == 3 and f.parent == 0 and f.origin == "regenerated" and f.seed == 7
    assert session.tree.current == 3 and session.tree.siblings(3) == [1, 3]
    # The old continuation (#2) stays in the tree but is no longer on the storyboard.
    assert 2 in session.tree and [c for _, c in logic.storyboard(session)][0].startswith("0. ")
    assert len(logic.storyboard(session)) == 2
    assert "version 2 of 2" in logic.frame_info(session)
    # Image only: same text and features, new picture.
    g = logic.regenerate(session, holder, 3, "image", 11, ui)
    old = session.tree.get(3)
    assert g.parent == 0 and g.text == old.text and g.seed == 11 and g.features is old.features
    assert np.asarray(g.image).tobytes() != np.asarray(old.image).tobytes()
    # Text only keeps the painting seed.
    h = logic.regenerate(session, holder, 3, "text", None, ui)
    assert h.parent == 0 and h.seed == old.seed
    assert session.tree.siblings(1) == [1, 3, 4, 5]


def test_regenerate_same_seed_is_reproducible(holder, ui, session):
    a = logic.regenerate(session, holder, 2, "both", 1234, ui)
    b = logic.regenerate(session, holder, 2, "both", 1234, ui)
    assert a.id != b.id and a.text == b.text
    assert np.asarray(a.image).tobytes() == np.asarray(b.image).tobytes()


def test_edit_and_branch(holder, ui, session):
    e = logic.edit(session, holder, "#2", "The fox found a brass key.", ui)
    assert e.parent == 1 and e.text == "The fox found a brass key." and e.origin == "edited"
    assert session.tree.current == e.id and session.tree.siblings(2) == [2, e.id]
    assert logic.storyboard(session)[-1][1] == "▶ 2. The fox found a brass key."
    # Editing the opening frame makes a second opening with the same picture.
    o = logic.edit(session, holder, 0, "A fox without a scarf.", ui)
    assert o.parent is None and session.tree.roots == [0, o.id] and o.image is session.tree.get(0).image
    assert len(logic.storyboard(session)) == 1
    # Branch with the person's text, then one written by the model.
    b1 = logic.branch(session, holder, "#0", "Meanwhile, an owl woke up.", ui)
    assert b1.parent == 0 and b1.text == "Meanwhile, an owl woke up." and b1.origin == "branch"
    b2 = logic.branch(session, holder, 0, "   ", ui)  # empty: the model writes
    assert b2.parent == 0 and b2.origin == "branch" and b2.image is not None
    assert session.tree.get(0).children == [1, b1.id, b2.id] and session.tree.current == b2.id
    assert [f.id for f in session.tree.path()] == [0, b2.id]


def test_select_and_switch_versions(holder, ui, session):
    r = logic.regenerate(session, holder, 1, "both", 5, ui)  # siblings [1, r]
    assert session.tree.current == r.id
    f = logic.switch_sibling(session, -1)
    assert f.id == 1 and session.tree.current == 1
    # The storyboard follows the newest continuation of the selected version: 0 -> 1 -> 2.
    assert len(logic.storyboard(session)) == 3 and "version 1 of 2" in logic.frame_info(session)
    assert logic.switch_sibling(session, 1).id == r.id
    assert logic.switch_sibling(session, 1).id == 1  # wraps around
    assert logic.select(session, "#0 · A fox").id == 0 and session.tree.current == 0
    assert [f.id for f in session.tree.path(session.tree.leaf(0))] == [0, r.id]
    assert logic.select_on_storyboard(session, 1).id == r.id
    assert [c.startswith(logic.SELECTED_MARK) for _, c in logic.storyboard(session)] == [False, True]
    assert [c.split(":")[0] for _, c in logic.versions(session)] == ["version 1 of 2", "version 2 of 2 (shown)"]
    assert logic.select_version(session, 0).id == 1 and "(shown)" in logic.versions(session)[0][1]
    with pytest.raises(StoryError):
        logic.select_version(session, 5)
    page = logic.reading_html(session)
    assert page.count("<figure>") == 3 and "image-rendering: pixelated" in page and "◀ selected" in page
    # the pictures are encoded once per session, shared with the autosaves
    branch = session.tree.path(session.tree.leaf(session.tree.current))
    assert {f.id for f in branch} <= set(session.saved_pngs) and session.saved_pngs_of == session.tree.uid
    assert logic.frame_choices(session) == [logic.frame_label(session.tree.frames[i]) for i in (0, 1, 2, r.id)]
    tree = logic.tree_html(session)
    assert tree.count("data-frame=") == 4 and f"class='node on-path current' data-frame='{session.tree.current}'" in tree


def test_delete_subtree(holder, ui, session):
    logic.branch(session, holder, 0, "Another way.", ui)  # #3 under #0
    removed_from = session.tree.get(1)
    logic.delete(session, holder, "#1", ui)
    assert set(session.tree.frames) == {0, 3} and session.tree.get(0).children == [3]
    assert removed_from.id not in session.tree
    logic.delete(session, holder, 3, ui)
    assert session.tree.current == 0 and len(logic.storyboard(session)) == 1
    # The frame ids stay unique after deletes.
    assert next(logic.next_frames(session, holder, 1, ui)).id == 4


# -- exports, save and load ------------------------------------------------------------------------------
MAGIC = {"comic": b"\x89PNG", "pdf": b"%PDF", "gif": b"GIF8", "zip": b"PK\x03\x04", "html": b"<"}


@pytest.mark.parametrize("fmt", sorted(MAGIC))
def test_export_formats(shared, fmt):
    path = logic.export(shared, fmt)
    assert path.startswith(shared.workdir)
    with open(path, "rb") as f:
        data = f.read()
    assert data.lstrip()[: len(MAGIC[fmt])].lower() == MAGIC[fmt].lower(), data[:16]
    if fmt == "html":
        assert OPENING.encode() in data
    if fmt == "pdf":
        assert len(re.findall(rb"/Type\s*/Page\b(?!s)", data)) == 3  # one page per frame
    if fmt == "gif":
        assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3


def test_save_and_load_round_trip(holder, ui, session):
    logic.regenerate(session, holder, 2, "both", 3, ui)
    logic.select(session, 1)
    path = logic.save(session)
    assert zipfile.is_zipfile(path)
    other = logic.StorySession()
    loaded = logic.load(other, path)
    assert other.tree is loaded and loaded.uid != session.tree.uid
    assert parents(other) == parents(session) and loaded.current == 1
    assert [f.text for f in loaded.path()] == [f.text for f in session.tree.path()]
    assert len(logic.storyboard(other)) == len(logic.storyboard(session)) == 3
    # A loaded story continues like the original.
    assert next(logic.next_frames(other, holder, 1, ui)).parent == 3


# -- mistakes: clear errors, the story stays as it was ---------------------------------------------------
def test_bomb_png_header_is_well_formed(png_bomb):
    for mode in ("RGB", "L"):
        with Image.open(io.BytesIO(png_bomb(100, 120, mode))) as im:  # PIL reads the (patched) header fine
            assert im.size == (100, 120) and im.mode == mode


@pytest.mark.parametrize("image, error, message", [
    (None, StoryError, "upload an opening picture"),
    (b"this is not a picture at all", ImageError, "not a readable image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, ImageError, "not a readable image"),
    ("bomb:100000x100000", ImageError, "decompression bomb|pixels"),
    ("bomb:7000x7000", ImageError, "7000x7000 pixels; at most 40,000,000 pixels are accepted"),
    ("/no/such/picture.png", ImageError, "not found"),
    (np.zeros((4, 4, 3), np.uint8), ImageError, "at least 8"),
])
def test_bad_picture_is_refused(holder, ui, shared, tmp_path, png_bomb, image, error, message):
    if isinstance(image, str) and image.startswith("bomb:"):
        w, h = map(int, image[5:].split("x"))
        path = tmp_path / "bomb.png"
        path.write_bytes(png_bomb(w, h))
        assert path.stat().st_size < 200
        image = str(path)
    elif isinstance(image, bytes):
        path = tmp_path / "upload.png"
        path.write_bytes(image)
        image = str(path)
    before = snapshot(shared)
    with pytest.raises(error, match=message):
        logic.start_story(shared, holder, image, "A new story.", ui)
    assert snapshot(shared) == before


@pytest.mark.parametrize("text, message", [
    ("", "the text is empty"),
    ("   \n\t ", "the text is empty"),
    (None, "the text is empty"),
    ("x" * 2001, "2001 characters long; the limit is 2000"),
])
def test_bad_opening_text_is_refused(holder, ui, shared, picture, text, message):
    before = snapshot(shared)
    with pytest.raises(StoryError, match=message):
        logic.start_story(shared, holder, picture, text, ui)
    assert snapshot(shared) == before


def test_bad_edits_and_branches_are_refused(holder, ui, shared):
    before = snapshot(shared)
    with pytest.raises(StoryError, match="the text is empty"):
        logic.edit(shared, holder, 2, "  ", ui)
    with pytest.raises(StoryError, match="limit is 2000"):
        logic.edit(shared, holder, 2, "y" * 5000, ui)
    with pytest.raises(StoryError, match="limit is 2000"):
        logic.branch(shared, holder, 1, "z" * 2001, ui)
    with pytest.raises(StoryError, match="opening frame is your own picture"):
        logic.regenerate(shared, holder, 0, "both", None, ui)
    with pytest.raises(StoryError, match="part must be"):
        logic.regenerate(shared, holder, 1, "sound only", None, ui)
    with pytest.raises(StoryError, match="no frame 99"):
        logic.select(shared, "#99 · gone")
    with pytest.raises(StoryError, match="not a frame"):
        logic.edit(shared, holder, "frame two", "Text.", ui)
    with pytest.raises(StoryError, match="no such frame on the storyboard"):
        logic.select_on_storyboard(shared, 3)
    with pytest.raises(StoryError, match="only opening frame"):
        logic.delete(shared, holder, 0, ui)
    with pytest.raises(StoryError, match="unknown format"):
        logic.export(shared, "docx")
    assert snapshot(shared) == before


def test_frame_cap(holder, ui, session, monkeypatch):
    engine = logic.engine_for(holder, ui)
    monkeypatch.setattr(engine, "max_frames", 3)
    before = snapshot(session)  # 0 -> 1 -> 2: the path is full
    with pytest.raises(StoryError, match="limit of 3 frames on one path"):
        list(logic.next_frames(session, holder, 1, ui))
    with pytest.raises(StoryError, match="limit of 3 frames"):
        logic.branch(session, holder, 2, "One more.", ui)
    assert snapshot(session) == before
    # Earlier frames still have room.
    assert logic.branch(session, holder, 1, "Another ending.", ui).parent == 1


def test_actions_need_a_story(holder, ui):
    s = logic.StorySession()
    actions = [
        lambda: list(logic.next_frames(s, holder, 1, ui)),
        lambda: logic.regenerate(s, holder, None, "both", None, ui),
        lambda: logic.edit(s, holder, None, "Text.", ui),
        lambda: logic.branch(s, holder, None, None, ui),
        lambda: logic.select(s, 0),
        lambda: logic.switch_sibling(s, 1),
        lambda: logic.delete(s, holder, 0, ui),
        lambda: logic.export(s, "pdf"),
        lambda: logic.save(s),
    ]
    for action in actions:
        with pytest.raises(StoryError, match="start a story first"):
            action()
    assert s.tree is None


def test_loading_a_bad_file_changes_nothing(shared, tmp_path):
    before = snapshot(shared)
    foreign = tmp_path / "holiday.zip"
    with zipfile.ZipFile(foreign, "w") as zf:
        zf.writestr("photo.txt", "not a story")
    with pytest.raises(StoryFileError, match="no story.json: not a saved seedstory story"):
        logic.load(shared, str(foreign))
    fake = tmp_path / "other-app.zip"
    with zipfile.ZipFile(fake, "w") as zf:
        zf.writestr("story.json", '{"format": "something-else"}')
    with pytest.raises(StoryFileError, match="not a seedstory story file"):
        logic.load(shared, str(fake))
    garbage = tmp_path / "garbage.zip"
    garbage.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(StoryFileError, match="neither a story folder nor a story .zip"):
        logic.load(shared, str(garbage))
    with pytest.raises(StoryError, match="choose a saved story"):
        logic.load(shared, None)
    # A real save with one picture damaged.
    good = logic.save(shared)
    damaged = tmp_path / "damaged.zip"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(damaged, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, b"broken" if item.filename.endswith(".png") else data)
    with pytest.raises(StoryFileError, match="not a readable image"):
        logic.load(shared, str(damaged))
    assert snapshot(shared) == before


def test_user_errors_are_value_errors():
    """app.py shows ValueError/OSError subclasses as a message in the UI (gr.Error), not a crash."""
    import app

    for error in (StoryError, ImageError, StoryFileError):
        assert issubclass(error, app.USER_ERRORS)


def test_text_is_escaped_in_the_tree_view(holder, ui, picture):
    s = logic.StorySession()
    logic.start_story(s, holder, picture, "<script>alert('x')</script> & <b>bold</b>", ui)
    html = logic.tree_html(s)
    assert "<script>" not in html and "&lt;script&gt;" in html and "&lt;b&gt;" in html


def test_sessions_are_independent(holder, ui, picture):
    a, b = logic.StorySession(), logic.StorySession()
    logic.start_story(a, holder, picture, "Story A begins.", ui)
    logic.start_story(b, holder, picture, "Story B begins.", ui)
    list(logic.next_frames(a, holder, 2, ui))
    assert len(a.tree) == 3 and len(b.tree) == 1 and a.workdir != b.workdir
    assert logic.frame_choices(b) == ["#0 · Story B begins."]
    logic.stop(a)  # stopping one session does not stop another
    assert len(list(logic.next_frames(b, holder, 1, ui))) == 1


# -- the Gradio app ---------------------------------------------------------------------------------------
def test_build_app_lists_the_api(holder):
    import gradio as gr

    import app

    assert "/load_model" in app.build_app(holder, allow_model_switch=True).get_api_info()["named_endpoints"]
    demo = app.build_app(holder)  # a public server: visitors cannot switch the model everyone uses
    assert isinstance(demo, gr.Blocks)
    assert "/load_model" not in demo.get_api_info()["named_endpoints"]
    named = demo.get_api_info()["named_endpoints"]
    assert set(f"/{name}" for name in API_NAMES) <= set(named), sorted(named)
    public = {d["api_name"] for d in demo.config["dependencies"] if d.get("api_visibility") == "public"}
    assert public == set(API_NAMES)

    def params(name):
        return [p["parameter_name"] for p in named[f"/{name}"]["parameters"]]

    assert params("start_story") == ["image", "text"]
    assert params("next_frame") == []
    assert params("next_frames") == ["n"]
    assert params("regenerate_frame") == ["frame", "part", "seed"]
    assert params("edit_frame") == ["frame", "text"]
    assert params("branch_story") == ["frame", "text"]
    assert params("select_frame") == ["frame"]
    assert params("delete_frame") == ["frame"]
    assert params("export_story") == ["fmt"]
    assert params("load_session") == ["file"]
    labels = [r["label"] for r in named["/start_story"]["returns"]]
    assert labels[:3] == ["Storyboard (the current branch)", "Selected frame", "Frame text (edit, then apply)"]
    assert labels[3:] == ["Frame details", "Frame", "Story tree", "Status", "Versions of this frame (click one to show it)"]
    # the session state is not part of the API, and every output has a name



def test_a_preset_that_fails_to_load_shows_the_doctor_report(tmp_path):
    """Loading a preset whose weights are missing gives the doctor's report naming the missing files, not a
    crash; switching back to a working preset works and the report gives way to what is loaded."""
    holder = ModelHolder("tiny")
    report = logic.load_preset(holder, "seed-story-george", overrides=[f"release.root={tmp_path / 'pretrained'}"])
    assert report.startswith("**Loading `seed-story-george` failed:**")
    assert "pytorch_model.bin" in report and "qwen_vit_G" in report
    assert not holder.loaded and logic.model_report(holder).startswith(report.split("\n")[0])
    shown = logic.load_preset(holder, "tiny")
    assert holder.loaded and "failed" not in shown and shown == holder.describe()


def test_text_decoding_defaults_to_the_presets_own():
    from seedstory.config import GenerationSettings

    base = GenerationSettings().replace(do_sample=True, temperature=0.5, top_p=0.8)
    kept = logic.UISettings().generation(base)
    assert (kept.do_sample, kept.temperature, kept.top_p) == (True, 0.5, 0.8)
    greedy = logic.UISettings(decoding="greedy").generation(base)
    assert greedy.do_sample is False
    sampled = logic.UISettings(decoding="sampling", temperature=1.3, top_p=0.5).generation(base.replace(do_sample=False))
    assert (sampled.do_sample, sampled.temperature, sampled.top_p) == (True, 1.3, 0.5)
    with pytest.raises(ValueError, match="unknown text decoding"):
        logic.UISettings(decoding="beam").generation(base)
    # Each field: (preset's value, [(what the widget holds, the setting it gives)], a refused value, its message).
    # Empty keeps the preset's, and so does 0; -1 turns the caption guard off.
    fields = {
        "repetition_penalty": (1.3, [(None, 1.3), (0, 1.3), (1.0, 1.0)], 0.5, "repetition_penalty must be between 1"),
        # a browser sends the empty field as 0: that must keep the preset's guard (it used to turn it off)
        "no_repeat_captions": (4, [(None, 4), (0, 4), (-1, 0), (2.0, 2)], -2, "no_repeat_captions must be between 0"),
        "repetition_scope": ("word_starts", [(None, "word_starts"), ("", "word_starts"), ("tokens", "tokens")],
                             "letters", "repetition_scope must be one of tokens, words, word_starts"),
        "candidates": (3, [(None, 3), (0, 3), (1.0, 1)], 17, "candidates must be between 1 .off. and 16"),
        "caption_candidates": (4, [(None, 4), (0, 4), (2.0, 2)], 17, "caption_candidates must be between 1 .off. and 16"),
        "context_from": ("picture", [(None, "picture"), ("", "picture"), ("features", "features")], "pixels",
                         "context_from must be one of features, picture"),
    }
    for name, (preset, cases, bad, message) in fields.items():
        base = base.replace(**{name: preset})
        for held, want in cases:
            assert getattr(logic.UISettings(**{name: held}).generation(base), name) == want, (name, held)
        with pytest.raises(Exception, match=message):
            logic.UISettings(**{name: bad}).generation(base)
    seeded = base.replace(seed=42)
    assert [logic.UISettings(seed=held).generation(seeded).seed for held in (None, 0, 7)] == [42, 42, 7]


def test_a_story_is_never_continued_by_another_model(holder, ui, picture, tmp_path):
    """A story's token ids and features belong to the model that made it: another model refuses it with a clear
    message (it used to fail deep inside with "260 is not in list"), and a loaded file from another model leaves
    the session's story as it was."""
    from seedstory.storage import load_story, save_story

    session = logic.StorySession()
    tree = logic.start_story(session, holder, picture, OPENING, ui)
    assert tree.model == holder.pipeline().name == "tiny"
    path = save_story(tree, str(tmp_path / "story.zip"))
    assert load_story(path).model == "tiny"

    other = load_story(path)
    other.model = "seed-story-george"
    save_story(other, str(tmp_path / "other.zip"))
    with pytest.raises(StoryError, match="made with the 'seed-story-george' model"):
        logic.load(session, str(tmp_path / "other.zip"), holder)
    assert session.tree is tree  # nothing changed
    with pytest.raises(StoryError, match="made with the 'seed-story-george' model"):
        logic.engine_for(holder, ui).step(other)
    assert len(list(logic.next_frames(session, holder, 1, ui))) == 1  # the visitor's own story goes on


def test_a_closed_session_leaves_nothing_behind(holder, ui, picture):
    import os

    session = logic.StorySession()
    logic.start_story(session, holder, picture, OPENING, ui)
    list(logic.next_frames(session, holder, 1, ui))
    logic.save(session)
    uid = session.tree.uid
    store = holder._store
    assert os.listdir(session.workdir) and any(k[0] == uid for k in list(store._items))
    logic.close_session(session, holder)
    assert not os.path.exists(session.workdir)
    assert not any(k[0] == uid for k in list(store._items))
    logic.close_session(None, holder)  # a visitor who never started anything


def test_a_delete_can_be_undone_once(holder, ui, picture):
    session = logic.StorySession()
    logic.start_story(session, holder, picture, OPENING, ui)
    frames = list(logic.next_frames(session, holder, 3, ui))
    other = logic.branch(session, holder, f"#{frames[0].id}", "Then it rained.", ui)
    tree = session.tree
    before = {f.id: (f.parent, list(f.children), f.text) for f in tree.frames.values()}
    logic.select(session, f"#{frames[1].id}")
    logic.delete(session, holder, f"#{frames[1].id}", ui)
    assert frames[1].id not in tree and frames[2].id not in tree and other.id in tree
    top = logic.undo_delete(session)
    assert top.id == frames[1].id and tree.current == frames[1].id
    assert {f.id: (f.parent, list(f.children), f.text) for f in tree.frames.values()} == before
    with pytest.raises(StoryError, match="no delete to undo"):
        logic.undo_delete(session)
    assert len(list(logic.next_frames(session, holder, 1, ui))) == 1  # the story goes on from the restored frame


def test_a_story_survives_a_page_reload(holder, ui, picture, tmp_path, monkeypatch):
    """Each browser keeps a random key; the story is autosaved under it and a new session (the reloaded page)
    with the same key gets it back. A malformed key gets a fresh one; another model's story is not resumed."""
    import os
    import time

    monkeypatch.setenv("SEEDSTORY_AUTOSAVE_DIR", str(tmp_path / "autosave"))
    first = logic.StorySession()
    key, said = logic.resume(first, holder, None)
    assert said == ""
    assert re.fullmatch(r"[0-9a-f]{32}", key) and first.tree is None
    logic.start_story(first, holder, picture, OPENING, ui)
    list(logic.next_frames(first, holder, 2, ui))
    logic.autosave(first)

    again = logic.StorySession()  # the page is reloaded: a new session, the same browser key
    assert logic.resume(again, holder, key) == (key, "Your story is back where you left it.")
    assert [f.text for f in again.tree.path()] == [f.text for f in first.tree.path()]
    assert len(list(logic.next_frames(again, holder, 1, ui))) == 1

    for bad in ("../../etc/passwd", "A" * 32, 42, ""):
        stranger = logic.StorySession()
        assert logic.resume(stranger, holder, bad)[0] != key and stranger.tree is None

    first.tree.model = "another-model"
    logic.autosave(first)
    elsewhere = logic.StorySession()
    key_back, said = logic.resume(elsewhere, holder, key)
    assert key_back == key and elsewhere.tree is None and "could not be brought back" in said

    old = tmp_path / "autosave" / f"{key}.zip"
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    assert logic.prune_autosaves() == 1 and not old.exists()


def test_one_generation_per_visitor_and_a_bounded_story(holder, ui, picture, monkeypatch):
    session = logic.StorySession()
    logic.start_story(session, holder, picture, OPENING, ui)
    with logic.one_at_a_time(session):  # a frame is being written (a double click, a second request)
        with pytest.raises(StoryError, match="already being written"):
            list(logic.next_frames(session, holder, 1, ui))
        with pytest.raises(StoryError, match="already being written"):
            logic.branch(session, holder, "#0", "Then it snowed.", ui)
    assert len(list(logic.next_frames(session, holder, 1, ui))) == 1  # free again
    other = logic.StorySession()  # another visitor is never held up by this one's lock
    with logic.one_at_a_time(session):
        logic.start_story(other, holder, picture, OPENING, ui)
    monkeypatch.setattr(logic, "MAX_STORY_FRAMES", len(session.tree))
    with pytest.raises(StoryError, match="the most one story may hold"):
        list(logic.next_frames(session, holder, 1, ui))
    logic.delete(session, holder, f"#{session.tree.current}", ui)
    assert len(list(logic.next_frames(session, holder, 1, ui))) == 1


def test_a_loaded_story_must_hold_this_models_tokens_and_features(holder, ui, picture, tmp_path):
    """A file's token ids reach the model as they are: ids out of the vocabulary, image ids outside the image block
    or features of another shape are refused at load (and at resume), and the current story stays."""
    import torch

    from seedstory.storage import load_story, save_story

    session = logic.StorySession()
    logic.start_story(session, holder, picture, OPENING, ui)
    list(logic.next_frames(session, holder, 1, ui))
    good = save_story(session.tree, str(tmp_path / "good.zip"))
    boi = holder.pipeline().prompt.image_ids.boi
    for name, spoil, message in [
        ("huge", lambda f: f.token_ids.__setitem__(0, 10**12), "tokens this model cannot read"),
        ("negative", lambda f: f.token_ids.__setitem__(0, -5), "tokens this model cannot read"),
        ("image-id", lambda f: f.token_ids.__setitem__(0, boi), "tokens this model cannot read"),
        ("no-block", lambda f: f.token_ids.pop(), "tokens this model cannot read"),
        ("shape", lambda f: setattr(f, "features", torch.zeros(1, 3, 5)), "features of another shape"),
    ]:
        tree = load_story(good)
        spoil(tree.get(1))
        save_story(tree, str(tmp_path / f"{name}.zip"))
        with pytest.raises(StoryError, match=message):
            logic.load(session, str(tmp_path / f"{name}.zip"), holder)
        assert len(session.tree) == 2
    assert len(logic.load(session, good, holder)) == 2


def test_delete_and_undo_wait_for_the_frame_in_progress_and_keep_the_bound(holder, ui, picture, monkeypatch):
    session = logic.StorySession()
    logic.start_story(session, holder, picture, OPENING, ui)
    frames = list(logic.next_frames(session, holder, 2, ui))
    with logic.one_at_a_time(session):
        with pytest.raises(StoryError, match="already being written"):
            logic.delete(session, holder, f"#{frames[0].id}", ui)
    logic.delete(session, holder, f"#{frames[0].id}", ui)
    list(logic.next_frames(session, holder, 1, ui))
    monkeypatch.setattr(logic, "MAX_STORY_FRAMES", len(session.tree) + 1)
    with pytest.raises(StoryError, match="longer than"):
        logic.undo_delete(session)


def test_autosaves_stay_bounded_and_browser_keys_outlive_a_restart(tmp_path, monkeypatch):
    import os
    import time

    monkeypatch.setenv("SEEDSTORY_AUTOSAVE_DIR", str(tmp_path))
    monkeypatch.delenv("SEEDSTORY_BROWSER_SECRET", raising=False)
    for i in range(5):
        path = tmp_path / f"{i:032x}.zip"
        path.write_bytes(bytes(1000))
        os.utime(path, (time.time() - 100 + i,) * 2)
    assert logic.prune_autosaves(max_bytes=2500) == 3  # the oldest go first
    assert sorted(p.name for p in tmp_path.glob("*.zip")) == [f"{3:032x}.zip", f"{4:032x}.zip"]
    secret = logic.browser_secret()
    assert len(secret) == 64 and logic.browser_secret() == secret  # the same after a restart
    assert oct((tmp_path / ".browser-secret").stat().st_mode & 0o777) == "0o600"
    monkeypatch.setenv("SEEDSTORY_BROWSER_SECRET", "from-the-operator")
    assert logic.browser_secret() == "from-the-operator"


def _chain(tree, parent, n, text="A step"):
    from seedstory.story import Frame

    for _ in range(n):
        f = tree.add(Frame(id=tree.new_id(), parent=parent, text=f"{text} {tree.new_id()} of the story.", image=None,
                           features=None, token_ids=[], seed=0, settings={}, origin="generated"), select=True)
        parent = f.id
    return parent


def test_the_tree_outline_stays_readable_at_50_deep_and_10_wide():
    """A straight run is one row whatever its length; branches are rows one level in, the indent capped; every
    frame is a button with its id, its step and its text on hover; the current path and frame are marked."""
    import re

    from seedstory.story import StoryTree

    tree = StoryTree()
    s = logic.StorySession.__new__(logic.StorySession)
    s.tree = tree
    leaf = _chain(tree, None, 50)                     # the opening and 49 more: one run
    assert len(logic.tree_runs(tree)) == 1 and len(logic.tree_runs(tree)[0]["frames"]) == 50
    fork = tree.path(leaf)[10].id
    ends = [_chain(tree, fork, 3, f"Branch {b}") for b in range(8)]
    deep = fork                                       # with the chain below, frame 10 has 10 continuations
    for level in range(12):                           # a branch of a branch of ... 13 levels down
        deep = _chain(tree, deep, 2, f"Deep {level}")
        _chain(tree, tree.get(deep).parent, 1, f"Other {level}")
    tree.select(ends[4])
    runs = logic.tree_runs(tree)
    assert [r["level"] for r in runs[:3]] == [0, 1, 1] and len(runs) == 1 + 10 + 12 * 2
    assert max(r["level"] for r in runs) == 13
    html = logic.tree_html(s)
    ids = [int(i) for i in re.findall(r"data-frame='(\d+)'", html)]
    assert sorted(ids) == sorted(tree.frames)        # every frame once, clickable
    margins = [float(m) for m in re.findall(r"margin-left:([\d.]+)em", html)]
    assert max(margins) == pytest.approx(logic.TREE_INDENT_LEVELS * 1.1)  # capped, never smaller type
    assert "font-size" not in html                   # one size for the whole outline (TREE_CSS)
    path = [f.id for f in tree.path(ends[4])]
    marked = re.findall(r"class='node on-path[^']*' data-frame='(\d+)'", html)
    assert [int(i) for i in marked] == path
    assert f"class='node on-path current' data-frame='{ends[4]}'" in html
    assert f"data-frame='{fork}' data-branches='10'" in html
    assert f"title='#0 · step 0 · generated: {tree.get(0).text}'" in html
