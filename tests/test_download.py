"""``seedstory download`` against a stand-in Hub on 127.0.0.1 (tests/hub_standin.py) serving tiny fakes of the
released files in their repositories' layouts, fetched by the real ``huggingface_hub`` client."""
from __future__ import annotations

import os

import pytest

from fake_release import VIT, make_fake_qwen_vl_chat, make_fake_release, write_llama_base
from hub_standin import HubStandIn

SEED_STORY = "TencentARC/SEED-Story"
LLAMA = "meta-llama/Llama-2-7b-hf"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
QWEN = "Qwen/Qwen-VL-Chat"
AGENT = "seed_story/george_sft/pytorch_model.bin"


def _files(folder: str, prefix: str = "") -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(folder):
        for n in names:
            path = os.path.join(dirpath, n)
            rel = os.path.relpath(path, folder).replace(os.sep, "/")
            with open(path, "rb") as f:
                out[prefix + rel] = f.read()
    return out


def _repos(tmp, agent_variant="full", llama_layout="safetensors"):
    """The fake release's files as the Hub's repositories hold them, plus files no preset needs."""
    fake = make_fake_release(str(tmp / "src"), agent_variant=agent_variant)
    p = fake["paths"]
    if llama_layout != "safetensors":
        from transformers import LlamaForCausalLM

        llm = LlamaForCausalLM.from_pretrained(p["llm_base"])
        p["llm_base"] = str(tmp / "llama-resharded")
        write_llama_base(llm, p["llm_base"], llama_layout)
    qwen = make_fake_qwen_vl_chat(str(tmp / "qwen"), layout="safetensors_index", vit_config=VIT)
    seed_story = {**_files(p["tokenizer"], "cvlm_llama2_tokenizer/"), "README.md": b"# SEED-Story\n"}
    for key in ("agent", "detokenizer"):
        with open(p[key], "rb") as f:
            seed_story[os.path.relpath(p[key], fake["root"]).replace(os.sep, "/")] = f.read()
    seed_story["seedx/checkpoint-30000/pytorch_model.bin"] = b"another agent no preset here names" * 64
    sdxl = {**_files(p["sdxl_base"]), "text_encoder/model.safetensors": b"\0" * 4096}
    repos = {SEED_STORY: seed_story, LLAMA: {**_files(p["llm_base"]), "tokenizer.model": b"sp" * 600},
             SDXL: sdxl, QWEN: _files(qwen["dir"])}
    return fake, repos, qwen


@pytest.fixture
def online(monkeypatch):
    """The Hub client online (CI sets HF_HUB_OFFLINE=1 for everything else) and no token unless a test sets one."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)


def _preset(fake, root):
    return {**fake["preset"], "release": {**fake["preset"]["release"], "root": str(root)}}


def test_download_fetches_only_what_the_preset_needs_and_the_folder_loads(tmp_path, online, monkeypatch, capsys):
    from seedstory.checkpoints.release import load_release_pipeline
    from seedstory.doctor import diagnose
    from seedstory.download import STAGING, download_release

    fake, repos, qwen = _repos(tmp_path)
    with HubStandIn(repos, gated=[LLAMA]) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_TOKEN", hub.token)
        seen = []
        cfg = download_release(_preset(fake, tmp_path / "dl"), progress=lambda d, t, w: seen.append((d, t)))
        fetched = {(r, p) for r, p, _ in hub.fetches("GET")}

        # One progress stream over all files, reaching the total.
        assert seen and seen[-1][0] == seen[-1][1] and all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))
        # Only the needed files: no README, other agent, text encoder, Llama tokenizer or weights (the full agent
        # file carries them), nor Qwen's shard without visual tensors.
        assert (SEED_STORY, AGENT) in fetched
        assert (SEED_STORY, "README.md") not in fetched and (SEED_STORY, "seedx/checkpoint-30000/pytorch_model.bin") \
            not in fetched
        assert not [p for r, p in fetched if r == SDXL and p.startswith("text_encoder/")]
        assert {p for r, p in fetched if r == LLAMA} == {"config.json"}
        assert {p for r, p in fetched if r == QWEN} == {"model.safetensors.index.json", *qwen["visual_shards"]}
        assert not os.path.exists(tmp_path / "dl" / STAGING)  # the Qwen shards are gone once the ViT is out
        assert hub.token not in capsys.readouterr().out

        report = diagnose(cfg)
        assert report.ok, report.format()
        pipe = load_release_pipeline(cfg)
        assert pipe.agent is not None and pipe.visual_tokenizer is not None

        # Everything there: no request at all, not even a listing.
        hub.requests.clear()
        download_release(_preset(fake, tmp_path / "dl"))
        assert hub.requests == []


def test_an_interrupted_download_resumes(tmp_path, online, monkeypatch):
    from seedstory.download import download_release

    fake, repos, _ = _repos(tmp_path)
    agent = repos[SEED_STORY][AGENT]
    root = tmp_path / "dl"
    with HubStandIn(repos, gated=[LLAMA]) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_TOKEN", hub.token)
        # A connection that drops mid-file: the client asks again.
        hub.cut_after[(SEED_STORY, AGENT)] = 5000
        # A run killed earlier left part of the de-tokenizer behind: the next run appends to it.
        detok = "detokenizer/detokenizer_george_adapted/checkpoint-4000/pytorch_model.bin"
        part = root / (detok + ".part")
        part.parent.mkdir(parents=True)
        part.write_bytes(repos[SEED_STORY][detok][:3000])
        download_release(_preset(fake, root))
        ranges = {p: [rng for r, q, rng in hub.fetches("GET") if q == p] for p in (AGENT, detok)}
    assert len(ranges[AGENT]) == 2  # asked again (from where the written part ends: 0 below one 10 MB chunk)
    assert ranges[detok] == ["bytes=3000-"]
    assert (root / AGENT).read_bytes() == agent
    assert (root / detok).read_bytes() == repos[SEED_STORY][detok] and not part.exists()


def test_a_corrupted_file_is_refused_and_the_rest_kept(tmp_path, online, monkeypatch):
    from seedstory.download import DownloadError, download_release

    fake, repos, _ = _repos(tmp_path)
    root = tmp_path / "dl"
    with HubStandIn(repos, gated=[LLAMA]) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_TOKEN", hub.token)
        hub.corrupt.add((SEED_STORY, AGENT))
        with pytest.raises(DownloadError, match=r"pytorch_model\.bin: its sha256 is .* the Hub lists .*deleted"):
            download_release(_preset(fake, root))
        assert not (root / AGENT).exists() and not (root / (AGENT + ".part")).exists()
        kept = root / "cvlm_llama2_tokenizer" / "tokenizer.model"
        assert kept.is_file()
        hub.corrupt.clear()
        hub.requests.clear()
        download_release(_preset(fake, root))  # the next run fetches only what is missing
        assert (SEED_STORY, "cvlm_llama2_tokenizer/tokenizer.model") not in {(r, p) for r, p, _ in hub.fetches()}
    assert (root / AGENT).read_bytes() == repos[SEED_STORY][AGENT]


@pytest.mark.parametrize("token, listing", [(None, False), ("hf_wrong", False), (None, True)])
def test_a_gated_repository_without_a_valid_token_is_named_before_anything_is_fetched(tmp_path, online, monkeypatch,
                                                                                      capsys, token, listing):
    from seedstory.download import DownloadError, download_release

    fake, repos, _ = _repos(tmp_path)
    with HubStandIn(repos, gated=[LLAMA]) as hub:
        hub.gated_listing = listing
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        if token:
            monkeypatch.setenv("HF_TOKEN", token)
        with pytest.raises(DownloadError, match="meta-llama/Llama-2-7b-hf is gated") as e:
            download_release(_preset(fake, tmp_path / "dl"))
        assert ("HF_TOKEN" in str(e.value)) and ("refused" in str(e.value)) == bool(token)
        assert hub.fetches("GET") == []
    assert "hf_wrong" not in str(e.value) + capsys.readouterr().out


def test_a_disk_too_small_is_refused_before_anything_is_fetched(tmp_path, online, monkeypatch):
    from collections import namedtuple

    from seedstory import download
    from seedstory.download import DownloadError, download_release

    fake, repos, _ = _repos(tmp_path)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(download.shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    with HubStandIn(repos) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        with pytest.raises(DownloadError, match=r"to fetch but only .* free"):
            download_release(_preset(fake, tmp_path / "dl"))
        assert [p for _, p, _ in hub.fetches("GET") if not p.endswith(".json")] == []


@pytest.mark.parametrize("llama_layout", ["safetensors", "safetensors_sharded"])
def test_an_agent_file_without_the_base_weights_brings_them(tmp_path, online, monkeypatch, llama_layout):
    from seedstory.checkpoints.release import load_release_pipeline
    from seedstory.download import download_release

    fake, repos, _ = _repos(tmp_path, agent_variant="trainable", llama_layout=llama_layout)
    with HubStandIn(repos, gated=[LLAMA]) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_TOKEN", hub.token)
        cfg = download_release(_preset(fake, tmp_path / "dl"))
        got = {p for r, p, _ in hub.fetches("GET") if r == LLAMA}
    weights = {p for p in repos[LLAMA] if p.endswith(".safetensors")}
    fetched = weights & got
    assert fetched and "tokenizer.model" not in got
    if llama_layout == "safetensors_sharded":  # only the shards holding what the agent file lacks
        assert fetched < weights and "model.safetensors.index.json" in got
    assert load_release_pipeline(cfg).agent is not None


def test_offline_mode_and_other_presets_say_what_to_do(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from seedstory.download import DownloadError, download_release

    fake = make_fake_release(str(tmp_path / "src"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE"):
        download_release(_preset(fake, tmp_path / "dl"))
    with pytest.raises(DownloadError, match="not a release preset"):
        download_release("tiny")


def test_cli_download_prints_the_doctors_report(tmp_path, online, monkeypatch, capsys):
    from seedstory.cli import main

    fake, repos, _ = _repos(tmp_path)
    with HubStandIn(repos, gated=[LLAMA]) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        code = main(["download", "--preset", fake["preset_path"], "--to", str(tmp_path / "dl")])
    out = capsys.readouterr()
    assert code == 2 and "meta-llama/Llama-2-7b-hf is gated" in out.err and "Traceback" not in out.err
    with HubStandIn(repos, gated=[LLAMA]) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_TOKEN", hub.token)
        code = main(["download", "--preset", fake["preset_path"], "--to", str(tmp_path / "dl")])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "ok" in out.out.lower() and hub.token not in out.out + out.err
