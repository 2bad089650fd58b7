"""The story engine: every operation a person performs on a story, on top of a SeedStoryPipeline.

``start`` makes an opening frame from a picture and text; ``step`` writes and paints the next frame;
``regenerate`` replaces a frame by a new sibling (new text, new picture or both); ``edit_text`` replaces
a frame's text and recomputes its picture; ``branch`` adds another child; ``delete`` removes a subtree.

Context (docs/formats.md §5): each frame's picture enters the LM as its features; the last ``window`` frames
stay in context. Three ways to maintain it:

- ``recompute``: rebuild ``[BOS] + window`` from scratch every frame (the release's plain script).
- ``window``: keep the KV cache; when a frame leaves the window its cache entries are dropped (the
  BOS stays); positions keep counting, so relative distances stay true.
- ``sink``: as ``window``, but for each evicted frame a few tokens around its ``<img>`` and
  ``</img>`` stay, as do the first tokens of the story (the release's ``img_head_tail`` sink); those of the
  last ``SinkConfig.frames`` evicted frames only, so the context has a fixed budget.

The state after each frame is cached per frame (a ``KVStore`` bounded in bytes, least recently used
out), so stepping, regenerating or branching from frame k reuses its prefix instead of recomputing it.
Until the window is full, ``window``/``sink`` states are exactly the ``recompute`` state.
"""
from __future__ import annotations

import contextlib
import queue
import random
import re
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch
from PIL import Image

from .config import GenerationSettings
from .image_processing import ImageInput, load_image
from .models.agent import DecodingConfig
from .models.kv import KV, KVParts, KVWorkspace, kv_concat, kv_length, kv_nbytes, kv_select, kv_slice, kv_storage_nbytes
from .pipeline import SeedStoryPipeline
from .story import Detached, Frame, StoryError, StoryTree
from .tokens import neutralize_text

MODES = ("recompute", "window", "sink")
MAX_TEXT_CHARS = 2000
CAPTION_RETRIES = 3  # more draws when a caption repeats a recent one (GenerationSettings.no_repeat_captions)
Progress = Callable[[str, float], None]  # (stage, fraction of this frame done)


@dataclass
class ContextState:
    """The LM state right after a frame's ``</img>``: ready to write the next frame."""

    # The cache in pieces: the story's first entries, one piece per evicted frame's sink tokens (``sinks``; together
    # ``n_fixed`` entries), then one piece per frame still in context
    # (``spans``). A state shares its pieces with the state it grew from, so the store pays for each frame's
    # entries once, and evicting a frame drops its piece without copying the others.
    parts: KVParts = field(repr=False)
    logits: torch.Tensor = field(repr=False)  # [V] next-token logits
    next_pos: int  # RoPE position of the next token
    # One span per frame still in context:
    # (frame id, length, boi offset, eoi offset, entries at its start to keep if it is evicted).
    n_fixed: int
    spans: list = field(default_factory=list)
    evicted: int = 0
    # Sink mode: the lengths of the pieces after the first that hold evicted frames' sink tokens, oldest first.
    sinks: tuple = ()

    @property
    def kv(self) -> KV:
        """The cache as one ``KV`` value (a copy: for inspection; generation reads ``parts``)."""
        return kv_concat(self.parts)

    @property
    def nbytes(self) -> int:
        """The bytes of this state alone (pieces shared with other states included)."""
        return kv_nbytes(self.parts)


class KVStore:
    """Context states keyed by (story, frame, mode), least recently used out beyond a byte budget."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key) -> Optional[ContextState]:
        with self._lock:
            state = self._items.get(key)
            if state is None:
                self.misses += 1
                return None
            self.hits += 1
            self._items.move_to_end(key)
            return state

    def put(self, key, state: ContextState) -> None:
        with self._lock:
            self._items[key] = state
            self._items.move_to_end(key)
            while len(self._items) > 1 and self.nbytes > self.budget:
                self._items.popitem(last=False)

    def drop(self, predicate) -> None:
        with self._lock:
            for key in [k for k in self._items if predicate(k)]:
                del self._items[key]

    @property
    def nbytes(self) -> int:
        """The memory the stored states hold, pieces they share counted once."""
        return kv_storage_nbytes(s.parts for s in self._items.values())

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class SinkConfig:
    """Tokens kept for each evicted frame, as the release's ``img_head_tail`` mode: the first
    ``start`` tokens of the story, and [boi-before_boi, boi+after_boi) and [eoi-before_eoi, eoi+after_eoi) of
    each of the last ``frames`` evicted frames."""

    start: int = 4
    before_boi: int = 4
    after_boi: int = 8
    before_eoi: int = 8
    after_eoi: int = 4
    # The sink tokens of this many evicted frames stay (the most recent ones; the story's first tokens always do),
    # so the context has a fixed budget however long the story grows (StreamingLLM's sink + recent window).
    frames: int = 8


@dataclass
class Written:
    """A frame's text as written: what is shown, its ids (text, then the image block), the features its picture is
    painted from [1, n, D], and the cache entries of its text tokens (reused when the frame joins the context)."""

    text: str
    ids: list
    features: torch.Tensor = field(repr=False)
    text_kv: tuple = field(repr=False, default=())


class StoryEngine:
    def __init__(
        self,
        pipeline: SeedStoryPipeline,
        mode: str = "window",
        window: Optional[int] = None,
        kv_budget_bytes: int = 2 * 1024**3,
        sink: Optional[SinkConfig] = None,
        max_frames: Optional[int] = None,
        store: Optional["KVStore"] = None,
        lock: Optional[threading.RLock] = None,
        paint_lock: Optional[threading.Lock] = None,
    ):
        if mode not in MODES:
            raise ValueError(f"unknown context mode {mode!r}; use one of {', '.join(MODES)}")
        self.pipe = pipeline
        self.mode = mode
        self.window = window or pipeline.settings.window
        if self.window < 1:
            raise ValueError("the context window must hold at least one frame")
        self.sink = sink or SinkConfig()
        self.max_frames = max_frames or pipeline.settings.max_frames
        # Engines over the same pipeline may share one store (keys carry mode and window) and one lock
        # (one model call at a time).
        self.store = store if store is not None else KVStore(kv_budget_bytes)
        self.lock = lock if lock is not None else threading.RLock()
        # The de-tokenizer has a lock of its own, taken inside ``lock`` or alone: a picture can be painted while
        # the LLM writes the next frame (``steps``), and the two never wait on each other in a cycle.
        self.paint_lock = paint_lock if paint_lock is not None else threading.Lock()
        llm_cfg = pipeline.agent.llm.config
        self.max_positions = getattr(llm_cfg, "max_position_embeddings", None) or 4096

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def prompt(self):
        return self.pipe.prompt

    def _settings(self, settings: Optional[GenerationSettings], **changes) -> GenerationSettings:
        return (settings or self.pipe.settings).replace(**changes)

    @staticmethod
    def _new_seed() -> int:
        return random.SystemRandom().randrange(2**31)

    def _clean_text(self, text: str) -> str:
        if text is None:
            raise StoryError("the text is empty")
        cleaned = neutralize_text(text)
        if not cleaned:
            raise StoryError("the text is empty")
        if len(cleaned) > MAX_TEXT_CHARS:
            raise StoryError(f"the text is {len(cleaned)} characters long; the limit is {MAX_TEXT_CHARS}")
        return cleaned

    def _check_room(self, tree: StoryTree, parent_id: int) -> None:
        if tree.depth(parent_id) >= self.max_frames:
            raise StoryError(
                f"this story has reached the limit of {self.max_frames} frames on one path; "
                "branch from an earlier frame or start a new story"
            )

    def display_text(self, text_ids: list[int]) -> str:
        text = self.pipe.tokenizer.decode(text_ids, skip_special_tokens=True)
        text = re.sub(r"^\s*\[INST\]\s*", "", text)
        # Drop control characters and broken bytes (a half-written multi-byte character).
        return " ".join(re.sub(r"[\x00-\x1f\x7f\ufffd]", " ", text).split())

    def check_model(self, tree: StoryTree) -> None:
        """A story's token ids and features belong to the model that made it: refuse to go on with another."""
        if tree.model and tree.model != self.pipe.name:
            raise StoryError(f"this story was made with the {tree.model!r} model, and this one is {self.pipe.name!r}; "
                             f"continue it where {tree.model!r} runs, or start a new story")

    def check_story(self, tree: StoryTree) -> None:
        """A story from outside (a file, an autosave) before this model continues it: its model, and in every frame
        token ids of this vocabulary with one image block, at the end, and features of the visual tokenizer's
        shape. A file's ids reach the model as they are: an id out of range would fail deep in it (on a GPU, for
        every visitor), and image ids elsewhere would open image slots. (Other special ids can be the model's own
        output, <unk> say, and are let through.)"""
        self.check_model(tree)
        ids_of = self.prompt.image_ids
        block = [ids_of.boi, *ids_of.img, ids_of.eoi]
        vocab = len(self.pipe.tokenizer)
        control = set(ids_of.all)
        vit = self.pipe.visual_tokenizer.config
        shape = (1, vit.n_queries, vit.output_dim)
        for frame in tree.frames.values():
            ids, text = frame.token_ids, frame.token_ids[:-len(block)]
            if ids and (ids[-len(block):] != block or any(not 0 <= i < vocab or i in control for i in text)):
                raise StoryError(f"frame {frame.id} of this story holds tokens this model cannot read")
            for t in (frame.features, frame.painted_from):
                if t is not None and tuple(t.shape) != shape:
                    raise StoryError(f"frame {frame.id} of this story holds features of another shape than this "
                                     f"model's {list(shape)}")

    def _key(self, tree: StoryTree, frame_id: int):
        return (tree.uid, frame_id, self.mode, self.window)

    # -- context states ---------------------------------------------------------------------------
    def _fresh_state(self, frames: list[Frame]) -> ContextState:
        """``[BOS]`` + frames, the first in its opening form: what the release feeds every frame."""
        agent, prompt = self.pipe.agent, self.prompt
        first = frames[0]
        first_ids = first.token_ids if first.parent is None else prompt.frame_ids(first.text, first=True)
        ids = [prompt.bos_id] + first_ids
        spans = [self._span(first.id, first_ids)]
        for f in frames[1:]:
            spans.append(self._span(f.id, f.token_ids))
            ids += f.token_ids
        ids_t = torch.tensor(ids)
        feats = torch.cat([f.features for f in frames]).to(agent.device)
        logits, _, kv = agent.prefill(ids_t, feats, prompt.image_slot_mask(ids_t), start_pos=0)
        bounds = [0, 1]
        for span in spans:
            bounds.append(bounds[-1] + span[1])
        parts = KVParts(kv_slice(kv, a, b) for a, b in zip(bounds, bounds[1:]))
        return ContextState(parts=parts, logits=logits, next_pos=len(ids), n_fixed=1, spans=spans)

    def _span(self, frame_id: int, ids: list[int]) -> tuple:
        boi = ids.index(self.prompt.image_ids.boi)
        eoi = ids.index(self.prompt.image_ids.eoi)
        return (frame_id, len(ids), boi, eoi, 0)

    def _extend(self, state: ContextState, frame: Frame, text_kv: tuple = ()) -> ContextState:
        """The state after ``frame`` follows ``state``: feed its ids, then evict beyond the window. ``text_kv``: the
        cache entries of the frame's text tokens from writing it (only its image block is fed then)."""
        agent, prompt = self.pipe.agent, self.prompt
        all_ids = frame.token_ids
        if state.next_pos + len(all_ids) + 512 > self.max_positions:
            raise _NeedsRebuild()
        n_text = kv_length(text_kv)
        if n_text != len(all_ids) - len(prompt.image_ids.block):
            text_kv, n_text = (), 0  # not this frame's text (an edited or loaded frame): feed it all
        ids = torch.tensor(all_ids[n_text:])
        cache = KVWorkspace(KVParts((*state.parts, text_kv)), room=len(ids))
        n = cache.get_seq_length() - n_text
        logits, _, cache = agent.prefill(
            ids, frame.features.to(agent.device), prompt.image_slot_mask(ids), kv=cache, start_pos=state.next_pos + n_text
        )
        new = ContextState(KVParts((*state.parts, kv_slice(cache.snapshot(), n, n + len(all_ids)))), logits,
                           state.next_pos + len(all_ids), state.n_fixed,
                           state.spans + [self._span(frame.id, frame.token_ids)], state.evicted, state.sinks)
        while len(new.spans) > self.window:
            new = self._evict_oldest(new)
        return new

    def _evict_oldest(self, state: ContextState) -> ContextState:
        (fid, length, boi, eoi, keep_head), *rest = state.spans
        sinks = list(state.sinks)
        start, *pieces = state.parts
        sink_pieces, (oldest, *others) = pieces[:len(sinks)], pieces[len(sinks):]
        if self.mode == "sink":
            s = self.sink
            first = set(range(max(0, s.start - state.n_fixed))) if state.evicted == 0 else set()
            keep = set(range(keep_head)) | set(range(boi - s.before_boi, boi + s.after_boi)) | \
                set(range(eoi - s.before_eoi, eoi + s.after_eoi))
            first_local = sorted(i for i in first if 0 <= i < length)
            keep_local = sorted(i for i in keep - first if 0 <= i < length)
            spill = eoi + s.after_eoi - length
            if rest and spill > 0:
                # The tokens right after </img> open the next frame: they survive its eviction.
                f2, l2, b2, e2, h2 = rest[0]
                rest[0] = (f2, l2, b2, e2, max(h2, spill))
            if first_local:  # the story's first tokens join the entries that always stay
                start = kv_concat(KVParts((start, kv_select(oldest, first_local))))
            if keep_local:
                sink_pieces.append(kv_select(oldest, keep_local))
                sinks.append(len(keep_local))
            while len(sinks) > s.frames:  # a fixed budget: the oldest frame's sink tokens go
                sink_pieces.pop(0)
                sinks.pop(0)
        n_fixed = kv_length(start) + sum(sinks)
        return ContextState(KVParts((start, *sink_pieces, *others)), state.logits, state.next_pos, n_fixed, rest,
                            state.evicted + 1, tuple(sinks))

    def state_after(self, tree: StoryTree, frame_id: int) -> ContextState:
        """The context state right after ``frame_id``, from the store or built from the nearest cached
        ancestor (or from scratch)."""
        self.check_model(tree)
        path = tree.path(frame_id)
        if self.mode == "recompute":
            return self._fresh_state(path[-self.window:])
        key = self._key(tree, frame_id)
        state = self.store.get(key)
        if state is not None:
            return state
        # Walk up to the nearest cached ancestor, then forward again.
        start = 0
        state = None
        for i in range(len(path) - 2, -1, -1):
            state = self.store.get(self._key(tree, path[i].id))
            if state is not None:
                start = i + 1
                break
        try:
            if state is None:
                state = self._fresh_state(path[:1])
                self.store.put(self._key(tree, path[0].id), state)
                start = 1
            for frame in path[start:]:
                state = self._extend(state, frame)
                self.store.put(self._key(tree, frame.id), state)
        except _NeedsRebuild:
            # Positions would leave the trained range: restart them on the current window.
            state = self._fresh_state(path[-self.window:])
            self.store.put(key, state)
        return state

    # -- generation core ------------------------------------------------------------------------------
    def _write(
        self,
        state: ContextState,
        settings: GenerationSettings,
        seed: int,
        text: Optional[str] = None,
        progress: Optional[Progress] = None,
        should_stop: Optional[Callable[[], bool]] = None,
        recent: Sequence[Frame] = (),
    ) -> "Written":
        """Write (or take) a frame's text and compute its picture's features (``Written``). ``recent`` (the
        frames on the path up to the parent, oldest first) is what the repetition penalty (the last one) and
        ``no_repeat_captions`` (the last N) look at."""
        agent, prompt = self.pipe.agent, self.prompt
        if text is None:
            generator = torch.Generator().manual_seed(seed)
            cfg = DecodingConfig(settings.do_sample, settings.temperature, settings.top_p, settings.max_new_tokens,
                                 settings.min_new_tokens, settings.repetition_penalty, settings.repetition_scope)
            forms = prompt.word_forms() if settings.repetition_scope != "tokens" else None
            if progress:
                progress("writing text", 0.0)
            avoid = repeated_captions(recent, settings)
            penalized = self._penalized(recent[-1] if recent else None, settings)
            # k candidates in one batch when sampling (greedy would draw the same caption k times); while every
            # draw repeats a recent caption, up to CAPTION_RETRIES more, one at a time. The generator moves on, so
            # each draw is another caption; the cache is not changed by a draw.
            batch = settings.caption_candidates if settings.do_sample else 1
            drawn = []  # (repeats a recent caption, log-probability, text, result)
            for _ in range(1 + (CAPTION_RETRIES if avoid else 0)):
                for result in agent.decode_texts(state.logits, state.parts, prompt.image_ids, prompt.eos_id, cfg,
                                                 batch, generator, should_stop=should_stop, start_pos=state.next_pos,
                                                 recent=penalized, word_forms=forms):
                    text = self.display_text(result.ids)
                    drawn.append((caption_key(text) in avoid, result.logprob, text, result))
                if not all(d[0] for d in drawn) or (should_stop is not None and should_stop()):
                    break
                batch = 1
            # the likeliest caption that repeats none, a finished one before one cut at max_new_tokens (ties: the
            # first drawn)
            _, _, text, result = max(drawn, key=lambda d: (not d[0], d[3].stop != "length", d[1]))
            text_ids, kv = result.ids, result.kv
            del drawn, result  # the other draws, and the batch's buffer once kv is sliced below
        else:
            text_ids = prompt.frame_ids(text, first=False)[: -len(prompt.image_ids.block)]
            _, _, cache = agent.prefill(torch.tensor(text_ids), kv=state.parts, start_pos=state.next_pos)
            kv = cache.snapshot()
        n = kv_length(state.parts)
        text_kv = kv_slice(kv, n, n + len(text_ids))  # valid context entries: the same ids after the same prefix
        del kv
        features, _, _ = agent.image_block(KVParts((*state.parts, text_kv)), prompt.image_ids,
                                           start_pos=state.next_pos + len(text_ids))
        return Written(text, text_ids + prompt.image_ids.block, features.float().cpu(), text_kv)

    @staticmethod
    def _recent(tree: StoryTree, parent_id: int, settings: GenerationSettings) -> list[Frame]:
        """The last frames on the path to ``parent_id`` (oldest first) that the repetition controls read."""
        return tree.path(parent_id)[-max(1, settings.no_repeat_captions):]

    def _penalized(self, previous: Optional[Frame], settings: GenerationSettings) -> list[int]:
        """The previous frame's caption ids (not the prompt's own markers, which every frame repeats)."""
        if previous is None or settings.repetition_penalty == 1.0 or not previous.text.strip():
            return []
        return self.prompt.text_ids_after_image(previous.text)

    def _paint(self, features, seed, settings, progress=None) -> Image.Image:
        if progress:
            progress("painting image", 0.5)
        # The de-tokenizer counts its steps from 1: step n of n is the whole picture.
        callback = (lambda i, n: progress("painting image", 0.5 + 0.5 * i / n)) if progress else None
        with self.paint_lock:
            return self.pipe.paint(features, seed=seed, settings=settings, callback=callback)

    def _add(self, tree: StoryTree, parent: Optional[int], text, image, features, token_ids, seed, settings, origin,
             select=True) -> Frame:
        """``features``: what the picture was painted from (the opening: its picture's); the context takes them,
        or with ``settings.context_from == "picture"`` the painted picture read back by the visual tokenizer."""
        painted_from = None
        if parent is not None and image is not None and settings.context_from == "picture":
            painted_from, features = features, self.pipe.encode_image(image)
        frame = Frame(id=tree.new_id(), parent=parent, text=text, image=image, features=features,
                      painted_from=painted_from, token_ids=token_ids, seed=seed, settings=asdict(settings),
                      origin=origin)
        return tree.add(frame, select=select)

    # -- operations -------------------------------------------------------------------------------------
    def start(self, image: ImageInput, text: str, tree: Optional[StoryTree] = None) -> StoryTree:
        """A new story (or a new opening in ``tree``) from the person's picture and text."""
        image = load_image(image)
        text = self._clean_text(text)
        ids = self.prompt.frame_ids(text, first=True)
        if len(ids) + 1 > self.max_positions // 2:
            raise StoryError("the opening text is too long for this model")
        if tree is not None:
            self.check_model(tree)
        with self.lock:
            features = self.pipe.encode_image(image)
        if tree is None:
            tree = StoryTree()
            tree.model = self.pipe.name
        self._add(tree, None, text, image, features, ids, None, self.pipe.settings, "opening")
        return tree

    def step(
        self,
        tree: StoryTree,
        frame_id: Optional[int] = None,
        settings: Optional[GenerationSettings] = None,
        seed: Optional[int] = None,
        progress: Optional[Progress] = None,
        should_stop: Optional[Callable[[], bool]] = None,
        origin: str = "generated",
    ) -> Frame:
        """Write and paint the next frame after ``frame_id`` (default: the current frame)."""
        parent = tree.get(tree.current if frame_id is None else frame_id)
        self._check_room(tree, parent.id)
        settings = self._settings(settings)
        seed = settings.seed if seed is None else seed
        with self.lock:
            state, w = self._write_after(tree, parent.id, settings, seed, progress, should_stop)
            image = self._paint(w.features, seed, settings, progress)
            frame = self._add(tree, parent.id, w.text, image, w.features, w.ids, seed, settings, origin)
            self._remember(tree, state, frame, w.text_kv)
        return frame

    def steps(
        self,
        tree: StoryTree,
        n: int,
        frame_id: Optional[int] = None,
        settings: Optional[GenerationSettings] = None,
        seed: Optional[int] = None,
        progress: Optional[Progress] = None,
        should_stop: Optional[Callable[[], bool]] = None,
    ) -> Iterator[tuple[str, Frame]]:
        """``n`` frames after ``frame_id`` (default: the current one), yielding ``("written", frame)`` when a frame's
        text is in the tree (its ``image`` still None) and ``("painted", frame)`` when its picture is.

        With ``context_from: features`` (the release's way) the next frame's text needs only this frame's
        features, so the text runs ahead of the painter: the LLM writes frame k+1 while a second thread paints
        frame k, and n frames cost about the slower of the two instead of their sum. With ``picture`` the next
        text reads the painted picture, so each frame is written and painted in turn (``step``). ``should_stop``
        ends the writing; frames already written are still painted."""
        settings = self._settings(settings)
        parent = tree.get(tree.current if frame_id is None else frame_id)
        # The painter runs alone only where it touches nothing the writer moves or uses: the de-tokenizer not moved
        # in and out by CPU offload, and one candidate (several are ranked by the visual tokenizer).
        moved = self.pipe.offload_device is not None and self.pipe.detokenizer_device is None
        if settings.context_from != "features" or moved or settings.candidates > 1:
            for _ in range(n):
                if should_stop is not None and should_stop():
                    return
                parent = self.step(tree, parent.id, settings, seed, progress, should_stop)
                yield "written", parent
                yield "painted", parent
            return
        seed = settings.seed if seed is None else seed
        with self.lock:
            self.pipe.negative_features()  # computed once, by the visual tokenizer, before the painter starts
        jobs: queue.Queue = queue.Queue()
        done: queue.Queue = queue.Queue()

        def paint_all() -> None:
            # On a GPU the painter's kernels go to a stream of their own, so they overlap the writer's.
            unet = self.pipe.detokenizer.unet
            stream = torch.cuda.Stream(device=unet.device) if unet.device.type == "cuda" else None
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                while (job := jobs.get()) is not None:
                    try:
                        done.put((job, self._paint(job.paint_features, job.seed, settings)))
                    except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
                        done.put((job, e))

        painter = threading.Thread(target=paint_all, name="seedstory-painter", daemon=True)
        painter.start()
        pending = 0

        def finished(block: bool, limit: Optional[int] = None) -> Iterator[tuple[str, Frame]]:
            nonlocal pending
            while pending and limit != 0:
                try:
                    frame, image = done.get(block=block)
                except queue.Empty:
                    return
                pending -= 1
                limit = None if limit is None else limit - 1
                if isinstance(image, BaseException):
                    raise image
                frame.image = image
                yield "painted", frame

        try:
            for i in range(n):
                # One frame ahead at most (one painting, one waiting): enough to overlap the two, and a Stop
                # leaves at most that frame to paint.
                while pending >= 2:
                    yield from finished(block=True, limit=1)
                if should_stop is not None and should_stop():
                    break
                self._check_room(tree, parent.id)
                with self.lock:
                    state, w = self._write_after(tree, parent.id, settings, seed, progress, should_stop)
                    frame = self._add(tree, parent.id, w.text, None, w.features, w.ids, seed, settings, "generated")
                    self._remember(tree, state, frame, w.text_kv)
                jobs.put(frame)
                pending += 1
                yield "written", frame
                yield from finished(block=False)
                parent = frame
            yield from finished(block=True)
        finally:
            jobs.put(None)
            painter.join()
            while not done.empty():  # the writer stopped early (an error, a closed generator): keep what was painted
                frame, image = done.get()
                if not isinstance(image, BaseException):
                    frame.image = image

    def _write_after(self, tree, parent_id, settings, seed, progress, should_stop) -> tuple[ContextState, Written]:
        """The context after ``parent_id`` and the next frame's text written on it (call under ``lock``)."""
        state = self.state_after(tree, parent_id)
        return state, self._write(state, settings, seed, progress=progress, should_stop=should_stop,
                                  recent=self._recent(tree, parent_id, settings))

    def _remember(self, tree: StoryTree, parent_state: ContextState, frame: Frame, text_kv: tuple = ()) -> None:
        if self.mode == "recompute":
            return
        try:
            self.store.put(self._key(tree, frame.id), self._extend(parent_state, frame, text_kv))
        except _NeedsRebuild:
            pass  # built on demand by state_after

    def regenerate(
        self,
        tree: StoryTree,
        frame_id: int,
        part: str = "both",
        seed: Optional[int] = None,
        settings: Optional[GenerationSettings] = None,
        progress: Optional[Progress] = None,
    ) -> Frame:
        """A new sibling that replaces ``frame_id`` on the current path.

        ``part="image"`` repaints the same features with another seed; ``"text"`` writes new text
        (sampling, so it differs) and repaints with the frame's seed; ``"both"`` changes both."""
        if part not in ("text", "image", "both"):
            raise StoryError("part must be 'text', 'image' or 'both'")
        old = tree.get(frame_id)
        if old.parent is None:
            raise StoryError("the opening frame is your own picture and text: edit its text or branch from it instead")
        seed = self._new_seed() if seed is None else seed
        settings = self._settings(settings)
        with self.lock:
            if part == "image":
                image = self._paint(old.paint_features, seed, settings, progress)
                frame = self._add(tree, old.parent, old.text, image, old.paint_features, list(old.token_ids), seed,
                                  settings, "regenerated")
                cached = self.store.get(self._key(tree, old.id))
                if cached is not None and torch.equal(frame.features, old.features):  # the same context
                    self.store.put(self._key(tree, frame.id), cached)
                return frame
            sample = settings if settings.do_sample else settings.replace(do_sample=True)
            state = self.state_after(tree, old.parent)
            w = self._write(state, sample, seed, progress=progress, recent=self._recent(tree, old.parent, sample))
            paint_seed = old.seed if part == "text" and old.seed is not None else seed
            image = self._paint(w.features, paint_seed, settings, progress)
            frame = self._add(tree, old.parent, w.text, image, w.features, w.ids, paint_seed, sample, "regenerated")
            self._remember(tree, state, frame, w.text_kv)
        return frame

    def edit_text(
        self,
        tree: StoryTree,
        frame_id: int,
        text: str,
        seed: Optional[int] = None,
        settings: Optional[GenerationSettings] = None,
        progress: Optional[Progress] = None,
    ) -> Frame:
        """A sibling of ``frame_id`` with the person's text; its picture follows from the new text
        (the opening frame keeps the person's picture)."""
        old = tree.get(frame_id)
        text = self._clean_text(text)
        settings = self._settings(settings)
        with self.lock:
            if old.parent is None:
                ids = self.prompt.frame_ids(text, first=True)
                return self._add(tree, None, text, old.image, old.features, ids, None, settings, "edited")
            return self._child_with_text(tree, old.parent, text, old.seed if seed is None else seed, settings,
                                         progress, "edited")

    def branch(
        self,
        tree: StoryTree,
        frame_id: int,
        text: Optional[str] = None,
        seed: Optional[int] = None,
        settings: Optional[GenerationSettings] = None,
        progress: Optional[Progress] = None,
    ) -> Frame:
        """Another child of ``frame_id`` next to the existing ones: with the person's text, or written
        by the model (sampling with a fresh seed, so it differs from its siblings)."""
        self._check_room(tree, frame_id)
        seed = self._new_seed() if seed is None else seed
        settings = self._settings(settings)
        if text is None:
            sample = settings if settings.do_sample else settings.replace(do_sample=True)
            return self.step(tree, frame_id, sample, seed, progress, origin="branch")
        text = self._clean_text(text)
        with self.lock:
            return self._child_with_text(tree, frame_id, text, seed, settings, progress, "branch")

    def _child_with_text(self, tree, parent_id, text, seed, settings, progress, origin) -> Frame:
        state = self.state_after(tree, parent_id)
        w = self._write(state, settings, seed, text=text, progress=progress)
        image = self._paint(w.features, seed, settings, progress)
        frame = self._add(tree, parent_id, w.text, image, w.features, w.ids, seed, settings, origin)
        self._remember(tree, state, frame, w.text_kv)
        return frame

    def add_given(self, tree: StoryTree, parent_id: int, image: ImageInput, text: str) -> Frame:
        """A frame whose picture and text are given (a real story's next frame), after ``parent_id``: its
        context is the picture's own features, as the opening's is."""
        self._check_room(tree, parent_id)
        image, text = load_image(image), self._clean_text(text)
        ids = self.prompt.frame_ids(text, first=False)
        with self.lock:
            features = self.pipe.encode_image(image)
            return self._add(tree, parent_id, text, image, features, ids, None, self.pipe.settings, "given")

    def draft_text(self, tree: StoryTree, frame_id: int, seed: int,
                   settings: Optional[GenerationSettings] = None) -> str:
        """The text the model would write after ``frame_id`` with ``seed`` (nothing painted, nothing added)."""
        settings = self._settings(settings)
        with self.lock:
            state = self.state_after(tree, frame_id)
            text = self._write(state, settings, seed, recent=self._recent(tree, frame_id, settings)).text
        return text

    def delete(self, tree: StoryTree, frame_id: int) -> list[int]:
        return sorted(f.id for f in self.detach(tree, frame_id).frames)

    def detach(self, tree: StoryTree, frame_id: int) -> Detached:
        """Delete a frame and what follows it, returning them for ``StoryTree.reattach`` (undo)."""
        kept = tree.detach(frame_id)
        doomed = {f.id for f in kept.frames}
        self.store.drop(lambda key: key[0] == tree.uid and key[1] in doomed)
        return kept


class _NeedsRebuild(Exception):
    pass


def caption_key(text: str) -> str:
    """What two captions must share to count as the same: their words, ignoring case and spacing."""
    return " ".join(text.split()).lower()


def repeated_captions(recent: Sequence[Frame], settings: GenerationSettings) -> set[str]:
    """The captions a new one may not repeat: the last ``no_repeat_captions`` of ``recent``, compared
    case- and whitespace-insensitively. Empty when off or when decoding is greedy (a new draw would be the
    same caption)."""
    n = settings.no_repeat_captions
    if n <= 0 or not settings.do_sample:
        return set()
    return {caption_key(f.text) for f in recent[-n:] if f.text.strip()}
