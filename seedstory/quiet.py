"""Our commands and the app print what their user needs. The libraries under them print notices meant for their
own developers on every run: image processors falling back to PIL without torchvision (at import), a weights
progress bar for a model that loads in milliseconds, and a cast warning diffusers gives for every dtype passed to
``ModelMixin.to`` even when nothing is kept in float32. Entry points call ``quiet_libraries`` before importing
them; errors still show, ``SEEDSTORY_VERBOSE=1`` keeps everything, and ``import seedstory`` changes nobody's
logging."""
import contextlib
import os


def _verbose() -> bool:
    return os.environ.get("SEEDSTORY_VERBOSE", "") not in ("", "0")


def quiet_libraries() -> None:
    if _verbose():
        return
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()


@contextlib.contextmanager
def no_fallback_notice():
    """For ``import seedstory`` itself, which changes nobody's logging: diffusers' SDXL pipeline imports CLIP and
    SigLIP image processors we never use, and without torchvision (which we do not need) transformers announces
    that they fall back to PIL. Its verbosity is raised for that import only, then put back as it was."""
    if _verbose():
        yield
        return
    import transformers.utils.logging as transformers_logging

    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(level)
