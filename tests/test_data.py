"""StoryStream data tools (validate / chunk / stats, and their CLI) and the streaming training datasets."""
import json
import os
import random
import subprocess
import sys

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from seedstory.data import storystream as ss
from seedstory.data.__main__ import main as data_main
from seedstory.data.datasets import ImageDataset, StorySampleDataset, collate_story_samples, sdxl_resize_crop
from seedstory.image_processing import ImageProcessor
from seedstory.prompt import IGNORE_INDEX, PromptFormat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _story(sid, n, root, captions=None, make_images=True, tint=0):
    images = [f"{sid}/{k}.png" for k in range(n)]
    if make_images:
        os.makedirs(root / sid, exist_ok=True)
        for k, rel in enumerate(images):
            Image.new("RGB", (12, 8), (10 * k, tint, 0)).save(root / rel)
    return {"id": sid, "images": images, "captions": captions or [f"a cat {k}" for k in range(n)],
            "orders": list(range(n)), "truth": [{"frame": k} for k in range(n)]}


@pytest.fixture
def broken(tmp_path):
    """A jsonl with two good stories and one of each problem (plus blank lines)."""
    root = tmp_path / "images"
    good1, good2 = _story("good1", 3, root), _story("good2", 2, root)
    missing = _story("missing", 2, root)
    os.remove(root / "missing" / "1.png")
    corrupt = _story("corrupt", 2, root)
    (root / "corrupt" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    lines = [
        json.dumps(good1),
        "{not json",
        "",
        json.dumps(["a", "list"]),
        json.dumps({"id": "nofield", "images": ["x.png"]}),
        json.dumps({**_story("mismatch", 2, root), "captions": ["only one"]}),
        json.dumps({**_story("badorders", 2, root), "orders": [0]}),
        json.dumps({"id": "empty", "images": [], "captions": []}),
        json.dumps(missing),
        json.dumps(corrupt),
        json.dumps({**good1, "captions": ["again"] * 3}),  # duplicate id
        "   ",
        json.dumps(good2),
    ]
    path = tmp_path / "stories.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, root


def test_validate_counts_every_problem_and_keeps_the_good(broken):
    path, root = broken
    report = ss.ValidationReport()
    kept = list(ss.iter_stories(str(path), str(root), report=report))
    assert [s["id"] for s in kept] == ["good1", "good2"]
    assert dict(report.problems) == {"bad json": 1, "not an object": 1, "missing field": 1, "length mismatch": 2,
                                     "empty story": 1, "missing image": 1, "unreadable image": 1, "duplicate id": 1}
    assert report.total_lines == 11 and report.valid == 2 and report.frames == 5 and not report.ok
    assert report.examples["missing image"] == [(9, "missing/1.png")]
    assert "duplicate id: 1 story skipped" in report.markdown()
    # without images only the text problems remain
    text_only = ss.validate(str(path), None)
    assert "missing image" not in text_only.problems and text_only.valid == 4


def test_validate_cli_exit_codes(broken, tmp_path, capsys):
    path, root = broken
    assert data_main(["validate", str(path), "--images", str(root), "--json"]) == 2
    result = json.loads(capsys.readouterr().out)
    assert result["valid"] == 2 and result["skipped"] == 9
    good = tmp_path / "good.jsonl"
    good.write_text(path.read_text().splitlines()[0] + "\n")
    assert data_main(["validate", str(good), "--images", str(root)]) == 0
    assert "no problems found" in capsys.readouterr().out
    assert data_main(["validate", str(tmp_path / "nope.jsonl"), "--no-images"]) == 1
    assert "not found" in capsys.readouterr().err


def test_odd_records_are_counted_never_raised(tmp_path):
    """Records that once crashed a reader halfway: list/object ids, non-string paths, invalid UTF-8, deep nesting."""
    root = tmp_path / "images"
    ok = _story("ok", 2, root)
    lines = [json.dumps({**ok, "id": ["x"]}).encode(), json.dumps({**ok, "id": ["x"]}).encode(),  # duplicate list id
             json.dumps({**ok, "id": {"a": 1}}).encode(),
             json.dumps({"images": [5, None], "captions": ["a", "b"]}).encode(),
             json.dumps({**ok, "id": "o", "orders": "0 1"}).encode(),
             json.dumps({"images": [], "captions": ["a"]}).encode(),  # unequal before empty
             b'{"images": ["ok/0.png"], "captions": ["caf\xe9"]}',  # a latin-1 byte: not UTF-8
             b"[" * 100_000 + b"]" * 100_000,
             json.dumps({k: v for k, v in ok.items() if k != "id"}).encode(),  # no id: its line is its id
             json.dumps({k: v for k, v in ok.items() if k != "id"}).encode()]
    path = tmp_path / "odd.jsonl"
    path.write_bytes(b"\r\n".join(lines) + b"\r\n")
    report = ss.validate(str(path), str(root))
    assert dict(report.problems) == {"duplicate id": 1, "missing field": 1, "length mismatch": 2, "bad json": 2}
    assert report.valid == 4 and report.examples["length mismatch"][0] == (5, "2 images, 2 captions, orders not a list")
    # the training datasets skip the broken lines without raising (they check only what training needs: ids and
    # orders are not theirs to judge, so lines 1-3, 5, 9 and 10 give their 2 frames each)
    ds = ImageDataset(str(path), str(root), ImageProcessor(14), resolution=8)
    assert len(list(ds)) == 6 * 2 and ds.skipped == {"bad json": 2, "unreadable image": 2, "length mismatch": 1}


def test_cli_as_a_module(tmp_path):
    """``python -m seedstory.data``: a missing file is one stderr line, no traceback; the synthetic CLI still runs."""
    cmd = [sys.executable, "-m", "seedstory.data", "stats", str(tmp_path / "nope.jsonl")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "nope.jsonl not found" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "seedstory.data.synthetic", "--help"], capture_output=True, cwd=ROOT)
    assert proc.returncode == 0


def test_chunk_30_frames_into_windows_of_10(tmp_path):
    src = tmp_path / "long.jsonl"
    stories = [_story("a", 30, tmp_path, make_images=False), _story("b", 25, tmp_path, make_images=False)]
    src.write_text("\n".join(json.dumps(s) for s in stories) + "\n{broken\n")
    out = tmp_path / "windows.jsonl"
    counts = ss.chunk(str(src), str(out), window=10)
    assert (counts["stories"], counts["windows"], counts["frames_dropped"]) == (2, 5, 5)
    assert counts["problems"] == {"bad json": 1}
    windows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [w["id"] for w in windows] == ["a_0", "a_1", "a_2", "b_0", "b_1"]
    a1 = windows[1]
    assert a1["images"] == [f"a/{k}.png" for k in range(10, 20)]
    assert a1["captions"][0] == "a cat 10" and a1["orders"] == list(range(10, 20))
    assert a1["truth"] == [{"frame": k} for k in range(10, 20)]  # every per-frame list is sliced
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no partial copy left behind
    # overlapping windows, a kept short tail
    ss.chunk(str(src), str(out), window=10, stride=5, min_frames=5)
    starts = [json.loads(line)["orders"][0] for line in out.read_text().splitlines() if line.startswith('{"id": "b')]
    assert starts == [0, 5, 10, 15]
    with pytest.raises(ValueError):
        ss.chunk(str(src), str(src))
    assert data_main(["chunk", str(src), "--out", str(out), "--window", "15"]) == 0
    # gaps between windows are dropped frames too; fields beyond the frames are copied, an id-less story is named
    src.write_text(json.dumps({k: v for k, v in stories[0].items() if k != "id"} | {"_meta": {"by": "me"}}) + "\n")
    counts = ss.chunk(str(src), str(out), window=10, stride=15)
    windows = [json.loads(line) for line in out.read_text().splitlines()]
    assert counts["frames_dropped"] == 10 and [w["orders"][0] for w in windows] == [0, 15]
    assert [w["id"] for w in windows] == ["line1_0", "line1_1"] and windows[0]["_meta"] == {"by": "me"}
    with pytest.raises(FileNotFoundError):
        ss.chunk(str(tmp_path / "nope.jsonl"), str(tmp_path / "new" / "out.jsonl"))
    assert not (tmp_path / "new").exists()


def test_stats(broken, capsys):
    path, root = broken
    s = ss.stats(str(path), str(root))
    assert s["stories"] == 2 and s["frames"] == 5 and s["distinct_images"] == 5
    assert s["frames_per_story"] == {"min": 2, "mean": 2.5, "max": 3}
    assert s["caption_words"]["min"] == 3 and s["problems"]["unreadable image"] == 1
    assert data_main(["stats", str(path)]) == 0
    assert "frames per story: min 2" in capsys.readouterr().out


# -- training datasets ------------------------------------------------------------------------------------
@pytest.fixture
def dataset_files(tmp_path):
    root = tmp_path / "images"
    stories = [_story(f"s{i}", 4, root, captions=["a cat", "the dog", "a sun", "the cat"], tint=20 * i)
               for i in range(12)]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(s) for s in stories) + "\n")
    return str(path), str(root)


def test_story_sample_follows_formats_section_5(dataset_files, word_tokenizer):
    pf = PromptFormat(word_tokenizer, 4)
    boi, eoi = word_tokenizer.convert_tokens_to_ids(["<img>", "</img>"])
    slots = word_tokenizer.convert_tokens_to_ids([f"<img_{k:05d}>" for k in range(4)])
    ds = StorySampleDataset(*dataset_files, pf, ImageProcessor(28), max_length=200, seed=1,
                            target_image_resolution=16)
    samples = list(ds)
    assert len(samples) == 12 and not ds.skipped
    for s in samples:
        x, lab = s["input_ids"].tolist(), s["labels"].tolist()
        n_img = x.count(boi)
        assert x[0] == word_tokenizer.bos_token_id and x[-1] == word_tokenizer.eos_token_id
        assert n_img == x.count(eoi) == s["pixel_values"].shape[0] and s["pixel_values"].shape[1:] == (3, 28, 28)
        starts = [i for i, t in enumerate(x) if t == boi]
        assert all(x[b : b + 6] == [boi, *slots, eoi] for b in starts)  # every image slot: <img> 4 tokens </img>
        assert s["ids_cmp_mask"].nonzero().flatten().tolist() == [b + 1 + k for b in starts[:-1] for k in range(4)]
        assert s["embeds_gen_mask"].tolist() == [False] * (n_img - 1) + [True]
        assert s["embeds_cmp_mask"].tolist() == [True] * (n_img - 1) + [False]
        assert int(s["ids_cmp_mask"].sum()) == 4 * (n_img - 1) and int(s["ids_gen_mask"].sum()) == 4
        # only the target frame is learned: "[INST]" + its text + its <img>, then EOS; never its slots nor </img>
        learned = [i for i, v in enumerate(lab) if v != IGNORE_INDEX]
        target_start = starts[-2] + 6  # right after the last context image's </img>
        assert x[target_start : target_start + 3] == word_tokenizer.encode("[INST]", add_special_tokens=False)
        assert learned == list(range(target_start, starts[-1] + 1)) + [len(x) - 1]
        assert all(x[i] == lab[i] for i in learned)
        assert s["sd_pixel_values"].shape == (3, 16, 16) and s["time_ids"].tolist() == [8, 12, 0, 4, 16, 16]  # 12x8 -> 24x16, centre crop
    batch = collate_story_samples(samples[:3], pad_id=word_tokenizer.pad_token_id)
    longest = max(len(s["input_ids"]) for s in samples[:3])
    assert batch["input_ids"].shape == (3, longest) and batch["labels"].shape == (3, longest)
    for row, s in zip(range(3), samples[:3]):
        k = len(s["input_ids"])
        assert (batch["labels"][row, k:] == IGNORE_INDEX).all() and (batch["attention_mask"][row, k:] == 0).all()
    assert batch["pixel_values"].shape[0] == sum(s["pixel_values"].shape[0] for s in samples[:3])
    assert batch["embeds_gen_mask"].sum() == 3 and batch["sd_pixel_values"].shape == (3, 3, 16, 16)


def test_text_only_samples_read_no_picture_and_keep_the_layout(dataset_files, word_tokenizer, tmp_path):
    pf = PromptFormat(word_tokenizer, 4)
    kw = dict(max_length=200, seed=1, label_context=True)
    with_pictures = list(StorySampleDataset(*dataset_files, pf, ImageProcessor(14), **kw))
    # an image folder that does not exist: a text-only sample never opens a picture
    text = StorySampleDataset(dataset_files[0], str(tmp_path / "nowhere"), pf, ImageProcessor(14), text_only=True, **kw)
    samples = list(text)
    assert len(samples) == len(with_pictures) and not text.skipped
    for a, b in zip(samples, with_pictures):
        assert "pixel_values" not in a
        assert all(torch.equal(a[k], b[k]) for k in b if k != "pixel_values")  # same ids, labels and masks
    batch = collate_story_samples(samples[:3], pad_id=word_tokenizer.pad_token_id)
    assert "pixel_values" not in batch and batch["input_ids"].shape[0] == 3
    with pytest.raises(ValueError, match="no target picture"):
        StorySampleDataset(*dataset_files, pf, ImageProcessor(14), text_only=True, target_image_resolution=16)


def test_captions_the_agent_wrote_itself_are_read_but_not_learned(dataset_files, word_tokenizer):
    """A corrected story's ``written`` marks the agent's own captions: with ``learn_own_captions=False`` they stay in
    the context, but only the world's captions (and the story's end) carry the LM loss."""
    pf = PromptFormat(word_tokenizer, 4)
    boi = word_tokenizer.convert_tokens_to_ids("<img>")
    path, root = dataset_files
    record = json.loads(open(path).readline())
    record["written"] = ["opening", "agent", "world", "agent"]
    ds = {own: StorySampleDataset(path, root, pf, ImageProcessor(14), max_length=200, label_context=True,
                                  learn_own_captions=own) for own in (True, False)}
    every, the_worlds = (ds[own].build(record, 3, 2) for own in (True, False))
    assert torch.equal(every["input_ids"], the_worlds["input_ids"])
    x = every["input_ids"].tolist()
    ends = [i for i, t in enumerate(x) if t == boi]  # each caption ends with its <img>
    spans = [range(ends[k - 1] + 6, ends[k] + 1) for k in (1, 2, 3)]  # after the picture before it, to its <img>
    learned = {own: {i for i, v in enumerate(s["labels"].tolist()) if v != IGNORE_INDEX}
               for own, s in ((True, every), (False, the_worlds))}
    assert all(set(span) <= learned[True] for span in spans)
    assert learned[False] == set(spans[1]) | {len(x) - 1}  # the world's caption and the story's end (EOS)
    plain = dict(record)
    del plain["written"]  # a true story is learned whole either way
    assert torch.equal(ds[False].build(plain, 3, 2)["labels"], every["labels"])


def test_opening_share_starts_windows_at_the_story_opening(dataset_files, word_tokenizer):
    pf = PromptFormat(word_tokenizer, 4)
    opening = word_tokenizer.encode("a cat", add_special_tokens=False)

    def starts(share, epochs=4):
        ds = StorySampleDataset(*dataset_files, pf, ImageProcessor(14), max_length=200, seed=3, opening_share=share)
        found = []
        for epoch in range(epochs):
            ds.set_epoch(epoch)
            found += [s["input_ids"].tolist()[1 : 1 + len(opening)] == opening for s in ds]
        return found

    assert all(starts(1.0))  # every window is the story so far, from its opening
    mid = starts(0.0)
    assert not all(mid) and any(mid)  # the release's sampling: mostly mid-story windows
    assert sum(starts(0.5)) > sum(mid)
    with pytest.raises(ValueError, match="opening_share"):
        StorySampleDataset(*dataset_files, pf, ImageProcessor(14), opening_share=1.5)


def test_two_workers_read_every_story_once_and_the_order_is_seeded(dataset_files, word_tokenizer):
    pf = PromptFormat(word_tokenizer, 4)

    def run(epoch, workers, seed=3):
        ds = StorySampleDataset(*dataset_files, pf, ImageProcessor(14), max_length=200, seed=seed, shuffle_buffer=4)
        ds.set_epoch(epoch)
        loader = DataLoader(ds, batch_size=None, num_workers=workers)
        # a story's images all share its green channel (tint 20 * i): that names the story of each sample
        return [(round(float(s["pixel_values"][:, 1].mean()), 3), tuple(s["input_ids"].tolist())) for s in loader]

    two = run(0, 2)
    assert len(two) == 12 and len({story for story, _ in two}) == 12  # with two workers: every story once, none twice
    assert run(0, 2) == two  # same seed and epoch: same samples in the same order
    assert run(1, 2) != two  # the next epoch reshuffles

    ids = ImageDataset(dataset_files[0], dataset_files[1], ImageProcessor(14), resolution=8, seed=0, shuffle_buffer=8)
    loader = DataLoader(ids, batch_size=6, num_workers=2)
    pixels = torch.cat([b["sd_pixel_values"] for b in loader])
    assert pixels.shape[0] == 12 * 4  # every frame of every story, once


def test_processes_share_out_the_samples_of_one_stream(dataset_files, word_tokenizer):
    """Ranks 0 and 1 of 2 with batch 2 hold, step by step, exactly the batches of 4 one process reads."""
    pf = PromptFormat(word_tokenizer, 4)

    def batches(rank, world, size):
        ds = StorySampleDataset(*dataset_files, pf, ImageProcessor(14), max_length=200, seed=3, shuffle_buffer=4,
                                rank=rank, world_size=world)
        samples = [tuple(s["input_ids"].tolist()) for s in ds]
        return [sorted(samples[i:i + size]) for i in range(0, len(samples), size)]

    one = batches(0, 1, 4)
    rank0, rank1 = batches(0, 2, 2), batches(1, 2, 2)
    assert len(one) == len(rank0) == len(rank1) == 3
    assert [sorted(a + b) for a, b in zip(rank0, rank1)] == one


def test_processes_share_out_the_pictures_of_one_stream(dataset_files):
    """The same for single pictures, random crops included: each crop belongs to the picture's place in the one
    stream, not to the process that loads it."""
    def batches(rank, world, size):
        ds = ImageDataset(*dataset_files, ImageProcessor(14), resolution=8, random_crop=True, seed=3,
                          shuffle_buffer=5, rank=rank, world_size=world)
        items = [(round(float(s["pixel_values"][:, 1].mean()), 3), tuple(s["time_ids"].tolist()),
                  tuple(s["sd_pixel_values"].flatten()[:6].tolist())) for s in ds]
        return [sorted(items[i:i + size]) for i in range(0, len(items), size)]

    one = batches(0, 1, 4)
    rank0, rank1 = batches(0, 2, 2), batches(1, 2, 2)
    assert len(one) == len(rank0) == len(rank1) == 12
    assert [sorted(a + b) for a, b in zip(rank0, rank1)] == one


def test_sdxl_resize_crop_on_a_non_square_image():
    img = Image.new("RGB", (300, 100), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 150, 100))  # left half blue, right half red
    pixels, time_ids = sdxl_resize_crop(img, 50)
    assert pixels.shape == (3, 50, 50) and pixels.min() >= -1 and pixels.max() <= 1
    # shorter side 100 -> 50: 150 x 50, center crop from left 50
    assert time_ids.tolist() == [100, 300, 0, 50, 50, 50]
    assert pixels[2, :, :20].mean() > 0.9 and pixels[0, :, -20:].mean() > 0.9  # blue left, red right
    crops = {tuple(sdxl_resize_crop(img, 50, random.Random(s))[1].tolist()) for s in range(20)}
    assert len(crops) > 1 and all(c[2] == 0 and 0 <= c[3] <= 100 for c in crops)
