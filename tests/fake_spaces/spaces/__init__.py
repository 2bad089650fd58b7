"""A stand-in for Hugging Face's ``spaces`` package (ZeroGPU), put on PYTHONPATH by tests/test_space.py:
``spaces.GPU(fn)`` or ``spaces.GPU(duration=seconds or fn(*args))`` wraps a call as ZeroGPU does (generator
functions stay generator functions) and appends ``{"fn", "duration"}`` to the file in ``$FAKE_SPACES_LOG``."""
import functools
import inspect
import json
import os


def _log(name, duration):
    with open(os.environ["FAKE_SPACES_LOG"], "a") as f:
        f.write(json.dumps({"fn": name, "duration": duration}) + "\n")


def GPU(fn=None, duration=60):
    def wrap(f):
        def seconds(args, kwargs):
            return duration(*args, **kwargs) if callable(duration) else duration

        if inspect.isgeneratorfunction(f):
            @functools.wraps(f)
            def gen(*args, **kwargs):
                _log(f.__name__, seconds(args, kwargs))
                yield from f(*args, **kwargs)
            return gen

        @functools.wraps(f)
        def call(*args, **kwargs):
            _log(f.__name__, seconds(args, kwargs))
            return f(*args, **kwargs)
        return call

    return wrap(fn) if callable(fn) else wrap
