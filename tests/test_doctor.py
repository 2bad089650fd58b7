"""``python -m seedstory extract-vit`` on tiny fake Qwen-VL-Chat downloads, and ``python -m seedstory doctor``
on a tiny fake ``./pretrained`` (tests/fake_release.py): what is reported, exit codes, and that no weights load."""
import json
import os
import shutil

import pytest
import torch

from fake_release import VIT, make_fake_qwen_vl_chat, make_fake_release, patch_release
from seedstory.checkpoints.files import CheckpointError
from seedstory.checkpoints.qwen_vl import extract_qwen_vit
from seedstory.checkpoints.release_vit import load_release_visual_tokenizer
from seedstory.cli import main
from seedstory.doctor import GPU, MISSING, OK, WRONG, diagnose, report_for_preset


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return make_fake_release(str(tmp_path_factory.mktemp("doctor") / "pretrained"))


@pytest.fixture
def copy(fake, tmp_path):
    """A private copy of the fake release and a preset override pointing at it."""
    root = tmp_path / "pretrained"
    shutil.copytree(fake["root"], root)
    return root, [f"release.root={root}"]


def _assert_same_vit(path, ref):
    vit = load_release_visual_tokenizer(str(path), VIT)
    want = {k: v.to(torch.bfloat16).float() for k, v in ref.state_dict().items()}
    got = vit.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


# -- extract-vit ------------------------------------------------------------------------------------------------


def test_extract_vit_from_sharded_bin_with_index_streams_only_visual_shards(tmp_path):
    q = make_fake_qwen_vl_chat(str(tmp_path / "Qwen-VL-Chat"), "bin_index")
    # The LLM-only shard is never opened: garbage there changes nothing.
    with open(os.path.join(q["dir"], q["llm_shards"][0]), "wb") as f:
        f.write(b"not a checkpoint")
    calls = []
    out = tmp_path / "visual_tokenizer"
    written = extract_qwen_vit(q["dir"], str(out), vit_config=VIT, progress=lambda i, n, name: calls.append((i, n, name)))
    assert written == [str(out / "qwen_vit_G.safetensors")]
    assert calls == [(1, 2, q["visual_shards"][0]), (2, 2, q["visual_shards"][1])]
    _assert_same_vit(written[0], q["vit"])
    # The preset path names qwen_vit_G.pt; the extracted .safetensors beside it is what loads.
    _assert_same_vit(out / "qwen_vit_G.pt", q["vit"])


@pytest.mark.parametrize("layout", ["safetensors_noindex", "bin_noindex", "safetensors_index"])
def test_extract_vit_cli_other_layouts(fake, tmp_path, capsys, layout):
    q = make_fake_qwen_vl_chat(str(tmp_path / "Qwen-VL-Chat"), layout)
    out = tmp_path / "vt"
    args = ["extract-vit", "--qwen-vl-chat", q["dir"], "--out", str(out), "--preset", fake["preset_path"], "--pt"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "extract-vit" in captured.err and "shard" in captured.err  # tqdm progress on stderr
    assert str(out / "qwen_vit_G.safetensors") in captured.out and str(out / "qwen_vit_G.pt") in captured.out
    for name in ("qwen_vit_G.safetensors", "qwen_vit_G.pt"):
        _assert_same_vit(out / name, q["vit"])


def test_extract_vit_missing_shard(tmp_path):
    q = make_fake_qwen_vl_chat(str(tmp_path / "a"), "bin_index")
    os.remove(os.path.join(q["dir"], q["visual_shards"][1]))
    with pytest.raises(CheckpointError) as e:
        extract_qwen_vit(q["dir"], str(tmp_path / "out_a"), vit_config=VIT)
    assert q["visual_shards"][1] in str(e.value) and "Qwen/Qwen-VL-Chat" in str(e.value)
    assert not (tmp_path / "out_a").exists()

    q = make_fake_qwen_vl_chat(str(tmp_path / "b"), "safetensors_noindex")
    os.remove(os.path.join(q["dir"], q["llm_shards"][0]))  # no visual tensors there: not needed
    extract_qwen_vit(q["dir"], str(tmp_path / "out_b"), vit_config=VIT)
    os.remove(os.path.join(q["dir"], q["visual_shards"][0]))
    with pytest.raises(CheckpointError) as e:
        extract_qwen_vit(q["dir"], str(tmp_path / "out_c"), vit_config=VIT)
    assert q["visual_shards"][0] in str(e.value) and "shard(s) missing" in str(e.value)


def test_extract_vit_wrong_shapes_and_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    q = make_fake_qwen_vl_chat(str(tmp_path / "q"), "safetensors_noindex")
    shard = os.path.join(q["dir"], q["visual_shards"][0])
    sd = load_file(shard)
    key = next(k for k in sorted(sd) if sd[k].dim() == 2)
    sd[key] = torch.zeros(3, 3)
    save_file(sd, shard)
    with pytest.raises(CheckpointError) as e:
        extract_qwen_vit(q["dir"], str(tmp_path / "out"), vit_config=VIT)
    assert key[len("transformer.visual."):] in str(e.value) and "[3, 3]" in str(e.value)
    assert not (tmp_path / "out").exists()
    # A download of another size does not fit the preset's ViT either.
    q = make_fake_qwen_vl_chat(str(tmp_path / "q2"), "safetensors_noindex")
    with pytest.raises(CheckpointError, match="shape mismatch"):
        extract_qwen_vit(q["dir"], str(tmp_path / "out2"), vit_config={**VIT, "width": 8, "heads": 1})


def test_extract_vit_refuses_overwrite(fake, tmp_path, capsys):
    q = make_fake_qwen_vl_chat(str(tmp_path / "q"), "bin_index")
    out = tmp_path / "vt"
    args = ["extract-vit", "--qwen-vl-chat", q["dir"], "--out", str(out), "--preset", fake["preset_path"]]
    assert main(args) == 0
    before = os.path.getmtime(out / "qwen_vit_G.safetensors")
    assert main(args) == 2
    assert "--force" in capsys.readouterr().err
    assert os.path.getmtime(out / "qwen_vit_G.safetensors") == before
    assert main(args + ["--force"]) == 0


def test_extract_vit_wrong_folder(tmp_path, fake):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="Qwen-VL-Chat download"):
        extract_qwen_vit(str(tmp_path / "empty"), str(tmp_path / "o"), vit_config=VIT)
    with pytest.raises(CheckpointError, match="is a file"):
        extract_qwen_vit(fake["paths"]["agent"], str(tmp_path / "o"), vit_config=VIT)
    with pytest.raises(CheckpointError, match="no transformer.visual"):  # a Llama folder
        extract_qwen_vit(fake["paths"]["llm_base"], str(tmp_path / "o"), vit_config=VIT)
    with pytest.raises(CheckpointError, match="not found"):
        extract_qwen_vit(str(tmp_path / "nope"), str(tmp_path / "o"), vit_config=VIT)


# -- doctor --------------------------------------------------------------------------------------------------------


def forbid_loading(monkeypatch):
    """From here on any weight loading fails the test; torch.load only memory-mapped (reads the pickle, not the
    tensors)."""
    def boom(*a, **k):
        raise AssertionError("the doctor must not load weights")

    for name in ("read_state_dict", "load_release_agent", "load_release_visual_tokenizer", "load_release_detokenizer",
                 "load_release_tokenizer", "load_release_pipeline", "assign_state"):
        patch_release(monkeypatch, name, boom)
    monkeypatch.setattr(torch.nn.Module, "load_state_dict", boom)
    real_load = torch.load

    def mmap_only(*a, **k):
        assert k.get("mmap") is True and k.get("weights_only") is True
        return real_load(*a, **k)

    monkeypatch.setattr(torch, "load", mmap_only)


@pytest.fixture
def no_loading(monkeypatch):
    forbid_loading(monkeypatch)


def _by(report, component):
    return [i for i in report.items if i.component == component]


def test_doctor_all_ok_on_the_fake_release(fake, capsys, no_loading):
    assert main(["doctor", "--preset", fake["preset_path"]]) == 0
    out = capsys.readouterr().out
    assert "can load" in out and "without loading weights" in out
    assert "<img>=300" in out and "</img>=301" in out and "<img_00000>..<img_00003>=302..305" in out
    assert "legacy=True" in out
    report = diagnose(fake["preset_path"], gpus=[])
    assert report.ok and report.seconds < 10
    assert {i.status for i in report.items} == {OK}
    assert "full dump" in _by(report, "agent")[0].message and "r=4" in _by(report, "agent")[0].message
    names = [c.name for c in report.components]
    assert names[0].startswith("visual") and any(n.startswith("agent") for n in names)
    assert report.device == "cpu" and report.dtype == "fp32"


def test_doctor_missing_file(fake, copy, capsys, no_loading):
    root, over = copy
    os.remove(root / "seed_story" / "george_sft" / "pytorch_model.bin")
    shutil.rmtree(root / "stable-diffusion-xl-base-1.0" / "vae")
    assert main(["doctor", "--preset", fake["preset_path"], "--set", *over]) == 1
    out = capsys.readouterr().out
    assert str(root / "seed_story" / "george_sft" / "pytorch_model.bin") in out
    assert "TencentARC/SEED-Story" in out and "stabilityai/stable-diffusion-xl-base-1.0" in out
    assert "cannot load" in out
    report = diagnose(fake["preset_path"], over, gpus=[])
    assert [i.status for i in _by(report, "agent")] == [MISSING]
    assert [i.status for i in _by(report, "SDXL vae")] == [MISSING]
    assert _by(report, "tokenizer")[0].status == OK


def test_doctor_wrong_shapes_and_truncated_files(fake, copy, monkeypatch):
    root, over = copy
    vit_path = root / "visual_tokenizer" / "qwen_vit_G.pt"
    sd = torch.load(vit_path, weights_only=True)
    sd["proj"] = torch.zeros(32, 8)
    torch.save(sd, vit_path)
    detok = root / "detokenizer" / "detokenizer_george_adapted" / "checkpoint-4000" / "pytorch_model.bin"
    with open(detok, "r+b") as f:
        f.truncate(os.path.getsize(detok) // 2)
    forbid_loading(monkeypatch)
    report = diagnose(fake["preset_path"], over, gpus=[])
    vit = _by(report, "visual tokenizer")[0]
    assert vit.status == WRONG and "proj" in vit.message and "[32, 8]" in vit.message and "[32, 32]" in vit.message
    d = _by(report, "de-tokenizer")[0]
    assert d.status == WRONG and "truncated" in d.message and "TencentARC/SEED-Story" in d.source
    assert not report.ok


def test_doctor_tokenizer_without_image_tokens(fake, copy, capsys, no_loading):
    root, over = copy
    added = root / "cvlm_llama2_tokenizer" / "added_tokens.json"
    ids = json.loads(added.read_text())
    del ids["<img_00003>"]
    added.write_text(json.dumps(ids))
    assert main(["doctor", "--preset", fake["preset_path"], "--set", *over]) == 1
    tok = _by(diagnose(fake["preset_path"], over, gpus=[]), "tokenizer")[0]
    assert tok.status == WRONG and "<img_00003>" in tok.message and "cvlm_llama2_tokenizer" in tok.message


def test_doctor_legacy_flag_and_agent_vocab(fake, copy, no_loading):
    root, over = copy
    cfg_path = root / "cvlm_llama2_tokenizer" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["legacy"] = False
    cfg_path.write_text(json.dumps(cfg))
    report = diagnose(fake["preset_path"], over, gpus=[])
    assert report.ok and "legacy=False (from tokenizer_config.json)" in _by(report, "tokenizer")[0].message
    # An extra token makes the tokenizer longer than the agent's vocabulary.
    added = root / "cvlm_llama2_tokenizer" / "added_tokens.json"
    added.write_text(json.dumps({**json.loads(added.read_text()), "<extra>": 306}))
    agent = _by(diagnose(fake["preset_path"], over, gpus=[]), "agent")[0]
    assert agent.status == WRONG and "vocab_size=307" in agent.message


def test_doctor_trainable_only_agent_needs_the_llama_weights(fake, copy, monkeypatch):
    from fake_release import BASE_LINEAR

    root, over = copy
    agent = root / "seed_story" / "george_sft" / "pytorch_model.bin"
    state = torch.load(agent, weights_only=True)
    torch.save({k: v for k, v in state.items() if not BASE_LINEAR.search(k) and not k.endswith("pos_embed")}, agent)
    forbid_loading(monkeypatch)
    report = diagnose(fake["preset_path"], over, gpus=[])
    assert report.ok and "trainable-only: 14 weights come from the Llama base folder" in _by(report, "agent")[0].message
    os.remove(root / "Llama-2-7b-hf" / "model.safetensors")
    report = diagnose(fake["preset_path"], over, gpus=[])
    a = _by(report, "agent")[0]
    assert a.status == WRONG and str(root / "Llama-2-7b-hf") in a.message and "meta-llama/Llama-2-7b-hf" in a.message
    # With the full agent file, the Llama weights are not needed at all.
    torch.save(state, agent)
    report = diagnose(fake["preset_path"], over, gpus=[])
    assert report.ok and "none needed" in _by(report, "Llama base")[0].message


def test_doctor_fit_and_low_vram_options():
    # No files needed: the release sizes come from the packaged manifests.
    small = diagnose("seed-story-george", gpus=[GPU("RTX 4090", 24 * 2**30)])
    assert small.device == "cuda" and small.dtype == "bf16"
    opts = {o.flags: o for o in small.options}
    assert opts[""].fits is False and opts["runtime.cpu_offload=true"].fits is True
    assert "to make it fit: --set runtime.cpu_offload=true" in small.format()
    tiny = diagnose("seed-story-george", gpus=[GPU("T4", 16 * 2**30, bf16=False)])
    assert tiny.dtype == "fp16"
    fixes = [o.flags for o in tiny.options if o.fits]
    assert fixes and all("llm_quantization" in f for f in fixes)
    big = diagnose("seed-story-george", gpus=[GPU("H100", 80 * 2**30)])
    assert big.options[0].fits is True and "does not fit" not in big.format().split("Verdict")[0].split("GPU:")[1].split("\n")[1]
    cpu = diagnose("seed-story-george", gpus=[])
    assert cpu.device == "cpu" and not cpu.options and "runs on the CPU" in cpu.format()
    quant = diagnose("seed-story-george", ["runtime.llm_quantization=8bit"], gpus=[])
    assert any(i.component == "runtime" and i.status == WRONG and "CUDA" in i.message for i in quant.items)
    offload = diagnose("seed-story-george", ["runtime.cpu_offload=true"], gpus=[GPU("RTX 4090", 24 * 2**30)])
    assert offload.options[0].flags == "" and offload.options[0].fits is True
    assert all("cpu_offload" not in o.flags for o in offload.options)


def test_report_for_preset_markdown(fake):
    md = report_for_preset("seed-story-george", error="boom")
    assert md.startswith("**Loading `seed-story-george` failed:** boom")
    assert "**MISSING**" in md and "TencentARC/SEED-Story" in md and "| component |" in md
    assert "could not check" in report_for_preset("no-such-preset") or "unknown preset" in report_for_preset(
        "no-such-preset")
    ok = report_for_preset(fake["preset_path"])
    assert "can load" in ok


def test_doctor_other_sources(tmp_path):
    from seedstory.pipeline import SeedStoryPipeline

    tiny = diagnose("tiny", gpus=[])
    assert tiny.ok and tiny.components
    SeedStoryPipeline.from_preset("tiny").save_pretrained(str(tmp_path / "m"))
    cfg = {"name": "mine", "source": "pretrained", "path": str(tmp_path / "m"), "runtime": {"device": "cpu"}}
    report = diagnose(cfg, gpus=[])
    assert report.ok and len(report.components) == 4
    shutil.rmtree(tmp_path / "m" / "agent" / "llm")
    report = diagnose(cfg, gpus=[])
    assert not report.ok and any(i.status == MISSING and "agent/llm" in i.message for i in report.items)
