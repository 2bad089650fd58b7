"""Stories for evaluation, as in the paper: each validation story's first picture and first caption open a
new story, and the model writes the rest (24 more frames by default: 25 in all).

The validation file is StoryStream-style JSONL, one story a line::

    {"id": "optional name", "images": ["rel/path/0.jpg", ...], "captions": ["first caption", ...]}

Image paths are relative to ``images_root``. A story is saved with ``save_story`` to ``OUT/<id>/`` (``id``
from the line, made safe for a folder name, else ``val_<k>`` for the k-th record of the file), which is
the layout ``python -m seedstory.eval judge`` reads. Stories already complete in ``OUT`` are skipped, so
an interrupted run picks up where it stopped (a story cut off halfway is made again from its start).

Under ``accelerate launch`` the stories still to make are split between the processes, one GPU each::

    accelerate launch --num_processes 4 -m seedstory.eval generate --val val.jsonl --images ROOT --out OUT

Without it (or without accelerate installed) one process makes them all.

Each story's seed is the base seed (the preset's, or ``--seed``) plus a hash of its id, so a story comes
out the same whichever process makes it.
"""
from __future__ import annotations

import json
import logging
import os
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

log = logging.getLogger("seedstory.eval")

_SAFE_ID = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class ValItem:
    id: str
    image: str  # absolute or cwd-relative path of the opening picture
    caption: str
    line: int  # 1-based line number in the JSONL


@dataclass
class GenerateReport:
    total: int = 0  # good stories in the file (after --limit)
    bad_lines: list = field(default_factory=list)  # (line number, reason)
    already_complete: int = 0
    made: list = field(default_factory=list)  # ids made (by all processes, once they are gathered)
    failed: list = field(default_factory=list)  # (id, reason)
    complete_after: int = 0  # complete stories in OUT at the end (all processes)
    main: bool = True  # this is the process that reports (the only one, or rank 0 of a launch)

    def bad_summary(self) -> str:
        counts = Counter(reason.split(":")[0] for _, reason in self.bad_lines)
        return ", ".join(f"{n} {what}" for what, n in counts.most_common())


def _safe_id(value) -> Optional[str]:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    text = _SAFE_ID.sub("_", str(value).strip()).strip("._")
    return text[:120] or None


def read_val(path: str, images_root: str, check_images: bool = True) -> tuple[list[ValItem], list[tuple[int, str]]]:
    """The usable stories of a validation JSONL, and (line, reason) for each line left out. A reason starts
    with its kind (``invalid JSON``, ``no image``, ``image missing``, ``image unreadable``, ``no caption``,
    ``duplicate id``) so they can be counted."""
    from ..image_processing import ImageError, load_image

    items: list[ValItem] = []
    problems: list[tuple[int, str]] = []
    seen: set[str] = set()
    k = -1
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            k += 1
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append((line_no, f"invalid JSON: {e.msg}"))
                continue
            if not isinstance(record, dict):
                problems.append((line_no, "invalid JSON: not an object"))
                continue
            images = record.get("images")
            first_image = images[0] if isinstance(images, list) and images else None
            if not isinstance(first_image, str) or not first_image.strip():
                problems.append((line_no, "no image: 'images' is missing or empty"))
                continue
            captions = record.get("captions")
            caption = captions[0] if isinstance(captions, list) and captions else None
            if not isinstance(caption, str) or not caption.strip():
                problems.append((line_no, "no caption: the first caption is missing or empty"))
                continue
            image_path = first_image if os.path.isabs(first_image) else os.path.join(images_root, first_image)
            if not os.path.isfile(image_path):
                problems.append((line_no, f"image missing: {image_path}"))
                continue
            if check_images:
                try:
                    load_image(image_path)
                except ImageError as e:
                    problems.append((line_no, f"image unreadable: {e}"))
                    continue
            story_id = _safe_id(record.get("id")) if record.get("id") is not None else None
            story_id = story_id or f"val_{k}"
            if story_id in seen:
                problems.append((line_no, f"duplicate id: {story_id}"))
                continue
            seen.add(story_id)
            items.append(ValItem(story_id, image_path, caption.strip(), line_no))
    return items, problems


def story_length(path: str) -> int:
    """Frames on the saved path of the story at ``path`` (0 when there is none or it is unreadable)."""
    from ..storage import STORY_FORMAT

    try:
        with open(os.path.join(path, "story.json"), encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("format") != STORY_FORMAT:
            return 0
        return len(meta.get("path") or [])
    except (OSError, ValueError, AttributeError, TypeError):
        return 0


def story_seed(base: int, story_id: str) -> int:
    return (int(base) + zlib.crc32(story_id.encode("utf-8"))) % 2**31


def _partial_state():
    try:
        from accelerate import PartialState
    except ImportError:
        return None
    import torch

    # Several processes without GPUs (``--cpu`` launches, torchrun on a CPU box) split the work too.
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or (
        world > 1 and not torch.cuda.is_available())
    return PartialState(cpu=cpu)


def _device_overrides(preset: str, overrides: list[str], state) -> list[str]:
    """Under a multi-process launch, put each process's model on its own GPU (unless the preset or an
    override names a device)."""
    if state is None or state.num_processes <= 1 or state.device.type != "cuda":
        return overrides
    if any(o.replace(" ", "").startswith("runtime.device=") for o in overrides):
        return overrides
    from ..config import load_preset

    runtime = load_preset(preset, overrides).get("runtime", {}) or {}
    if runtime.get("device", "auto") in (None, "auto", "cuda"):
        return overrides + [f"runtime.device={state.device}"]
    return overrides


def generate_stories(
    val: str,
    images_root: str,
    out: str,
    preset: Optional[str] = None,
    frames: int = 24,
    overrides: Optional[list[str]] = None,
    configure: Optional[Callable] = None,
    mode: str = "window",
    limit: int = 0,
    progress: bool = True,
) -> GenerateReport:
    """Make the stories of ``val`` that ``out`` does not hold complete yet. ``configure(pipe)`` may return
    the generation settings to use (default: the preset's)."""
    from ..cli import default_preset
    from ..story import StoryError

    if frames < 1:
        raise StoryError("--frames must be at least 1")
    if not os.path.isfile(val):
        raise FileNotFoundError(f"no validation file at {val}")
    preset = preset or default_preset()
    overrides = list(overrides or [])
    report = GenerateReport()
    state = _partial_state()
    main = report.main = state is None or state.is_main_process

    items, report.bad_lines = read_val(val, images_root)
    if limit:
        items = items[:limit]
    report.total = len(items)
    if report.bad_lines and main:
        log.warning("skipped %d bad line(s) in %s: %s", len(report.bad_lines), val, report.bad_summary())
        for line_no, reason in report.bad_lines[:10]:
            log.warning("  line %d: %s", line_no, reason)
        if len(report.bad_lines) > 10:
            log.warning("  ... and %d more", len(report.bad_lines) - 10)
    want = frames + 1
    pending = [it for it in items if story_length(os.path.join(out, it.id)) < want]
    report.already_complete = len(items) - len(pending)
    if state is not None:
        state.wait_for_everyone()  # every process has the same list before anyone writes
    if main:
        log.info("%d stor%s to make, %d already complete in %s", len(pending), "y" if len(pending) == 1 else "ies",
                 report.already_complete, out)
    if pending:
        _make(pending, out, preset, frames, _device_overrides(preset, overrides, state), configure, mode, state,
              progress, report)
    if state is not None:
        state.wait_for_everyone()
        if state.num_processes > 1:
            from accelerate.utils import gather_object

            report.made = list(gather_object(list(report.made)))
            report.failed = [tuple(f) for f in gather_object([list(f) for f in report.failed])]
    report.complete_after = sum(1 for it in items if story_length(os.path.join(out, it.id)) >= want)
    return report


def _make(pending, out, preset, frames, overrides, configure, mode, state, progress, report) -> None:
    from ..engine import StoryEngine
    from ..pipeline import SeedStoryPipeline
    from ..storage import save_story
    from ..story import StoryError

    pipe = SeedStoryPipeline.from_preset(preset, overrides)
    settings = configure(pipe) if configure is not None else pipe.settings
    if frames + 1 > settings.max_frames:
        raise StoryError(f"--frames {frames} would pass this preset's limit of {settings.max_frames} frames "
                         f"(the opening counts); use at most {settings.max_frames - 1}")
    pipe.settings = settings
    engine = StoryEngine(pipe, mode=mode or "window", window=settings.window)
    os.makedirs(out, exist_ok=True)

    rank = state.process_index if state is not None else 0
    multi = state is not None and state.num_processes > 1
    if state is not None:
        context = state.split_between_processes(pending)
    else:
        import contextlib

        context = contextlib.nullcontext(pending)
    with context as mine:
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(mine), desc=f"stories [process {rank}]" if multi else "stories", unit="story",
                       position=rank if multi else None)
        try:
            for item in mine:
                seed = story_seed(settings.seed, item.id)
                story_settings = settings.replace(seed=seed)
                try:
                    target = os.path.join(out, item.id)
                    if os.path.isdir(target) and os.listdir(target) and not os.path.isfile(os.path.join(target, "story.json")):
                        raise StoryError(f"{target} exists and is not a saved story; move it away to make this story")
                    tree = engine.start(item.image, item.caption)
                    for i in range(frames):
                        engine.step(tree, settings=story_settings)
                        if bar is not None:
                            bar.set_postfix_str(f"{item.id}: frame {i + 2}/{frames + 1}")
                    save_story(tree, target, model_name=pipe.name)
                    report.made.append(item.id)
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as e:  # one story's trouble (a bad picture, out of memory) is not the run's
                    reason = f"{type(e).__name__}: {e}" if not isinstance(e, (StoryError, ValueError)) else str(e)
                    report.failed.append((item.id, reason))
                    log.error("story %s (line %d) failed: %s", item.id, item.line, reason)
                finally:
                    # Drop this story's cached context states: they are of no use to the next story.
                    engine.store.drop(lambda key: True)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
