"""The in-place decoding cache (``seedstory.models.kv.KVWorkspace``): the same numbers as the copying path,
snapshots that later tokens never change, and room that grows when a frame runs past it."""
import torch

from seedstory.models.kv import KVWorkspace, kv_length
from seedstory.pipeline import SeedStoryPipeline


def test_workspace_decodes_what_the_value_path_decodes_and_snapshots_stay_put():
    agent = SeedStoryPipeline.from_preset("tiny").agent
    ids = torch.arange(5, 25)
    with torch.no_grad():
        logits, _, kv = agent.prefill(ids, start_pos=0)
        before = [t.clone() for layer in kv for t in layer]
        cache = KVWorkspace(kv, room=2)  # room for 2: the next 5 tokens make it grow
        value = kv
        snaps = []
        for token in (7, 8, 9, 10, 11):
            a, _, cache = agent.prefill(torch.tensor([token]), kv=cache)
            b, _, value = agent.prefill(torch.tensor([token]), kv=value)
            torch.testing.assert_close(a, b)
            snaps.append(cache.snapshot())
    assert kv_length(snaps[0]) == 21 and kv_length(snaps[-1]) == 25 == kv_length(value)
    for (k1, v1), (k2, v2) in zip(snaps[0], snaps[-1]):  # the first snapshot is the start of the last one
        assert torch.equal(k1, k2[:, :, :21]) and torch.equal(v1, v2[:, :, :21])
    for (k, v), (k2, v2) in zip(snaps[-1], value):
        torch.testing.assert_close(k, k2)
        torch.testing.assert_close(v, v2)
    assert all(torch.equal(t, b) for t, b in zip((t for layer in kv for t in layer), before))  # input untouched
