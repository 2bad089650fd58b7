"""LLM-as-judge evaluation of saved stories, as SEED-Story's GPT-4 evaluation: scores out of 10 for three
aspects, and pairwise comparisons between two systems.

**Scoring** (``judge_stories``): every story folder (or ``.zip``) under a directory is shown to a judge
model (frames in order: text, then picture) once per aspect, asking for a 1-10 rating written as ``[[N]]``.

**Pairwise** (``judge_pairwise``): stories with the same name in two directories are shown side by side
as Story A and Story B, once in each order (``ab``: the first directory's story is Story A; ``ba``: it is
Story B), asking for ``[[A]]``, ``[[B]]`` or ``[[tie]]``. Each order's verdict is mapped back to the
directories. Combined per pair: +1 when the first directory's story wins an order, -1 when it loses, 0 for
a tie, summed over both orders; a positive sum is a win, a negative one a loss, zero a tie. So a win in
one order and a loss in the other is a tie, and a win plus a tie is a win. Per-order rates are reported
too, with how often the judge preferred whichever story it saw first (its position bias).

**Results** go to ``OUT/results.jsonl``: one line per (story, aspect) or (story, aspect, order), appended
and flushed as each answer arrives, so an interrupted run loses only what was in flight. A new run with
the same ``OUT`` skips every key already there. A reply without a verdict is recorded as ``failed`` (with
the reply, truncated), left out of the means, and asked again only with ``retry_failed``. A request that
fails for good (after retries) is not recorded; the next run asks it again. ``OUT/run.json`` holds the
settings that shape the scores (model, aspects' prompts version, frames, image size, temperature); a run
with different ones refuses to mix into the same folder. ``OUT/summary.json`` holds the summary.

Nothing here sees the API key: it lives inside the :class:`~seedstory.eval.client.ChatClient`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import statistics
import threading
import time
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

from ..atomic import write_json
from .client import ChatError, image_part, redact_url, text_part

log = logging.getLogger("seedstory.eval")

PROMPT_VERSION = 1
ASPECTS = ("style", "engaging", "coherence")
RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.json"
RUN_FILE = "run.json"
REPLY_CHARS = 4000  # kept of each judge reply in the results
FATAL_STATUSES = (401, 403, 404)  # no point asking again: stop the run
# The paper's GPT-4 scores for SEED-Story (out of 10), shown next to ours for orientation.
PAPER_SCORES = {"style": 8.61, "engaging": 6.27, "coherence": 8.24}

# (title, what to look at). Our own wording; the scale and verdict format are in the templates below.
ASPECT_PROMPTS = {
    "style": (
        "image style consistency",
        "Look at the pictures: do they share one visual style from start to end (drawing technique, colour "
        "palette, lighting, level of detail), and do recurring characters, objects and places keep the same "
        "appearance from frame to frame?",
    ),
    "engaging": (
        "engagement",
        "Read the story as a whole: is it interesting and enjoyable to follow? Consider whether the plot moves "
        "forward, whether there are vivid details, characters with wishes or problems, and moments of tension or "
        "surprise that make a reader want to know what happens next. Repetitive or aimless text is a weakness.",
    ),
    "coherence": (
        "text-image coherence",
        "Does each picture show what its text describes (the characters, what they do, where they are), and do "
        "the texts and pictures together tell one consistent story in which each frame follows sensibly from "
        "the one before?",
    ),
}

SCORE_INSTRUCTION = """You have just been shown a story made by an AI system: {n} frames in order, each a passage of text followed by its picture.

Act as an impartial judge and rate this story on one aspect only: {title}. {description}

Use a scale from 1 to 10: 1 means this aspect is missing altogether, 4 means it is weak, 6 means acceptable but with clear flaws, 8 means strong with minor flaws, and 10 means flawless. Rate only this aspect and set the others aside. Do not reward or punish a story for being long or short. Be strict and objective.

First give a brief justification. Then end your answer with your rating as a whole number between 1 and 10 inside double square brackets, in the form [[N]]."""

PAIRWISE_INSTRUCTION = """You have just been shown two stories made by AI systems, Story A and Story B. Each is a sequence of frames, every frame a passage of text followed by its picture.

Act as an impartial judge and decide which story is better on one aspect only: {title}. {description}

Compare only this aspect and set the others aside. The order in which the stories were shown, their length and their labels must not influence your decision. Be objective.

First give a brief justification. Then end your answer with your verdict inside double square brackets: [[A]] if Story A is better, [[B]] if Story B is better, or [[tie]] if neither is better."""

_SCORE_RE = re.compile(r"\[\[\s*(\d{1,2}(?:\.\d+)?)\s*(?:/\s*10\s*)?\]\]")
_PREF_RE = re.compile(r"\[\[\s*(?:story\s+)?(a|b|c|tie|draw)\s*\]\]", re.IGNORECASE)


# -- parsing verdicts --------------------------------------------------------------------------------
def parse_score(reply: Optional[str]) -> Optional[float]:
    """The last ``[[N]]`` in ``reply`` with 1 <= N <= 10 (an int when whole), else None."""
    if not reply:
        return None
    for match in reversed(_SCORE_RE.findall(reply)):
        value = float(match)
        if 1 <= value <= 10:
            return int(value) if value.is_integer() else value
    return None


def parse_preference(reply: Optional[str]) -> Optional[str]:
    """The last ``[[A]]``/``[[B]]``/``[[tie]]`` in ``reply`` as "A", "B" or "tie" (``[[C]]`` means tie, as
    in the original scripts), else None."""
    if not reply:
        return None
    found = _PREF_RE.findall(reply)
    if not found:
        return None
    label = found[-1].lower()
    return {"a": "A", "b": "B"}.get(label, "tie")


# -- stories -------------------------------------------------------------------------------------------
def discover_stories(root: str) -> list[tuple[str, str]]:
    """(name, path) of each story under ``root``: every subfolder and every ``.zip`` (hidden entries and
    leftovers of an interrupted save are skipped). A folder wins over a ``.zip`` of the same name."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root} is not a folder of stories")
    found: dict[str, str] = {}
    for entry in sorted(os.listdir(root)):
        if entry.startswith("."):  # hidden, including an interrupted save's partial copy
            continue
        full = os.path.join(root, entry)
        if os.path.isdir(full):
            found[entry] = full
        elif entry.lower().endswith(".zip") and os.path.isfile(full):
            name = entry[: -len(".zip")]
            if name in found or os.path.isdir(os.path.join(root, name)):
                log.warning("both %s and %s.zip exist; judging the folder", name, name)
                continue
            found[name] = full
    return sorted(found.items())


@dataclass
class StoryFrames:
    name: str
    frames: list  # [(text, image_url content part or None)]


def load_frames(path: str, name: str, max_frames: int = 0, max_image_side: int = 0) -> StoryFrames:
    """The story's path from its root to the leaf below its current frame, as text + encoded pictures.
    Raises StoryFileError (a ValueError) for anything unusable."""
    from ..storage import StoryFileError, load_story

    tree = load_story(path)
    if tree.current is None:
        raise StoryFileError(f"{path}: the story has no frames")
    frames = tree.path(tree.leaf(tree.current))
    if max_frames:
        frames = frames[:max_frames]
    if not frames:
        raise StoryFileError(f"{path}: the story has no frames")
    return StoryFrames(name, [(f.text, image_part(f.image, max_image_side) if f.image is not None else None)
                              for f in frames])


def _story_parts(story: StoryFrames, label: str) -> list[dict]:
    parts = [text_part(f"{label} ({len(story.frames)} frames):")]
    for i, (text, image) in enumerate(story.frames, 1):
        parts.append(text_part(f"{label}, frame {i}. Text: {text.strip() or '(no text)'}"))
        parts.append(image if image is not None else text_part("(this frame has no picture)"))
    return parts


def score_messages(story: StoryFrames, aspect: str) -> list[dict]:
    title, description = ASPECT_PROMPTS[aspect]
    parts = _story_parts(story, "Story")
    parts.append(text_part(SCORE_INSTRUCTION.format(n=len(story.frames), title=title, description=description)))
    return [{"role": "user", "content": parts}]


def pairwise_messages(story_a: StoryFrames, story_b: StoryFrames, aspect: str) -> list[dict]:
    """Story A is shown first. Callers swap the arguments for the other order."""
    title, description = ASPECT_PROMPTS[aspect]
    parts = _story_parts(story_a, "Story A") + _story_parts(story_b, "Story B")
    parts.append(text_part(PAIRWISE_INSTRUCTION.format(title=title, description=description)))
    return [{"role": "user", "content": parts}]


class _StoryCache:
    """Loaded and encoded stories, a few at a time; each story is loaded once even when several threads
    want it together. Errors are cached too (a broken story is reported once)."""

    def __init__(self, loader: Callable[[str, str], StoryFrames], size: int):
        self._loader = loader
        self._size = max(2, size)
        self._lock = threading.Lock()
        self._items: OrderedDict = OrderedDict()
        self.errors: dict[str, str] = {}

    def get(self, name: str, path: str) -> StoryFrames:
        with self._lock:
            if path in self.errors:
                raise _StorySkipped(self.errors[path])
            entry = self._items.get(path)
            owner = entry is None
            if owner:
                entry = self._items[path] = {"done": threading.Event(), "value": None, "error": None}
                while len(self._items) > self._size:
                    self._items.popitem(last=False)
            else:
                self._items.move_to_end(path)
        if owner:
            try:
                entry["value"] = self._loader(name, path)
            except Exception as e:  # StoryFileError, ImageError, OSError, ...
                entry["error"] = str(e) or type(e).__name__
                with self._lock:
                    self.errors[path] = entry["error"]
            finally:
                entry["done"].set()
        entry["done"].wait()
        if entry["error"] is not None:
            raise _StorySkipped(entry["error"])
        return entry["value"]


class _StorySkipped(Exception):
    pass


# -- results -------------------------------------------------------------------------------------------
class ResultStore:
    """The JSONL results file: the latest record per key, and appends that reach the disk one by one."""

    def __init__(self, path: str):
        self.path = path
        self.records: dict[str, dict] = {}
        self.bad_lines = 0
        self._lock = threading.Lock()
        needs_newline = False
        if os.path.exists(path):
            with open(path, "rb") as f:
                data = f.read()
            needs_newline = bool(data) and not data.endswith(b"\n")
            for line in data.decode("utf-8", "replace").splitlines():
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    self.records[str(record["key"])] = record
                except (json.JSONDecodeError, KeyError, TypeError):
                    self.bad_lines += 1  # e.g. a line cut off when a run was killed
        if self.bad_lines:
            log.warning("%s: ignored %d unreadable line(s) (a run killed mid-write?)", path, self.bad_lines)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._fh = open(path, "a", encoding="utf-8")
        if needs_newline:
            self._fh.write("\n")
            self._fh.flush()

    def done(self, key: str, retry_failed: bool = False) -> bool:
        record = self.records.get(key)
        if record is None:
            return False
        return not (retry_failed and record.get("status") != "ok")

    def append(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False)
        with self._lock:
            # After close (an interrupted run whose requests were still in flight) append one-off.
            fh = self._fh if self._fh is not None else open(self.path, "a", encoding="utf-8")
            try:
                fh.write(line + "\n")
                fh.flush()
                try:
                    os.fsync(fh.fileno())
                except OSError:
                    pass
            finally:
                if fh is not self._fh:
                    fh.close()
            self.records[record["key"]] = record

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_run_settings(out_dir: str, settings: dict) -> None:
    """Write ``run.json`` on the first run; refuse a later run whose settings would change the scores."""
    path = os.path.join(out_dir, RUN_FILE)
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, json.JSONDecodeError):
            old = None
        if isinstance(old, dict):
            diffs = [f"{k}: {old.get(k)!r} there, {settings.get(k)!r} now" for k in settings
                     if k in old and old.get(k) != settings.get(k)]
            if diffs:
                raise ValueError(f"{out_dir} holds results made with other settings ({'; '.join(diffs)}); "
                                 "use the same settings to continue, or choose another --out")
            return
    os.makedirs(out_dir, exist_ok=True)
    _write_json(path, settings)


def _write_json(path: str, data) -> None:
    write_json(path, data, indent=1)


# -- statistics ----------------------------------------------------------------------------------------
# Our own Student's t: scipy's ``stats.t.ppf`` would make a 40 MB package a dependency for this one number.
def _t_central(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with integer ``df`` (closed form, Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan2(t, math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2 == 1:
        total, term = 0.0, math.cos(theta)
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c2 * (2 * k) / (2 * k + 1)
        return (2 / math.pi) * (theta + s * total) if df > 1 else 2 * theta / math.pi
    total, term = 0.0, 1.0
    for k in range(1, df // 2 + 1):
        total += term
        term *= c2 * (2 * k - 1) / (2 * k)
    return s * total


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (p > 0.5) of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError("df must be at least 1")
    if not 0.5 < p < 1:
        raise ValueError("p must be in (0.5, 1)")
    z = statistics.NormalDist().inv_cdf(p)
    if df > 1000:  # Cornish-Fisher expansion; exact to ~1e-6 here
        return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
    target = 2 * p - 1
    lo, hi = 0.0, max(2 * z, 1.0)
    while _t_central(hi, df) < target:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if _t_central(mid, df) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return (lo + hi) / 2


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> dict:
    """n, mean, sample standard deviation and the t confidence interval of the mean."""
    n = len(values)
    out = {"n": n, "mean": None, "sd": None, "ci_low": None, "ci_high": None}
    if n == 0:
        return out
    mean = statistics.fmean(values)
    out["mean"] = mean
    if n > 1:
        sd = statistics.stdev(values)
        half = t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
        out.update(sd=sd, ci_low=mean - half, ci_high=mean + half)
    return out


def summarize_scores(records: Iterable[dict], aspects: Sequence[str] = ASPECTS) -> dict:
    per: dict[str, dict] = {}
    records = list(records)
    for aspect in aspects:
        mine = [r for r in records if r.get("aspect") == aspect]
        scores = [float(r["score"]) for r in mine if r.get("status") == "ok" and r.get("score") is not None]
        stats = mean_ci(scores)
        if stats["ci_low"] is not None:  # the scale ends at 1 and 10
            stats["ci_low"], stats["ci_high"] = max(1.0, stats["ci_low"]), min(10.0, stats["ci_high"])
        stats["failed"] = sum(1 for r in mine if r.get("status") != "ok")
        if aspect in PAPER_SCORES:
            stats["paper"] = PAPER_SCORES[aspect]
        per[aspect] = stats
    return per


def combine_orders(winner_ab: Optional[str], winner_ba: Optional[str]) -> Optional[str]:
    """Both orders' winners ("a", "b", "tie") -> the pair's outcome for the first directory:
    "win", "tie" or "loss" (see the module docstring); None unless both are known."""
    if winner_ab is None or winner_ba is None:
        return None
    points = {"a": 1, "tie": 0, "b": -1}
    total = points[winner_ab] + points[winner_ba]
    return "win" if total > 0 else "loss" if total < 0 else "tie"


def _rates(outcomes: list[str]) -> dict:
    n = len(outcomes)
    out: dict = {"n": n}
    for name in ("win", "tie", "loss"):
        count = outcomes.count(name)
        out[name] = count
        out[f"{name}_rate"] = count / n if n else None
    return out


def summarize_pairwise(records: Iterable[dict], aspects: Sequence[str] = ASPECTS) -> dict:
    per: dict[str, dict] = {}
    records = list(records)
    failed = {a: sum(1 for r in records if r.get("aspect") == a and r.get("status") != "ok") for a in aspects}
    records = [r for r in records if r.get("status") == "ok" and r.get("winner") in ("a", "b", "tie")]
    as_outcome = {"a": "win", "tie": "tie", "b": "loss"}
    for aspect in aspects:
        by_story: dict[str, dict] = {}
        for r in records:
            if r.get("aspect") == aspect:
                by_story.setdefault(r["story"], {})[r["order"]] = r["winner"]
        orders = {}
        for order in ("ab", "ba"):
            orders[order] = _rates([as_outcome[w[order]] for w in by_story.values() if order in w])
        both = [w for w in by_story.values() if "ab" in w and "ba" in w]
        combined = _rates([combine_orders(w["ab"], w["ba"]) for w in both])
        combined["consistent_rate"] = (sum(1 for w in both if w["ab"] == w["ba"]) / len(both)) if both else None
        # How often the judge chose whichever story it saw first (0.5 or so: no position bias).
        picks = [(w == "a") if order == "ab" else (w == "b") for s in by_story.values() for order, w in s.items()
                 if w != "tie"]
        combined["first_shown_rate"] = (sum(picks) / len(picks)) if picks else None
        per[aspect] = {"combined": combined, "per_order": orders, "failed": failed[aspect]}
    return per


def format_score_table(summary: dict) -> str:
    rows = [f"{'aspect':<10} {'n':>5} {'mean':>6} {'95% CI':>15} {'sd':>5} {'failed':>6} {'paper':>6}"]
    for aspect, s in summary.items():
        ci = f"[{s['ci_low']:.2f}, {s['ci_high']:.2f}]" if s.get("ci_low") is not None else "-"
        mean = f"{s['mean']:.2f}" if s.get("mean") is not None else "-"
        sd = f"{s['sd']:.2f}" if s.get("sd") is not None else "-"
        paper = f"{s['paper']:.2f}" if s.get("paper") is not None else ""
        rows.append(f"{aspect:<10} {s['n']:>5} {mean:>6} {ci:>15} {sd:>5} {s.get('failed', 0):>6} {paper:>6}")
    return "\n".join(rows)


def format_pairwise_table(summary: dict, name_a: str = "A", name_b: str = "B") -> str:
    def pct(x):
        return f"{100 * x:5.1f}%" if x is not None else "    -"

    rows = [f"win/tie/loss of {name_a} against {name_b} (combined over both orders; per order: ab = {name_a} shown first)",
            f"{'aspect':<10} {'n':>4} {'win':>7} {'tie':>7} {'loss':>7} {'consistent':>11} {'1st shown':>10}"
            f" {'ab win/tie/loss':>24} {'ba win/tie/loss':>24} {'failed':>6}"]
    for aspect, s in summary.items():
        c = s["combined"]
        po = [f"{pct(o['win_rate'])}/{pct(o['tie_rate'])}/{pct(o['loss_rate'])}" for o in
              (s["per_order"]["ab"], s["per_order"]["ba"])]
        rows.append(f"{aspect:<10} {c['n']:>4} {pct(c['win_rate']):>7} {pct(c['tie_rate']):>7} {pct(c['loss_rate']):>7}"
                    f" {pct(c['consistent_rate']):>11} {pct(c['first_shown_rate']):>10} {po[0]:>24} {po[1]:>24}"
                    f" {s.get('failed', 0):>6}")
    return "\n".join(rows)


# -- running -----------------------------------------------------------------------------------------
@dataclass
class _Task:
    key: str
    story: str
    aspect: str
    order: Optional[str] = None  # pairwise only
    paths: tuple = ()


@dataclass
class RunReport:
    """What one run did: counts, stories that could not be loaded, request errors."""

    asked: int = 0
    scored: int = 0
    failed: int = 0  # answers without a verdict (recorded)
    errors: list = field(default_factory=list)  # (key, message) of requests that failed for good (not recorded)
    skipped_stories: dict = field(default_factory=dict)  # name -> reason
    already_done: int = 0
    aborted: Optional[str] = None

    @property
    def ok(self) -> bool:
        return not self.errors and not self.skipped_stories and self.aborted is None


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but the judge does not need it
        return None
    return tqdm(total=total, desc=desc, unit="item")


def _execute(tasks: list[_Task], work: Callable[[_Task], dict], store: ResultStore, report: RunReport,
             concurrency: int, max_errors: int, progress: bool, desc: str) -> None:
    """Run ``work`` over ``tasks`` on a thread pool; each record is appended as soon as it exists."""
    stop = threading.Event()
    lock = threading.Lock()

    def run_one(task: _Task) -> None:
        if stop.is_set():
            return
        try:
            record = work(task)
        except _StorySkipped as e:
            with lock:
                if task.story not in report.skipped_stories:
                    report.skipped_stories[task.story] = str(e)
                    log.error("skipping story %s: %s", task.story, e)
            return
        except ChatError as e:
            with lock:
                report.errors.append((task.key, str(e)))
                log.error("%s: %s", task.key, e)
                if e.status in FATAL_STATUSES:
                    report.aborted = report.aborted or f"the endpoint answered {e.status}: {e}"
                    stop.set()
                elif max_errors and len(report.errors) >= max_errors:
                    report.aborted = report.aborted or f"{len(report.errors)} requests failed (--max-errors {max_errors})"
                    stop.set()
            return
        except Exception as e:  # a bug or an odd story must not lose the other results
            with lock:
                report.errors.append((task.key, f"{type(e).__name__}: {e}"))
                log.exception("%s failed", task.key)
            return
        store.append(record)
        with lock:
            report.asked += 1
            if record["status"] == "ok":
                report.scored += 1
            else:
                report.failed += 1
                log.warning("%s: no verdict in the reply; recorded as failed", task.key)

    bar = _progress(len(tasks), desc, progress)
    pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="judge")
    try:
        # Submit lazily: at most a few tasks queued beyond the running ones, so a stop takes effect soon.
        pending = set()
        queue = iter(tasks)
        window = max(1, concurrency) * 2
        while True:
            while len(pending) < window and not stop.is_set():
                task = next(queue, None)
                if task is None:
                    break
                pending.add(pool.submit(run_one, task))
            if not pending:
                break
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                fut.result()
                if bar is not None:
                    bar.update(1)
    except BaseException:
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    pool.shutdown(wait=True)


def _truncate(text: Optional[str], limit: int = REPLY_CHARS) -> str:
    text = text or ""
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more characters]"


def default_out(stories: str, model: str, other: Optional[str] = None) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("_") or "judge"
    root = os.path.abspath(stories.rstrip("/\\") or ".")
    name = os.path.basename(root)
    if other is not None:
        name += "-vs-" + os.path.basename(os.path.abspath(other.rstrip("/\\") or "."))
    return os.path.join(os.path.dirname(root), f"{name}-judge-{safe}")


def _settings(mode: str, client, max_frames, max_image_side) -> dict:
    return {"mode": mode, "model": client.model, "prompt_version": PROMPT_VERSION, "max_frames": max_frames or None,
            "max_image_side": max_image_side or None, "temperature": client.temperature}


def judge_stories(
    client,
    stories_dir: str,
    out_dir: str,
    aspects: Sequence[str] = ASPECTS,
    concurrency: int = 4,
    max_frames: int = 0,
    max_image_side: int = 512,
    retry_failed: bool = False,
    max_errors: int = 20,
    limit: int = 0,
    progress: bool = True,
) -> tuple[dict, RunReport]:
    """Score every story under ``stories_dir`` on ``aspects``. Returns (summary, report); the summary is
    also written to ``OUT/summary.json``."""
    aspects = _check_aspects(aspects)
    stories = [(n, p) for n, p in discover_stories(stories_dir) if os.path.abspath(p) != os.path.abspath(out_dir)]
    if limit:
        stories = stories[:limit]
    check_run_settings(out_dir, _settings("score", client, max_frames, max_image_side))
    report = RunReport()
    cache = _StoryCache(lambda name, path: load_frames(path, name, max_frames, max_image_side), concurrency + 2)
    with ResultStore(os.path.join(out_dir, RESULTS_FILE)) as store:
        _check_mode(store, "score")
        tasks = []
        for name, path in stories:
            for aspect in aspects:
                key = f"{name}::{aspect}"
                if store.done(key, retry_failed):
                    report.already_done += 1
                else:
                    tasks.append(_Task(key, name, aspect, paths=(path,)))

        def work(task: _Task) -> dict:
            story = cache.get(task.story, task.paths[0])
            started = time.time()
            reply = client.complete(score_messages(story, task.aspect))
            score = parse_score(reply)
            return {"key": task.key, "mode": "score", "story": task.story, "aspect": task.aspect,
                    "status": "ok" if score is not None else "failed", "score": score,
                    "frames": len(story.frames), "model": client.model, "prompt_version": PROMPT_VERSION,
                    "seconds": round(time.time() - started, 3), "time": _now(), "reply": _truncate(reply)}

        if tasks:
            log.info("judging %d item(s) (%d already done) with %s at %s", len(tasks), report.already_done,
                     client.model, redact_url(client.url))
        _execute(tasks, work, store, report, concurrency, max_errors, progress, "judging")
        names = {n for n, _ in stories}
        records = [r for r in store.records.values() if r.get("story") in names]
    summary = {"mode": "score", "model": client.model, "stories_dir": os.path.abspath(stories_dir),
               "stories": len(stories), "aspects": summarize_scores(records, aspects),
               "skipped_stories": report.skipped_stories, "errors_this_run": len(report.errors),
               "prompt_version": PROMPT_VERSION, "time": _now()}
    _write_json(os.path.join(out_dir, SUMMARY_FILE), summary)
    return summary, report


def judge_pairwise(
    client,
    dir_a: str,
    dir_b: str,
    out_dir: str,
    aspects: Sequence[str] = ASPECTS,
    concurrency: int = 4,
    max_frames: int = 0,
    max_image_side: int = 512,
    retry_failed: bool = False,
    max_errors: int = 20,
    limit: int = 0,
    progress: bool = True,
) -> tuple[dict, RunReport]:
    """Compare the stories with the same name in ``dir_a`` and ``dir_b``, each pair in both orders."""
    aspects = _check_aspects(aspects)
    found_a, found_b = ({n: p for n, p in discover_stories(d) if os.path.abspath(p) != os.path.abspath(out_dir)}
                        for d in (dir_a, dir_b))
    names = sorted(set(found_a) & set(found_b))
    only_a, only_b = sorted(set(found_a) - set(found_b)), sorted(set(found_b) - set(found_a))
    if only_a or only_b:
        log.warning("%d stor%s only in %s and %d only in %s are left out (pairs are matched by name)",
                    len(only_a), "y" if len(only_a) == 1 else "ies", dir_a, len(only_b), dir_b)
    if limit:
        names = names[:limit]
    check_run_settings(out_dir, _settings("pairwise", client, max_frames, max_image_side))
    report = RunReport()

    cache = _StoryCache(lambda name, path: load_frames(path, name, max_frames, max_image_side), 2 * concurrency + 2)
    with ResultStore(os.path.join(out_dir, RESULTS_FILE)) as store:
        _check_mode(store, "pairwise")
        tasks = []
        for name in names:
            for aspect in aspects:
                for order in ("ab", "ba"):
                    key = f"{name}::{aspect}::{order}"
                    if store.done(key, retry_failed):
                        report.already_done += 1
                    else:
                        tasks.append(_Task(key, name, aspect, order, (found_a[name], found_b[name])))

        def work(task: _Task) -> dict:
            story_a = cache.get(task.story, task.paths[0])
            story_b = cache.get(task.story, task.paths[1])
            first, second = (story_a, story_b) if task.order == "ab" else (story_b, story_a)
            started = time.time()
            reply = client.complete(pairwise_messages(first, second, task.aspect))
            verdict = parse_preference(reply)
            if verdict is None or verdict == "tie":
                winner = verdict and "tie"
            else:  # the label the judge chose -> the directory it came from
                winner = ("a" if verdict == "A" else "b") if task.order == "ab" else ("b" if verdict == "A" else "a")
            return {"key": task.key, "mode": "pairwise", "story": task.story, "aspect": task.aspect,
                    "order": task.order, "status": "ok" if verdict is not None else "failed", "verdict": verdict,
                    "winner": winner, "frames": [len(story_a.frames), len(story_b.frames)], "model": client.model,
                    "prompt_version": PROMPT_VERSION, "seconds": round(time.time() - started, 3), "time": _now(),
                    "reply": _truncate(reply)}

        if tasks:
            log.info("comparing: %d item(s) (%d already done) with %s at %s", len(tasks), report.already_done,
                     client.model, redact_url(client.url))
        _execute(tasks, work, store, report, concurrency, max_errors, progress, "comparing")
        records = [r for r in store.records.values() if r.get("story") in set(names)]
    per = summarize_pairwise(records, aspects)
    summary = {"mode": "pairwise", "model": client.model, "dir_a": os.path.abspath(dir_a),
               "dir_b": os.path.abspath(dir_b), "pairs": len(names), "only_in_a": len(only_a),
               "only_in_b": len(only_b), "aspects": per, "combination": "sum over both orders (a win plus a loss "
               "is a tie; a win plus a tie is a win)", "skipped_stories": report.skipped_stories,
               "errors_this_run": len(report.errors), "prompt_version": PROMPT_VERSION, "time": _now()}
    _write_json(os.path.join(out_dir, SUMMARY_FILE), summary)
    return summary, report


def _check_aspects(aspects: Sequence[str]) -> tuple:
    aspects = tuple(dict.fromkeys(aspects))
    unknown = [a for a in aspects if a not in ASPECT_PROMPTS]
    if unknown or not aspects:
        raise ValueError(f"unknown aspect(s) {', '.join(unknown) or '(none given)'}; use {', '.join(ASPECTS)}")
    return aspects


def _check_mode(store: ResultStore, mode: str) -> None:
    other = {r.get("mode") for r in store.records.values()} - {mode, None}
    if other:
        raise ValueError(f"{store.path} holds {', '.join(sorted(other))} results; choose another --out")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
