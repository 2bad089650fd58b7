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
