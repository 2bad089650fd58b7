"""StoryStream as released: jsonl, one story a line (``images``, ``captions``, optional ``orders`` and
``id``), image paths relative to an image root.

* ``iter_stories`` / ``validate`` — the valid stories, in file order; every broken line is skipped and
  counted by problem (never an exception halfway through a file).
* ``chunk`` — 30-frame stories cut into 10-frame windows, as the release trained on them.
* ``stats`` — counts, lengths, caption words.

``python -m seedstory.data validate|chunk|stats`` is the command line over these.
"""
from __future__ import annotations

import errno
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Optional

from PIL import Image

from ..atomic import write_file

PROBLEMS = ("bad json", "not an object", "missing field", "length mismatch", "empty story", "duplicate id",
            "missing image", "unreadable image")
EXAMPLES_PER_PROBLEM = 5


@dataclass
class ValidationReport:
    total_lines: int = 0  # non-blank lines read
    valid: int = 0
    frames: int = 0  # frames of the valid stories
    problems: Counter = field(default_factory=Counter)  # problem -> stories skipped for it
    examples: dict = field(default_factory=dict)  # problem -> [(line number, detail)]

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, problem: str, line: int, detail: str = "") -> None:
        self.problems[problem] += 1
        ex = self.examples.setdefault(problem, [])
        if len(ex) < EXAMPLES_PER_PROBLEM:
            ex.append((line, detail))

    def to_dict(self) -> dict:
        return {"total_lines": self.total_lines, "valid": self.valid, "frames": self.frames,
                "skipped": sum(self.problems.values()), "problems": dict(self.problems),
                "examples": {k: [{"line": n, "detail": d} for n, d in v] for k, v in self.examples.items()}}

    def markdown(self) -> str:
        lines = [f"{self.valid} valid stories ({self.frames} frames) of {self.total_lines} lines"]
        if self.ok:
            lines.append("no problems found")
        for problem, n in self.problems.most_common():
            lines.append(f"- {problem}: {n} stor{'y' if n == 1 else 'ies'} skipped")
            lines += [f"    line {line}: {detail}" for line, detail in self.examples.get(problem, [])]
        return "\n".join(lines)


def _check_image(path: str) -> Optional[str]:
    """None when ``path`` is a readable image (header and structure, without a full decode), else why not."""
    if not os.path.isfile(path):
        return "missing image"
    try:
        with Image.open(path) as im:
            im.verify()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return "unreadable image"
    return None


def _problem(rec, seen_ids: set, line: int) -> Optional[tuple[str, str]]:
    """The first problem of a parsed record (images are checked separately), or None."""
    if not isinstance(rec, dict):
        return "not an object", type(rec).__name__
    images, captions = rec.get("images"), rec.get("captions")
    if not isinstance(images, list) or not isinstance(captions, list):
        missing = [k for k, v in (("images", images), ("captions", captions)) if not isinstance(v, list)]
        return "missing field", ", ".join(missing)
    if not all(isinstance(x, str) for x in images) or not all(isinstance(x, str) for x in captions):
        return "missing field", "images and captions must be strings"
    orders = rec.get("orders")
    if len(images) != len(captions) or (orders is not None and (not isinstance(orders, list)
                                                                or len(orders) != len(images))):
        lens = f"{len(images)} images, {len(captions)} captions"
        if orders is not None:
            lens += f", {len(orders)} orders" if isinstance(orders, list) else ", orders not a list"
        return "length mismatch", lens
    if not images:
        return "empty story", ""
    sid = rec.get("id")
    if sid is not None:  # without an id the line number is the id: unique by construction
        key = json.dumps(sid, sort_keys=True)  # ids may be any JSON value, lists and objects included
        if key in seen_ids:
            return "duplicate id", str(sid)
        seen_ids.add(key)
    return None


def iter_stories(jsonl: str, image_root: Optional[str] = None, check_images: bool = True,
                 report: Optional[ValidationReport] = None) -> Iterator[dict]:
    """Valid stories in file order (each with ``_line``, its 1-based line number). Broken lines are
    skipped and counted in ``report``; images are checked when ``image_root`` is given and ``check_images``."""
    report = report if report is not None else ValidationReport()
    seen: set = set()
    with open(jsonl, "rb") as f:  # bytes, parsed as the training datasets parse them: invalid UTF-8 is bad JSON
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            report.total_lines += 1
            try:
                rec = json.loads(line)
            except (ValueError, RecursionError) as e:
                report.add("bad json", n, str(e)[:200])
                continue
            problem = _problem(rec, seen, n)
            if problem is None and image_root is not None and check_images:
                for rel in rec["images"]:
                    why = _check_image(os.path.join(image_root, rel))
                    if why:
                        problem = (why, rel)
                        break
            if problem is not None:
                report.add(problem[0], n, problem[1])
                continue
            report.valid += 1
            report.frames += len(rec["images"])
            yield {**rec, "_line": n}


def validate(jsonl: str, image_root: Optional[str] = None, check_images: bool = True) -> ValidationReport:
    report = ValidationReport()
    for _ in iter_stories(jsonl, image_root, check_images, report):
        pass
    return report


def _atomic_lines(out_path: str, lines: Iterator[str]) -> None:
    write_file(out_path, lambda f: f.writelines((line + "\n").encode("utf-8") for line in lines))


def chunk_story(rec: dict, window: int = 10, stride: Optional[int] = None, min_frames: Optional[int] = None,
                line: Optional[int] = None) -> list[dict]:
    """Consecutive windows of a story: ids ``{id}_{k}``; every per-frame list (same length as ``images``:
    captions, orders, truth, ...) sliced, other fields copied. A tail shorter than ``min_frames`` is dropped."""
    stride = stride or window
    min_frames = window if min_frames is None else min_frames
    n = len(rec["images"])
    base = rec.get("id", f"line{line}" if line is not None else "story")
    per_frame = [k for k, v in rec.items() if isinstance(v, list) and len(v) == n and k != "_line"]
    out = []
    for k, start in enumerate(range(0, n, stride)):
        end = min(n, start + window)
        if end - start < min_frames:
            break
        piece = {key: v for key, v in rec.items() if key not in per_frame and key != "_line"}
        piece.update({key: rec[key][start:end] for key in per_frame})
        piece["id"] = f"{base}_{k}"
        out.append(piece)
        if end == n:
            break
    return out


def chunk(jsonl: str, out_jsonl: str, window: int = 10, stride: Optional[int] = None,
          min_frames: Optional[int] = None, image_root: Optional[str] = None, check_images: bool = False) -> dict:
    """Cut every valid story of ``jsonl`` into windows (``chunk_story``), written atomically to ``out_jsonl``.
    Returns counts: stories, windows, frames dropped (in no window: short tails, gaps when stride > window),
    and the validation problems."""
    if window < 1 or (stride is not None and stride < 1):
        raise ValueError("window and stride must be at least 1")
    if not os.path.isfile(jsonl):  # before anything is created next to the output
        raise FileNotFoundError(errno.ENOENT, "not found", jsonl)
    if os.path.abspath(jsonl) == os.path.abspath(out_jsonl):
        raise ValueError("the output must be another file than the input")
    step = stride or window
    report = ValidationReport()
    counts = Counter()

    def lines():
        for rec in iter_stories(jsonl, image_root, check_images, report):
            pieces = chunk_story(rec, window, stride, min_frames, rec["_line"])
            counts["stories"] += 1
            counts["windows"] += len(pieces)
            covered = set().union(*(range(k * step, k * step + len(p["images"])) for k, p in enumerate(pieces)))
            counts["frames_dropped"] += len(rec["images"]) - len(covered)
            for p in pieces:
                yield json.dumps(p, ensure_ascii=False)

    _atomic_lines(out_jsonl, lines())
    return {**counts, "problems": dict(report.problems), "out": out_jsonl}


def _summary(values: list) -> dict:
    if not values:
        return {"min": None, "mean": None, "max": None}
    return {"min": min(values), "mean": round(sum(values) / len(values), 2), "max": max(values)}


def stats(jsonl: str, image_root: Optional[str] = None) -> dict:
    """Stories, frames, frames per story, caption words, distinct images, and the problems found."""
    report = ValidationReport()
    lengths, words, images = [], [], set()
    for rec in iter_stories(jsonl, image_root, image_root is not None, report):
        lengths.append(len(rec["images"]))
        words += [len(c.split()) for c in rec["captions"]]
        images.update(rec["images"])
    return {"stories": len(lengths), "frames": sum(lengths), "frames_per_story": _summary(lengths),
            "caption_words": _summary(words), "distinct_images": len(images), "problems": dict(report.problems)}


def stats_markdown(s: dict) -> str:
    fps, cw = s["frames_per_story"], s["caption_words"]
    lines = [f"{s['stories']} stories, {s['frames']} frames, {s['distinct_images']} distinct images"]
    if s["stories"]:
        lines.append(f"frames per story: min {fps['min']}, mean {fps['mean']}, max {fps['max']}")
        lines.append(f"caption words: min {cw['min']}, mean {cw['mean']}, max {cw['max']}")
    if s["problems"]:
        lines.append("skipped: " + ", ".join(f"{k} {v}" for k, v in s["problems"].items()))
    return "\n".join(lines)


__all__ = ["ValidationReport", "iter_stories", "validate", "chunk_story", "chunk", "stats", "stats_markdown"]
