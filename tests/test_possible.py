"""The synthetic world's possible next tokens (``seedstory.data.possible``): the true stories always stay inside
them, what the story so far rules out is left out, samples carry them aligned with their labels, and stage 2's
possible loss is what it says."""
import math

import pytest
import torch

from seedstory.data.possible import PossibleNext, grammar_sentences, possible_sentences
from seedstory.data.story_state import StoryState
from seedstory.data.synthetic import generate_story, write_dataset


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from seedstory.tokens import load_tokenizer
    from training.text_tokenizer import main as train_tokenizer

    world = tmp_path_factory.mktemp("possible_world")
    write_dataset(str(world), stories=12, frames=6, size=64, seed=1, workers=1, progress=False)
    out = train_tokenizer(["--jsonl", str(world / "train.jsonl"), "--vocab-size", "400", "--num-img-tokens", "16",
                           "--out", str(world / "tok")])
    return load_tokenizer(out, 16)


def test_the_grammar_says_every_sentence_once_per_wording():
    parsed, texts = grammar_sentences()
    assert {p["event"] for p in parsed.values()} >= {"arrive", "leave", "pickup", "give", "travel_group", "lies"}
    assert all(texts[k] for k in parsed)
    assert "Pim gives the apple to Pim." not in {t for ts in texts.values() for t in ts}


def test_what_the_story_so_far_rules_out_is_left_out():
    state = StoryState.opening("It is a bright day on the beach. Pim is on the left, holding the kite. "
                               "An apple lies on the right.")
    possible = set(possible_sentences(state, None))
    assert {"Pim leaves.", "Wex arrives on the right.", "Pim walks to the right.", "Pim puts down the kite.",
            "Pim goes to the cave.", "Pim leaves with the kite."} <= possible
    ruled_out = {"Wex leaves.", "Pim arrives on the right.", "Wex arrives on the left.", "Pim takes the apple.",
                 "Pim puts down the apple.", "Pim goes to the beach.", "Bodo waves at Pim.",
                 "Wex shows up on the right, carrying the kite.", "Pim walks to the right and picks up the apple."}
    assert not possible & ruled_out


def test_true_stories_stay_inside_the_possible_tokens(tokenizer):
    end = tokenizer.convert_tokens_to_ids("<img>")
    possible = PossibleNext(tokenizer, end)
    narrowed = 0
    for index in range(8):
        captions = generate_story(3, index, frames=20)["captions"]
        tables = possible.for_story(captions)
        assert tables[0] is None and all(t is not None for t in tables[1:])
        for caption, table in zip(captions[1:], tables[1:]):
            ids = tokenizer.encode(caption, add_special_tokens=False) + [end]
            assert len(table) == len(ids) and all(t in allowed for t, allowed in zip(ids, table))
            narrowed += sum(1 for allowed in table if 1 < len(allowed) < 40)
    assert narrowed > 50
    # A caption the story rules out has no table: someone absent leaves
    captions = generate_story(3, 0, frames=6)["captions"]
    absent = next(n for n in ("Pim", "Bodo", "Tansy", "Wex") if n not in StoryState.opening(captions[0]).present)
    assert possible.for_story([captions[0], f"{absent} leaves."])[1] is None


def test_samples_carry_the_possible_tokens_beside_their_labels(tokenizer, tmp_path):
    from seedstory.data.datasets import StorySampleDataset, collate_story_samples
    from seedstory.image_processing import ImageProcessor
    from seedstory.prompt import PromptFormat

    world = tmp_path / "w"
    write_dataset(str(world), stories=4, frames=8, size=64, seed=2, workers=1, progress=False)
    prompt = PromptFormat(tokenizer, 16)
    end = prompt.image_ids.boi
    data = StorySampleDataset(str(world / "train.jsonl"), str(world / "images"), prompt, ImageProcessor(32),
                              max_frames=8, label_context=True, text_only=True,
                              possible_next=PossibleNext(tokenizer, end))
    samples = list(data)
    assert samples
    for s in samples:
        labels, possible = s["labels"], s["possible_ids"]
        given = (possible >= 0).any(-1)
        assert given.sum() > 0
        for pos in given.nonzero().flatten().tolist():
            assert int(labels[pos]) in possible[pos].tolist()  # the true token is always possible
        assert not given[labels == -100].any()  # nothing outside the labelled captions
    batch = collate_story_samples(samples[:3], pad_id=0)
    assert batch["possible_ids"].shape[:2] == batch["input_ids"].shape


def test_possible_loss_is_minus_log_the_possible_mass():
    from training.stage2_agent import possible_loss

    vocab = 10
    logits = torch.zeros(1, 4, vocab)  # uniform: each token has probability 1 / 10
    ids = torch.full((1, 4, 3), -1)
    ids[0, 1, :2] = torch.tensor([3, 4])      # predicted at position 0: two possible tokens
    ids[0, 3, :3] = torch.tensor([1, 2, 5])   # at position 2: three
    summed, count = possible_loss(logits, ids)
    assert int(count) == 2
    assert float(summed) == pytest.approx(-math.log(0.2) - math.log(0.3), rel=1e-5)
    sure = torch.full((1, 4, vocab), -30.0)
    sure[0, 0, 3] = sure[0, 2, 5] = 30.0  # all the mass on possible tokens: nothing to learn
    assert float(possible_loss(sure, ids)[0]) == pytest.approx(0.0, abs=1e-6)
