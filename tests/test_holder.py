import threading

from seedstory.holder import ModelHolder


def test_loads_once_under_concurrency_and_reports():
    holder = ModelHolder("tiny")
    assert holder.status()["loaded"] is False
    pipes = []
    threads = [threading.Thread(target=lambda: pipes.append(holder.pipeline())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(pipes) == 4 and all(p is pipes[0] for p in pipes)
    s = holder.status()
    assert s["loaded"] and s["device"] == "cpu" and s["parameters"]["agent"] > 0 and s["weight_bytes"]["detokenizer"] > 0
    assert "M parameters" in holder.describe()
    e1, e2 = holder.engine("window"), holder.engine("sink")
    assert e1.pipe is e2.pipe and e1.store is e2.store and e1.lock is e2.lock
    assert holder.engine("window") is e1


def test_switch_frees_old_models():
    import weakref

    holder = ModelHolder("tiny")
    old = weakref.ref(holder.pipeline())
    new = holder.switch("tiny", ["init_seed=1"])
    assert old() is None and new is holder.pipeline()


def test_a_saved_model_folder_is_a_preset(tmp_path):
    """``--preset DIR`` / ``ModelHolder(DIR)``: a training run's ``final/`` or a ``convert`` output loads as is."""
    import pytest
    import torch

    from seedstory.config import PresetError, load_preset

    tiny = ModelHolder("tiny").pipeline()
    folder = tmp_path / "final"
    tiny.save_pretrained(str(folder))
    cfg = load_preset(str(folder))
    assert cfg.source == "pretrained" and cfg.name == "final"
    holder = ModelHolder(str(folder))
    pipe = holder.pipeline()
    for a, b in zip(pipe.agent.parameters(), tiny.agent.parameters()):
        assert torch.equal(a.float(), b.float())
    with pytest.raises(PresetError, match="seedstory.json"):
        load_preset(str(tmp_path))
