"""Fetch the files a release preset needs from the Hugging Face Hub into its ``release.root``.

    python -m seedstory download --preset seed-story-george [--to DIR]

Only the files the preset names, never whole repositories: the agent, de-tokenizer and tokenizer folder from
TencentARC/SEED-Story; SDXL base's UNet, VAE and scheduler files; the Llama-2 base's config and weight index
(and its weight shards only when the agent file lacks those weights); the Qwen-VL-Chat shards that hold the
visual encoder, which ``extract-vit`` turns into ``visual_tokenizer/qwen_vit_G.safetensors`` before they are
deleted. Nothing is fetched when every file is already there (not even a request to the Hub).

Each file is written to ``<file>.part`` first and appended to on the next run, so an interrupted download
resumes where it stopped; a finished file is checked against the hash the Hub lists for it (sha256 for
large files, the git blob id for small ones) before it takes its place, and a mismatch is deleted and
reported. The free disk space is checked before anything is fetched. A gated repository (Llama-2) needs the
token in ``HF_TOKEN``; it is only ever sent to the Hub, never printed. ``HF_ENDPOINT`` picks another Hub.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from typing import Callable, Optional

from .checkpoints.files import CheckpointError
from .checkpoints.layout import RELEASE_FILES
from .checkpoints.qwen_vl import INDEXES as QWEN_INDEXES
from .checkpoints.release import (missing_release_files, plain_config, release_agent_config, release_entries,
                                  release_paths, release_root)
from .checkpoints.release_agent import LLAMA_WEIGHTS, base_shards_needed
from .checkpoints.release_detokenizer import DIFFUSERS_WEIGHTS

Progress = Callable[[int, int, str], None]  # (bytes done, bytes to fetch in all, what is being fetched)
STAGING = ".download"  # under the release root: Qwen-VL-Chat's shards until the visual encoder is extracted
_CHUNK = 8 * 1024 * 1024


class DownloadError(RuntimeError):
    """A download that cannot go on; the message says what to do. Files already fetched are kept."""


@dataclass(frozen=True)
class HubFile:
    """One file of a Hub repository and where it goes."""

    repo_id: str
    path: str  # in the repository
    dest: str  # absolute local path
    size: int
    sha256: Optional[str]  # large (LFS) files
    blob_id: Optional[str]  # small files: git's blob sha1
    revision: str  # the commit it is fetched at
    gated: bool = False

    @property
    def part(self) -> str:
        return self.dest + ".part"

    def fetched(self) -> int:
        """Bytes already on disk (a finished file, or a resumable ``.part``)."""
        if os.path.isfile(self.dest):
            return self.size
        return os.path.getsize(self.part) if os.path.isfile(self.part) else 0


def _hub_token() -> Optional[str]:
    return os.environ.get("HF_TOKEN") or None


def _endpoint(endpoint: Optional[str]) -> Optional[str]:
    return (endpoint or os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None


class Hub:
    """The Hub repositories one download reads: each listed once (commit and file sizes and hashes), at one
    commit for the whole download."""

    def __init__(self, endpoint: Optional[str] = None, token: Optional[str] = None):
        from huggingface_hub import HfApi, constants

        if constants.is_offline_mode():
            raise DownloadError("offline mode is on (HF_HUB_OFFLINE=1): run the download with HF_HUB_OFFLINE=0")
        self.endpoint = _endpoint(endpoint)
        self.token = token
        self.api = HfApi(endpoint=self.endpoint, token=token or False)
        self._repos: dict[str, tuple[str, dict]] = {}

    def listing(self, repo_id: str) -> tuple[str, dict]:
        """``(commit, {path: sibling})`` of a model repository."""
        if repo_id not in self._repos:
            from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

            try:
                info = self.api.model_info(repo_id, files_metadata=True, token=self.token or False)
            except GatedRepoError as e:
                raise self.gated(repo_id) from e
            except RepositoryNotFoundError as e:
                raise DownloadError(f"{repo_id}: no such repository on {self.where()} (or it is private)") from e
            except (HfHubHTTPError, OSError) as e:
                raise DownloadError(f"{repo_id}: could not list its files on {self.where()}: {_short(e)}") from e
            self._repos[repo_id] = (info.sha, {s.rfilename: s for s in info.siblings or []})
        return self._repos[repo_id]

    def gated(self, repo_id: str) -> DownloadError:
        how = ("set HF_TOKEN to a Hugging Face token of an account that has accepted it" if not self.token else
               "the token in HF_TOKEN was refused: accept the licence on the repository's page with that account, "
               "or use a token of one that has")
        return DownloadError(f"{repo_id} is gated: {how} (https://huggingface.co/{repo_id})")

    def where(self) -> str:
        return self.endpoint or "the Hugging Face Hub"

    def file(self, repo_id: str, path: str, dest: str, gated: bool = False) -> HubFile:
        sha, files = self.listing(repo_id)
        if path not in files:
            near = sorted(p for p in files if os.path.basename(p) == os.path.basename(path))
            hint = f"; files with that name: {', '.join(near[:5])}" if near else ""
            raise DownloadError(f"{repo_id} has no {path} (at commit {sha[:10]}){hint}")
        s = files[path]
        size = s.size if s.size is not None else (s.lfs.size if s.lfs else 0)
        return HubFile(repo_id, path, dest, int(size or 0), s.lfs.sha256 if s.lfs else None, s.blob_id, sha, gated)

    def files_under(self, repo_id: str, folder: str) -> list[str]:
        _, files = self.listing(repo_id)
        return sorted(p for p in files if p.startswith(folder.rstrip("/") + "/"))

    def first_present(self, repo_id: str, names) -> Optional[str]:
        _, files = self.listing(repo_id)
        return next((n for n in names if n in files), None)

    def check_access(self, repo_id: str) -> None:
        """Ask for one file's metadata: a gated repository without an accepted licence or token fails here,
        before anything is fetched."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

        sha, files = self.listing(repo_id)
        first = min(files, default="config.json")
        try:
            get_hf_file_metadata(hf_hub_url(repo_id, first, revision=sha, endpoint=self.endpoint),
                                 token=self.token or False)
        except GatedRepoError as e:
            raise self.gated(repo_id) from e
        except (HfHubHTTPError, OSError) as e:
            raise DownloadError(f"{repo_id}/{first}: {_short(e)}") from e

    def fetch(self, f: HubFile, progress: Callable[[int], None]) -> None:
        """Fetch ``f`` into ``f.part`` (appending to what an earlier run left there), check its hash and move it
        into place. ``progress(n)`` is called with each chunk's size."""
        from huggingface_hub import hf_hub_url
        from huggingface_hub.errors import GatedRepoError, HfHubHTTPError
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import build_hf_headers

        os.makedirs(os.path.dirname(f.dest), exist_ok=True)
        have = os.path.getsize(f.part) if os.path.isfile(f.part) else 0
        if have > f.size:
            os.remove(f.part)
            have = 0
        url = hf_hub_url(f.repo_id, f.path, revision=f.revision, endpoint=self.endpoint)
        headers = build_hf_headers(token=self.token or False)
        headers["Accept-Encoding"] = "identity"
        try:
            with open(f.part, "ab") as out:
                http_get(url, out, resume_size=have, headers=headers, expected_size=f.size,
                         tqdm_class=_forwarding_bar(progress))
        except GatedRepoError as e:
            raise self.gated(f.repo_id) from e
        except (HfHubHTTPError, OSError) as e:
            raise DownloadError(f"{f.repo_id}/{f.path}: the download stopped ({_short(e)}); run the command again "
                                "to resume it") from e
        problem = verify(f, f.part)
        if problem:
            os.remove(f.part)
            raise DownloadError(f"{f.repo_id}/{f.path}: {problem}; the corrupted download was deleted, run the "
                                "command again")
        os.replace(f.part, f.dest)


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _forwarding_bar(progress: Callable[[int], None]):
    """A tqdm class for ``http_get`` that draws nothing and passes each chunk's size to ``progress``: the
    download shows one bar for all its files, not one per file."""
    from tqdm.auto import tqdm

    class Forward(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            progress(int(n or 0))

    return Forward


def verify(f: HubFile, path: str) -> Optional[str]:
    """None when ``path`` holds exactly what the Hub lists for ``f``; otherwise what is wrong."""
    size = os.path.getsize(path)
    if size != f.size:
        return f"{size:,} bytes instead of the {f.size:,} the Hub lists"
    if f.sha256:
        digest = hashlib.sha256()
    elif f.blob_id:
        digest = hashlib.sha1(f"blob {size}\0".encode())
    else:
        return None
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    want = f.sha256 or f.blob_id
    if digest.hexdigest() != want:
        kind = "sha256" if f.sha256 else "git blob id"
        return f"its {kind} is {digest.hexdigest()[:12]}…, the Hub lists {want[:12]}…"
    return None


# -- what a preset needs -------------------------------------------------------------------------------------

def _repo_of(entry) -> str:
    if not entry.hub_repo:
        raise DownloadError(f"{entry.what}: no Hub repository is known for it; get it from {entry.source}")
    return entry.hub_repo


def plan_files(cfg, hub: Hub) -> list[HubFile]:
    """The files still missing for ``cfg`` (a release preset), except the Llama weight shards, which depend on
    what the agent file holds (``llama_shards``)."""
    paths, entries = release_paths(cfg), release_entries(cfg)
    root = release_root(cfg)
    out: list[HubFile] = []

    def add(repo, path, dest, gated=False):
        if not os.path.isfile(dest):
            out.append(hub.file(repo, path, dest, gated))

    tok = entries["tokenizer"]
    tok_files = hub.files_under(_repo_of(tok), tok.path)
    if not tok_files:
        raise DownloadError(f"{tok.hub_repo} has no {tok.path}/ folder")
    for path in tok_files:
        add(tok.hub_repo, path, os.path.join(paths["tokenizer"], os.path.relpath(path, tok.path)))

    llama = entries["llm_base"]
    add(_repo_of(llama), "config.json", os.path.join(paths["llm_base"], "config.json"), llama.gated)
    index = hub.first_present(llama.hub_repo, [i for i, _ in LLAMA_WEIGHTS])
    if index:
        add(llama.hub_repo, index, os.path.join(paths["llm_base"], index), llama.gated)

    sdxl = entries["sdxl_base"]
    for part in ("unet", "vae"):
        add(_repo_of(sdxl), f"{part}/config.json", os.path.join(paths["sdxl_base"], part, "config.json"))
        if not any(os.path.isfile(os.path.join(paths["sdxl_base"], part, w)) for w in DIFFUSERS_WEIGHTS):
            weights = hub.first_present(sdxl.hub_repo, [f"{part}/{w}" for w in DIFFUSERS_WEIGHTS])
            if weights is None:
                raise DownloadError(f"{sdxl.hub_repo} has no {part} weights ({', '.join(DIFFUSERS_WEIGHTS)})")
            add(sdxl.hub_repo, weights, os.path.join(paths["sdxl_base"], weights))
    add(sdxl.hub_repo, "scheduler/scheduler_config.json",
        os.path.join(paths["sdxl_base"], "scheduler", "scheduler_config.json"))

    for key in ("agent", "detokenizer"):
        e = entries[key]
        add(_repo_of(e), e.path, paths[key])

    if not os.path.isfile(paths["visual_tokenizer"]):
        out.extend(qwen_shards(hub, os.path.join(root, STAGING, "Qwen-VL-Chat")))
    return out


def qwen_shards(hub: Hub, staging: str) -> list[HubFile]:
    """Qwen-VL-Chat's weight index and the shards that hold ``transformer.visual.*`` (read from the index,
    fetched first)."""
    import json

    from .checkpoints.qwen_vl import VISUAL_PREFIX

    repo = _repo_of(RELEASE_FILES["visual_tokenizer"])
    index = hub.first_present(repo, QWEN_INDEXES)
    if index is None:
        raise DownloadError(f"{repo} has no weight index ({', '.join(QWEN_INDEXES)})")
    index_file = hub.file(repo, index, os.path.join(staging, index))
    if not os.path.isfile(index_file.dest):
        hub.fetch(index_file, lambda n: None)
    try:
        with open(index_file.dest) as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise DownloadError(f"{repo}/{index}: not a weight index ({_short(e)})") from e
    shards = sorted({v for k, v in weight_map.items() if k.startswith(VISUAL_PREFIX)})
    if not shards:
        raise DownloadError(f"{repo}/{index}: lists no {VISUAL_PREFIX}* tensors")
    return [hub.file(repo, s, os.path.join(staging, s)) for s in shards if not os.path.isfile(os.path.join(staging, s))]


def llama_shards(cfg, hub: Hub) -> list[HubFile]:
    """The Llama-2 base weight files the downloaded agent file does not carry (none for a full agent file)."""
    paths, llama = release_paths(cfg), release_entries(cfg)["llm_base"]
    repo = _repo_of(llama)
    need = base_shards_needed(paths["agent"], paths["llm_base"], release_agent_config(cfg))
    if need is None:  # no index: the repository's single weights file
        single = hub.first_present(repo, [w for _, w in LLAMA_WEIGHTS])
        if single is None:
            raise DownloadError(f"{repo} has neither a weight index nor a single weights file")
        need = [os.path.join(paths["llm_base"], single)]
    return [hub.file(repo, os.path.relpath(dest, paths["llm_base"]).replace(os.sep, "/"), dest, llama.gated)
            for dest in need if not os.path.isfile(dest)]


# -- the download --------------------------------------------------------------------------------------------

def check_disk(files: list[HubFile], root: str) -> None:
    """Refuse before fetching when ``root``'s disk cannot hold what is left to fetch of ``files``."""
    todo = sum(f.size - f.fetched() for f in files)
    probe = root
    while not os.path.isdir(probe):
        probe = os.path.dirname(probe) or "."
    free = shutil.disk_usage(probe).free
    if todo > free:
        raise DownloadError(f"{_gib(todo)} to fetch but only {_gib(free)} free on the disk of {root}: free some "
                            "space or pass another folder (--to DIR)")


def _gib(n: int) -> str:
    return f"{n / 1024 ** 3:.1f} GiB"


def download_release(preset, to: Optional[str] = None, *, endpoint: Optional[str] = None,
                     progress: Optional[Progress] = None, log: Callable[[str], None] = print) -> dict:
    """Fetch what ``preset`` (a name, YAML path or config of a ``source: release`` preset) still lacks into
    ``to`` (default: its ``release.root``). Returns the preset's config with ``release.root`` set to the folder
    used, ready for ``SeedStoryPipeline.from_preset``/the doctor. Raises DownloadError (or CheckpointError for
    a downloaded file the loaders refuse)."""
    from .config import load_preset

    cfg = plain_config(load_preset(preset) if isinstance(preset, str) else preset)
    if cfg.get("source") != "release":
        raise DownloadError(f"preset {cfg.get('name')!r} is not a release preset: it needs no download")
    if to:
        cfg["release"] = {**(cfg.get("release") or {}), "root": os.path.abspath(to)}
    root = release_root(cfg)
    if not missing_release_files(cfg):
        log(f"every file of {cfg.get('name')} is already in {root}: nothing fetched")
        return cfg
    hub = Hub(endpoint, _hub_token())
    for repo in sorted({e.hub_repo for e in release_entries(cfg).values() if e.gated and e.hub_repo}):
        hub.check_access(repo)
    files = plan_files(cfg, hub)
    llama_bytes = _llama_weight_bytes(cfg, hub)
    check_disk(files, root)
    state = {"done": sum(f.fetched() for f in files), "total": sum(f.size for f in files)}
    log(f"fetching {len(files)} file(s), {_gib(state['total'] - state['done'])} into {root}"
        + (f" (and up to {_gib(llama_bytes)} of Llama-2 weights if the agent file lacks them)" if llama_bytes else ""))

    def fetch_all(batch: list[HubFile]) -> None:
        for f in batch:
            if not os.path.isfile(f.dest):
                hub.fetch(f, lambda n, what=f.path: step(n, what))

    def step(n: int, what: str) -> None:
        state["done"] += n
        if progress is not None:
            progress(state["done"], state["total"], what)

    fetch_all(files)
    shards = llama_shards(cfg, hub)
    if shards:
        check_disk(shards, root)
        state["total"] += sum(f.size for f in shards)
        state["done"] += sum(f.fetched() for f in shards)
        log(f"the agent file lacks Llama-2's base weights: fetching {len(shards)} more file(s)")
        fetch_all(shards)
    _extract_vit(cfg, root)
    return cfg


def _llama_weight_bytes(cfg, hub: Hub) -> int:
    """The size of the Llama-2 base weights (from its index), or 0 when the agent file is already checked."""
    paths = release_paths(cfg)
    if os.path.isfile(paths["agent"]):
        return 0
    repo = release_entries(cfg)["llm_base"].hub_repo
    _, files = hub.listing(repo)
    index = hub.first_present(repo, [i for i, _ in LLAMA_WEIGHTS])
    prefix = "model" if index and index.startswith("model.") else "pytorch_model"
    return sum(int(s.size or 0) for p, s in files.items() if "/" not in p and p.startswith(prefix)
               and not p.endswith(".json"))


def _extract_vit(cfg, root: str) -> None:
    from .checkpoints.qwen_vl import extract_qwen_vit

    target = release_paths(cfg)["visual_tokenizer"]
    staging = os.path.join(root, STAGING, "Qwen-VL-Chat")
    if os.path.isfile(target) or not os.path.isdir(staging):
        return
    try:
        extract_qwen_vit(staging, os.path.dirname(target), vit_config=cfg.get("visual_tokenizer") or {})
    except CheckpointError as e:
        raise DownloadError(f"the visual encoder could not be extracted from Qwen-VL-Chat's shards: {e}") from e
    shutil.rmtree(os.path.join(root, STAGING), ignore_errors=True)


__all__ = ["DownloadError", "Hub", "HubFile", "check_disk", "download_release", "plan_files", "verify"]
