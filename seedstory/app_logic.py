"""Everything the Gradio app does, without Gradio: one ``StorySession`` per browser session, plus
view functions that turn a story into what the widgets show. ``app.py`` only wires widgets to these.
"""
from __future__ import annotations

import contextlib
import html
import os
import re
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

from PIL import Image

from .atomic import write_text
from .config import GenerationSettings
from .doctor import report_for_preset
from .engine import MODES, StoryEngine
from .export import FORMATS, export_story, figures_html
from .holder import ModelHolder
from .image_processing import load_image
from .models.detokenizer import SCHEDULERS as _SCHEDULERS
from .storage import StoryFileError, load_story, save_story
from .story import Detached, Frame, StoryError, StoryTree

MAX_FRAMES_PER_CLICK = 25
MAX_STORY_FRAMES = 500  # frames in one visitor's story tree, all branches together (each holds a picture)
SCHEDULERS = list(_SCHEDULERS)  # the de-tokenizer's samplers, by the names the settings take
CONTEXT_MODES = sorted(MODES, key=lambda mode: mode != "window")  # the engine's modes, the app's default first
# What "Regenerate" makes: (what the radio says, the value the app and its API take).
PART_CHOICES = [("new text and picture", "both"), ("new text (its picture repainted with the frame's seed)", "text"),
                ("new picture (same text)", "image")]


DECODINGS = ("preset", "greedy", "sampling")  # the preset's own decoding, or one chosen in the panel


@dataclass
class UISettings:
    """The settings panel, as plain values (what the widgets hold)."""

    decoding: str = "preset"  # preset (the preset's own decoding) | greedy | sampling
    temperature: float = 0.7
    top_p: float = 0.9
    steps: Optional[int] = None
    guidance: Optional[float] = None
    scheduler: Optional[str] = None
    mode: str = "window"  # window | sink | recompute
    window: Optional[int] = None
    seed: Optional[int] = None  # None/0 = the preset's
    repetition_penalty: Optional[float] = None  # 1 = off; None/0 = the preset's
    no_repeat_captions: Optional[int] = None  # -1 = off; None/empty/0 = the preset's
    repetition_scope: Optional[str] = None  # tokens | words | word_starts; None/empty = the preset's
    caption_candidates: Optional[int] = None  # captions drawn per frame, the likeliest new one kept; None/0 = the preset's
    candidates: Optional[int] = None  # pictures painted per frame, the closest kept; None/0 = the preset's
    context_from: Optional[str] = None  # features | picture; None/empty = the preset's

    def _no_repeat(self) -> Optional[int]:
        # A browser sends an empty number field as 0, so 0 must mean "the preset's", like every other field here;
        # -1 turns the guard off.
        n = int(self.no_repeat_captions) if self.no_repeat_captions not in (None, "") else 0
        return None if n == 0 else 0 if n == -1 else n

    def generation(self, base: GenerationSettings) -> GenerationSettings:
        decoding = {}
        if self.decoding in DECODINGS[1:]:
            decoding = dict(do_sample=self.decoding == "sampling", temperature=self.temperature, top_p=self.top_p)
        elif self.decoding != "preset":
            raise ValueError(f"unknown text decoding {self.decoding!r}: {', '.join(DECODINGS)}")
        return base.replace(
            **decoding,
            num_inference_steps=int(self.steps) if self.steps else None,
            guidance_scale=float(self.guidance) if self.guidance else None,
            scheduler=self.scheduler or None, window=int(self.window) if self.window else None,
            seed=int(self.seed) if self.seed else None,
            repetition_penalty=float(self.repetition_penalty) if self.repetition_penalty else None,
            no_repeat_captions=self._no_repeat(),
            repetition_scope=self.repetition_scope or None,
            caption_candidates=int(self.caption_candidates) if self.caption_candidates else None,
            candidates=int(self.candidates) if self.candidates else None,
            context_from=self.context_from or None,
        )


@dataclass
class StorySession:
    """One person's stories. Kept per browser session; the models live in the shared holder."""

    tree: Optional[StoryTree] = None
    workdir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="seedstory-session-"))
    stop_event: threading.Event = field(default_factory=threading.Event, repr=False)
    deleted: Optional[Detached] = field(default=None, repr=False)  # the last delete, until undone or another
    browser_key: Optional[str] = None  # the browser's secret key for its autosave (``resume``)
    writing: threading.Lock = field(default_factory=threading.Lock, repr=False)  # one generation at a time
    saved_pngs: dict = field(default_factory=dict, repr=False)  # frame id -> PNG, already encoded (``_png_cache``)
    saved_pngs_of: Optional[str] = None  # the story (uid) those pictures belong to

    def require_tree(self) -> StoryTree:
        if self.tree is None or not self.tree.frames:
            raise StoryError("start a story first: upload a picture, type the opening text, press Start")
        return self.tree

    def frame_id(self, value) -> int:
        """Accepts an int id or a selector label like "#3 · text"."""
        tree = self.require_tree()
        if value is None or value == "":
            return tree.current
        if isinstance(value, str):
            value = value.lstrip("#").split(" ", 1)[0]
        try:
            fid = int(value)
        except (TypeError, ValueError):
            raise StoryError(f"not a frame: {value!r}") from None
        tree.get(fid)
        return fid


# -- views ------------------------------------------------------------------------------------------
def frame_label(frame: Frame, limit: int = 48) -> str:
    text = frame.text if len(frame.text) <= limit else frame.text[: limit - 1] + "…"
    return f"#{frame.id} · {text}"


SELECTED_MARK = "▶ "  # before the selected frame's caption on the storyboard


def storyboard(session: StorySession) -> list[tuple[Image.Image, str]]:
    """The branch through the current frame, root to leaf: (picture, "i. its full text") per frame, the selected
    one marked (a new caption also clears a highlight the gallery kept from an earlier click)."""
    if session.tree is None or session.tree.current is None:
        return []
    tree = session.tree
    return [(f.image if f.image is not None else painting_placeholder(tree),
             f"{SELECTED_MARK if f.id == tree.current else ''}{i}. {f.text}"
             + ("" if f.image is not None else f" {PAINTING_MARK}"))
            for i, f in enumerate(tree.path(tree.leaf(tree.current)))]


PAINTING_MARK = "(painting…)"  # after the caption of a frame whose text is written and picture not yet painted


def painting_placeholder(tree: StoryTree) -> Image.Image:
    """A plain picture standing in for one being painted, the size of the story's pictures."""
    size = next((f.image.size for f in tree.frames.values() if f.image is not None), (128, 128))
    return Image.new("RGB", size, (225, 225, 225))


NO_STORY_HTML = "<p><i>No story yet.</i></p>"
TREE_INDENT_LEVELS = 6  # deeper branches keep this indent: the outline never shrinks or runs off the side
TREE_CSS = """
.story-outline { font-size: 13px; line-height: 1.35; }
.story-outline .run { display: flex; flex-wrap: wrap; align-items: center; gap: 3px; padding: 3px 0 3px 6px;
  border-left: 2px solid var(--border-color-primary, #ddd); }
.story-outline .run.on-path { border-left-color: var(--color-accent, #f97316); }
.story-outline .from { color: var(--body-text-color-subdued, #777); margin-right: 4px; }
.story-outline .node { font: inherit; min-width: 2.1em; padding: 1px 5px; border-radius: 4px; cursor: pointer;
  border: 1px solid var(--border-color-primary, #ccc); background: var(--background-fill-primary, #fff);
  color: var(--body-text-color, #222); }
.story-outline .node.on-path { border-color: var(--color-accent, #f97316); font-weight: 600; }
.story-outline .node.current { background: var(--color-accent, #f97316); color: #fff; }
.story-outline .node.fork::after { content: " ↳" attr(data-branches); }
.story-outline .words { color: var(--body-text-color-subdued, #666); margin-left: 4px; white-space: nowrap;
  overflow: hidden; text-overflow: ellipsis; max-width: 16em; }
"""
# One listener on the outline: a click on a frame's button sends its id to ``app.py``'s select handler.
TREE_JS = ("element.addEventListener('click', (e) => { const b = e.target.closest('[data-frame]'); "
           "if (b) trigger('click', {frame: Number(b.dataset.frame)}); });")


def first_words(text: str, words: int = 6) -> str:
    parts = text.split()
    return " ".join(parts[:words]) + (" …" if len(parts) > words else "")


def tree_runs(tree: StoryTree) -> list[dict]:
    """The story tree as an outline of runs: a run is a straight stretch of frames (each the only continuation of
    the one before), ended by a frame with several continuations; each of those starts a run one level deeper.
    Runs come depth first, children in the order they were made: ``{"level", "frames": [Frame], "from": parent id
    or None}``. A 50-frame story without branches is one run."""
    runs: list[dict] = []
    stack = [(root, 0, None) for root in reversed(tree.roots)]
    while stack:
        fid, level, parent = stack.pop()
        frames = [tree.get(fid)]
        while len(frames[-1].children) == 1:
            frames.append(tree.get(frames[-1].children[0]))
        runs.append({"level": level, "frames": frames, "from": parent})
        last = frames[-1]
        stack += [(c, level + 1, last.id) for c in reversed(last.children)]
    return runs


def tree_html(session: StorySession) -> str:
    """The story tree as an indented outline of constant size (``tree_runs``): every frame a button showing its
    step, its first words on hover; the current path highlighted, the current frame filled, a frame with several
    continuations marked with their number. Clicking a button selects that frame (``TREE_JS``)."""
    tree = session.tree
    if tree is None or not tree.frames:
        return NO_STORY_HTML
    on_path = {f.id for f in tree.path(tree.leaf(tree.current))}
    rows = []
    for run in tree_runs(tree):
        buttons = []
        head = run["frames"][0]
        first_step = tree.depth(head.id) - 1  # a run's frames follow one another: steps first_step, first_step + 1, ...
        for step, f in enumerate(run["frames"], start=first_step):
            classes = ["node"] + (["on-path"] if f.id in on_path else []) + (["current"] if f.id == tree.current else [])
            extra = ""
            if len(f.children) > 1:
                classes.append("fork")
                extra = f" data-branches='{len(f.children)}'"
            tip = html.escape(f"#{f.id} · step {step} · {f.origin}: {f.text}", quote=True)
            buttons.append(f"<button type='button' class='{' '.join(classes)}' data-frame='{f.id}'{extra} "
                           f"title='{tip}'>{step}</button>")
        start = f"<span class='from'>from {first_step - 1} ↳</span>" if run["from"] is not None else ""
        words = f"<span class='words'>{html.escape(first_words(head.text))}</span>"
        indent = min(run["level"], TREE_INDENT_LEVELS) * 1.1
        path_class = " on-path" if head.id in on_path else ""
        rows.append(f"<div class='run{path_class}' style='margin-left:{indent:.1f}em'>{start}{''.join(buttons)}"
                    f"{words}</div>")
    return "<div class='story-outline'>" + "".join(rows) + "</div>"


def versions(session: StorySession) -> list[tuple[Frame, str]]:
    """The selected frame's versions (it and its siblings), side by side: (frame, "version i of n: text")."""
    tree = session.tree
    if tree is None or tree.current is None:
        return []
    sibs = tree.siblings(tree.current)
    return [(tree.get(fid), f"version {i} of {len(sibs)}{' (shown)' if fid == tree.current else ''}: "
                            f"{tree.get(fid).text}") for i, fid in enumerate(sibs, start=1)]


def select_version(session, index: int) -> Frame:
    tree = session.require_tree()
    sibs = tree.siblings(tree.current)
    if not isinstance(index, int) or not 0 <= index < len(sibs):
        raise StoryError("no such version of this frame")
    return tree.select(sibs[index])


READING_CSS = ("<style>.reading figure { margin: 0 0 1.2em; } .reading img { width: 384px; max-width: 100%; "
               "image-rendering: pixelated; border-radius: 4px; } .reading figcaption { font-size: 1.05em; "
               "max-width: 40em; margin-top: .3em; }</style>")


def reading_html(session: StorySession) -> str:
    """The current branch to read, one frame after another (the HTML export's figures): each picture whole, scaled
    up without blurring (``image-rendering: pixelated``), with its full text; the selected frame is marked."""
    tree = session.tree
    if tree is None or tree.current is None:
        return NO_STORY_HTML
    figures = figures_html(tree.path(tree.leaf(tree.current)), selected=tree.current, png_cache=_png_cache(session))
    return READING_CSS + "<div class='reading'>" + "".join(figures) + "</div>"


def frame_choices(session: StorySession) -> list[str]:
    if session.tree is None:
        return []
    return [frame_label(session.tree.frames[i]) for i in sorted(session.tree.frames)]


def frame_info(session: StorySession) -> str:
    tree = session.tree
    if tree is None or tree.current is None:
        return ""
    f = tree.get(tree.current)
    sibs = tree.siblings(f.id)
    pos = f"{sibs.index(f.id) + 1} of {len(sibs)}"
    return (f"**Frame #{f.id}** · step {tree.depth(f.id) - 1} · {f.origin} · seed {f.seed if f.seed is not None else '—'}"
            f" · version {pos} here · {len(f.children)} continuation(s)")


# -- the opening picture ------------------------------------------------------------------------------
# Example openings for a model whose preset names none of its own (a model of a narrow world, such as the demo,
# lists openings it knows in its preset's ``examples``).
GENERAL_EXAMPLES = [
    {"image": "assets/examples/fox_meadow.png", "text": "A little fox with a red headband sat in the meadow."},
    {"image": "assets/examples/robot_night.png", "text": "A small robot looked up at the moon."},
]


def examples(preset: str) -> list[list[str]]:
    """[[picture path, opening text], ...] for the app's examples: the preset's own, else general ones."""
    from .config import load_preset as read_preset
    from .config import resolve_path

    try:
        listed = read_preset(preset).get("examples")
    except Exception:  # noqa: BLE001 - an unknown preset gets the general examples; loading it reports the error
        listed = None
    return [[resolve_path(str(e["image"])), str(e["text"])] for e in (listed or GENERAL_EXAMPLES)]


def picture_note(holder: ModelHolder, image) -> str:
    """A sentence for the visitor when the opening picture is unlike anything the loaded model was trained on
    (``SeedStoryPipeline.unfamiliarity``); "" when it is familiar, or when the model cannot tell."""
    if image is None or not holder.loaded:
        return ""
    try:
        picture = load_image(image)
        with holder.model_lock:  # the visual tokenizer may be moved between devices by another visitor's call
            distance = holder.pipeline().unfamiliarity(picture)
    except Exception:  # noqa: BLE001 - an unreadable picture is reported by Start story, not here
        return ""
    return _unfamiliar_sentence(holder, distance)


def familiarity_note(holder: ModelHolder, features) -> str:
    """``picture_note`` for a picture already encoded (its visual-tokenizer ``features``): no second encoding."""
    familiarity = holder.pipeline().familiarity if holder.loaded else None
    if familiarity is None or features is None:
        return ""
    return _unfamiliar_sentence(holder, float(familiarity.distance(features)[0]))


def _unfamiliar_sentence(holder: ModelHolder, distance: Optional[float]) -> str:
    if distance is None or distance <= 1.0:
        return ""
    return (f"**This picture looks unlike anything the {holder.pipeline().name} model was trained on** "
            f"({distance:.1f}x further from its training pictures than any it knows). It can only tell stories in "
            "its own small world (try the examples), so the story will not be about your picture. For your own "
            "pictures, run the released SEED-Story weights: `python app.py --preset seed-story-george` (the "
            "README's *The released SEED-Story weights* says where the files go).")


# -- actions -------------------------------------------------------------------------------------------
def model_report(holder: ModelHolder) -> str:
    """Markdown about the shared models: what is loaded and where, or, when the preset failed to load, the
    doctor's report (each missing or wrong file, where it comes from and where it goes)."""
    if holder.error and not holder.loaded:
        return report_for_preset(holder.preset, holder.overrides, error=holder.error)
    return holder.describe()


def load_preset(holder: ModelHolder, name: str, overrides: Optional[list[str]] = None) -> str:
    """Switch the shared models to preset ``name``; never raises: a failure is reported by ``model_report``."""
    try:
        holder.switch(name, overrides)
    except Exception:  # noqa: BLE001 - recorded in holder.error and shown as the doctor's report
        pass
    return model_report(holder)


def engine_for(holder: ModelHolder, ui: UISettings) -> StoryEngine:
    return holder.engine(ui.mode or "window", int(ui.window) if ui.window else None)


@contextlib.contextmanager
def one_at_a_time(session: StorySession, growing: bool = True):
    """One generation per page at a time (a double click or a second request while a frame is being written gets
    a message, not a queue slot),
    and a story tree of at most ``MAX_STORY_FRAMES`` frames when ``growing``."""
    if growing and session.tree is not None and len(session.tree) >= MAX_STORY_FRAMES:
        raise StoryError(f"this story has {len(session.tree)} frames, the most one story may hold; delete a branch "
                         "or start a new story")
    if not session.writing.acquire(blocking=False):
        raise StoryError("this story is already being written; wait for the frame in progress (or press Stop)")
    try:
        yield
    finally:
        session.writing.release()


def start_story(session: StorySession, holder: ModelHolder, image, text: str, ui: UISettings) -> StoryTree:
    if image is None:
        raise StoryError("upload an opening picture (or pick an example)")
    picture = load_image(image)
    engine = engine_for(holder, ui)
    with one_at_a_time(session, growing=False):
        session.tree, session.deleted = engine.start(picture, text), None
    return session.tree


def next_frames(
    session: StorySession,
    holder: ModelHolder,
    n: int,
    ui: UISettings,
    progress: Optional[Callable[[str, float], None]] = None,
    as_written: bool = False,
) -> Iterator[Frame]:
    """Step ``n`` frames from the current one, yielding each as it is finished (``as_written``: also as soon as its
    text is written, before its picture, which with ``context_from: features`` is painted while the next text is
    written). ``stop()`` ends it after the frame in progress; finished frames stay."""
    tree = session.require_tree()
    n = int(n)
    if not 1 <= n <= MAX_FRAMES_PER_CLICK:
        raise StoryError(f"generate between 1 and {MAX_FRAMES_PER_CLICK} frames at a time")
    engine = engine_for(holder, ui)
    settings = ui.generation(engine.pipe.settings)
    session.stop_event.clear()
    written = 0

    def report(stage, fraction):
        if progress:
            progress(f"frame {written + 1}/{n}: {stage}", (written + fraction) / n)

    with one_at_a_time(session):
        n = min(n, MAX_STORY_FRAMES - len(tree))
        parent = tree.leaf(tree.current)
        for event, frame in engine.steps(tree, n, parent, settings, progress=report,
                                         should_stop=session.stop_event.is_set):
            if event == "written":
                written += 1
                if as_written:
                    yield frame
            else:
                yield frame


# -- surviving a page reload --------------------------------------------------------------------------
AUTOSAVE_HOURS = 24
AUTOSAVE_MAX_BYTES = 2 * 2**30  # all autosaves together
_BROWSER_KEY = re.compile(r"^[0-9a-f]{32}$")


def autosave_dir() -> str:
    """Where stories wait for their browser to come back (``SEEDSTORY_AUTOSAVE_DIR``, else the temp folder)."""
    return os.environ.get("SEEDSTORY_AUTOSAVE_DIR") or os.path.join(tempfile.gettempdir(), "seedstory-autosave")


def _autosave_path(key: str) -> str:
    return os.path.join(autosave_dir(), f"{key}.zip")


def resume(session: StorySession, holder: ModelHolder, key) -> tuple[str, str]:
    """On page load: take the browser's key (a new random one when it has none or a malformed one) and give the
    session the story autosaved under it, if any and if this server's model can continue it. Returns the key for
    the browser to keep and a sentence for the visitor ("" when there was nothing to bring back). A key is 128
    random bits that only its browser holds: no visitor can name another's."""
    if not (isinstance(key, str) and _BROWSER_KEY.match(key)):
        key = uuid.uuid4().hex
    session.browser_key = key
    path = _autosave_path(key)
    if session.tree is not None or not os.path.isfile(path):
        return key, ""
    try:
        tree = load_story(path)
        engine_for(holder, UISettings()).check_story(tree)
    except (StoryFileError, StoryError) as e:
        return key, f"Your last story could not be brought back ({e}); start a new one."
    session.tree, session.deleted = tree, None
    return key, "Your story is back where you left it."


def autosave(session: StorySession) -> None:
    """Save the session's story where ``resume`` finds it after a reload. A browser's first autosave also prunes
    the folder, so a long-running server keeps it bounded."""
    if session.browser_key is None or session.tree is None or not session.tree.frames:
        return
    path = _autosave_path(session.browser_key)
    if not os.path.exists(path):
        prune_autosaves()
    os.makedirs(autosave_dir(), exist_ok=True)
    save_story(session.tree, path, png_cache=_png_cache(session))


def _png_cache(session: StorySession) -> dict:
    """The session's story's pictures as PNG bytes, each encoded once (autosaves, the reading view)."""
    if session.saved_pngs_of != session.tree.uid:
        session.saved_pngs, session.saved_pngs_of = {}, session.tree.uid
    return session.saved_pngs


def prune_autosaves(max_age_hours: float = AUTOSAVE_HOURS, max_bytes: int = AUTOSAVE_MAX_BYTES) -> int:
    """Delete autosaves no browser came back to within ``max_age_hours``, then the oldest until all of them take
    at most ``max_bytes``; returns how many."""
    folder, cutoff, gone = autosave_dir(), time.time() - max_age_hours * 3600, 0
    if not os.path.isdir(folder):
        return 0
    saves = []
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name.endswith(".zip") and os.path.isfile(path):
            saves.append((os.path.getmtime(path), os.path.getsize(path), path))
    total = sum(size for _, size, _ in saves)
    for mtime, size, path in sorted(saves):
        if mtime < cutoff or total > max_bytes:
            os.remove(path)
            total -= size
            gone += 1
    return gone


def browser_secret() -> str:
    """The key that encrypts what browsers keep for this server, kept beside the autosaves so a restarted server
    still reads its visitors' keys (``SEEDSTORY_BROWSER_SECRET`` wins)."""
    if os.environ.get("SEEDSTORY_BROWSER_SECRET"):
        return os.environ["SEEDSTORY_BROWSER_SECRET"]
    path = os.path.join(autosave_dir(), ".browser-secret")
    if not os.path.isfile(path):
        write_text(path, uuid.uuid4().hex + uuid.uuid4().hex, private=True)
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


def close_session(session, holder: ModelHolder) -> None:
    """A visitor has gone: stop their generation, delete their files and drop their cached context states."""
    import shutil

    if not isinstance(session, StorySession):
        return
    session.stop_event.set()
    if session.tree is not None:
        holder.forget(session.tree.uid)
    shutil.rmtree(session.workdir, ignore_errors=True)


def stop(session: StorySession) -> None:
    session.stop_event.set()


def regenerate(session, holder, frame, part: str, seed, ui: UISettings) -> Frame:
    tree = session.require_tree()
    engine = engine_for(holder, ui)
    seed = int(seed) if seed not in (None, "") else None
    with one_at_a_time(session):
        return engine.regenerate(tree, session.frame_id(frame), part, seed, ui.generation(engine.pipe.settings))


def edit(session, holder, frame, text: str, ui: UISettings) -> Frame:
    engine = engine_for(holder, ui)
    with one_at_a_time(session):
        return engine.edit_text(session.require_tree(), session.frame_id(frame), text,
                                settings=ui.generation(engine.pipe.settings))


def branch(session, holder, frame, text: Optional[str], ui: UISettings) -> Frame:
    engine = engine_for(holder, ui)
    text = text if text and text.strip() else None
    seed = int(ui.seed) if ui.seed not in (None, "") else None
    with one_at_a_time(session):
        return engine.branch(session.require_tree(), session.frame_id(frame), text, seed,
                             ui.generation(engine.pipe.settings))


def select(session, frame) -> Frame:
    tree = session.require_tree()
    return tree.select(session.frame_id(frame))


def select_on_storyboard(session, index: int) -> Frame:
    tree = session.require_tree()
    path = tree.path(tree.leaf(tree.current))
    if not 0 <= index < len(path):
        raise StoryError("no such frame on the storyboard")
    return tree.select(path[index].id)


def switch_sibling(session, delta: int) -> Frame:
    """Show the previous/next version of the current frame (switches branch)."""
    tree = session.require_tree()
    sibs = tree.siblings(tree.current)
    i = (sibs.index(tree.current) + delta) % len(sibs)
    return tree.select(sibs[i])


def delete(session, holder, frame, ui: UISettings) -> None:
    tree = session.require_tree()
    fid = session.frame_id(frame)
    if tree.get(fid).parent is None and len(tree.roots) == 1:
        raise StoryError("this is the only opening frame; start a new story instead")
    with one_at_a_time(session, growing=False):
        session.deleted = engine_for(holder, ui).detach(tree, fid)


def undo_delete(session) -> Frame:
    """Put back what the last delete took (once)."""
    tree = session.require_tree()
    if session.deleted is None:
        raise StoryError("there is no delete to undo")
    if len(tree) + len(session.deleted.frames) > MAX_STORY_FRAMES:
        raise StoryError(f"putting them back would make the story longer than {MAX_STORY_FRAMES} frames")
    with one_at_a_time(session, growing=False):
        top = tree.reattach(session.deleted)
    session.deleted = None
    return top


def export(session, fmt: str) -> str:
    tree = session.require_tree()
    if fmt not in FORMATS:
        raise StoryError(f"unknown format {fmt!r}")
    path = os.path.join(session.workdir, f"story{FORMATS[fmt]}")
    return export_story(tree, fmt, path)


def save(session) -> str:
    path = os.path.join(session.workdir, "story-session.zip")
    return save_story(session.require_tree(), path)


def load(session, path: str, holder: Optional[ModelHolder] = None) -> StoryTree:
    """Replace the session's story with a saved one; refused, with the current story kept, when the file is not
    a story or (given the ``holder``) was made by another model than the one this server runs."""
    if not path:
        raise StoryError("choose a saved story (.zip) to load")
    tree = load_story(path)
    if holder is not None:
        engine_for(holder, UISettings()).check_story(tree)
    with one_at_a_time(session, growing=False):
        session.tree, session.deleted = tree, None
    return session.tree
