"""One holder per process for the loaded models: loads a preset once (lazily, thread-safe), serves
every story, switches presets (freeing the old models) and reports what is loaded where."""
from __future__ import annotations

import gc
import threading
import time
from typing import Optional

import torch

from .engine import KVStore, StoryEngine
from .pipeline import SeedStoryPipeline


def _progress(fetching: dict) -> str:
    done, total = fetching["done"], fetching["total"]
    if not total:
        return fetching["what"]
    return f"{done / 2**30:.1f} of {total / 2**30:.1f} GiB ({100 * done / total:.0f}%), {fetching['what']}"


def _module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


class ModelHolder:
    def __init__(self, preset: str = "tiny", overrides: Optional[list[str]] = None, kv_budget_bytes: int = 2 * 1024**3):
        self.preset = preset
        self.overrides = list(overrides or [])
        self.kv_budget_bytes = kv_budget_bytes
        self._pipe: Optional[SeedStoryPipeline] = None
        self._engines: dict = {}
        self._store: Optional[KVStore] = None
        self._load_lock = threading.Lock()
        self.model_lock = threading.RLock()  # serializes model calls across all engines
        self.paint_lock = threading.Lock()  # the de-tokenizer's: a picture is painted while the LLM writes on
        self.load_seconds: Optional[float] = None
        self.error: Optional[str] = None
        self.fetching: Optional[dict] = None  # while ``fetch_and_load`` runs: {"done", "total", "what"} in bytes

    @property
    def loaded(self) -> bool:
        return self._pipe is not None

    def fetch_in_background(self) -> threading.Thread:
        """``fetch_and_load`` in a daemon thread; ``fetching`` is set before this returns."""
        self.fetching = {"done": 0, "total": 0, "what": "listing the files"}
        thread = threading.Thread(target=self.fetch_and_load, name="seedstory-fetch", daemon=True)
        thread.start()
        return thread

    def fetch_and_load(self) -> None:
        """Fetch what the preset (a release preset) still lacks from the Hub (``seedstory.download``), then load
        it; meanwhile ``describe`` shows the progress and model calls say the weights are on their way. Meant for
        a thread at start-up; a failure is kept in ``error`` (shown with the doctor's report), never raised."""
        from .config import load_preset
        from .download import download_release

        self.fetching = {"done": 0, "total": 0, "what": "listing the files"}

        def progress(done: int, total: int, what: str) -> None:
            self.fetching = {"done": done, "total": total, "what": what}

        try:
            cfg = load_preset(self.preset, self.overrides)
            if cfg.get("source") == "release":
                download_release(cfg, progress=progress)
        except Exception as e:  # noqa: BLE001 - shown to visitors in place of the model
            self.error = f"fetching the weights failed: {e}"
            return
        finally:
            self.fetching = None
        try:
            self.pipeline()
        except Exception:  # noqa: BLE001 - recorded in self.error
            pass

    def pipeline(self) -> SeedStoryPipeline:
        """The loaded pipeline, loading the preset on first use (once, even under concurrent calls)."""
        fetching = self.fetching
        if fetching is not None:
            from .config import PresetError

            raise PresetError(f"the model's weights are still being fetched ({_progress(fetching)}); try again "
                              "when they are in")
        if self._pipe is None:
            with self._load_lock:
                if self._pipe is None:
                    start = time.perf_counter()
                    try:
                        self._pipe = SeedStoryPipeline.from_preset(self.preset, self.overrides)
                        self.error = None
                    except Exception as e:
                        self.error = str(e)
                        raise
                    self._store = KVStore(self.kv_budget_bytes)
                    self.load_seconds = time.perf_counter() - start
        return self._pipe

    def engine(self, mode: str = "window", window: Optional[int] = None) -> StoryEngine:
        pipe = self.pipeline()
        key = (mode, window or pipe.settings.window)
        with self._load_lock:
            if key not in self._engines:
                self._engines[key] = StoryEngine(pipe, mode=mode, window=key[1], store=self._store,
                                                 lock=self.model_lock, paint_lock=self.paint_lock)
            return self._engines[key]

    def forget(self, story_uid: str) -> None:
        """Drop the cached context states of one story (its visitor has gone)."""
        if self._store is not None:
            self._store.drop(lambda key: key[0] == story_uid)

    def switch(self, preset: str, overrides: Optional[list[str]] = None) -> SeedStoryPipeline:
        """Load another preset; the old models are freed first so both never sit in memory at once."""
        with self.model_lock, self.paint_lock:
            with self._load_lock:
                self._pipe, self._engines, self._store = None, {}, None
                self.preset, self.overrides = preset, list(overrides or [])
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return self.pipeline()

    def status(self) -> dict:
        """What is loaded, on which device, using how much memory."""
        info = {"preset": self.preset, "loaded": self.loaded, "error": self.error}
        if self._pipe is None:
            return info
        pipe = self._pipe
        parts = {"visual_tokenizer": pipe.visual_tokenizer, "agent": pipe.agent, "detokenizer": pipe.detokenizer}
        info.update(
            name=pipe.name,
            device=str(pipe.device),
            dtype=str(pipe.agent.dtype).replace("torch.", ""),
            parameters={k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()},
            weight_bytes={k: _module_bytes(m) for k, m in parts.items()},
            kv_cache_bytes=self._store.nbytes if self._store else 0,
            kv_cache_states=len(self._store) if self._store else 0,
            load_seconds=round(self.load_seconds or 0.0, 2),
        )
        if pipe.device.type == "cuda":
            info["cuda_allocated_bytes"] = torch.cuda.memory_allocated(pipe.device)
            info["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(pipe.device)
        return info

    def describe(self) -> str:
        fetching = self.fetching
        if fetching is not None:
            return f"{self.preset}: fetching the weights from the Hugging Face Hub: {_progress(fetching)}"
        s = self.status()
        if not s["loaded"]:
            return f"{s['preset']}: not loaded" + (f" ({s['error']})" if s.get("error") else "")
        total = sum(s["parameters"].values())
        mem = sum(s["weight_bytes"].values())
        return (f"{s['name']} on {s['device']} ({s['dtype']}): {total / 1e6:.1f} M parameters, "
                f"{mem / 2**20:.0f} MiB weights, {s['kv_cache_bytes'] / 2**20:.1f} MiB cached context")
