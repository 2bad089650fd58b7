"""How torch's CPU threads wait. OpenMP's idle threads spin by default: on a machine whose cores are busy with
anything else they take the cores from the threads doing the work, and a frame can take several times longer
(docs/experiments.md). Sleeping waiters cost a few percent on an idle machine."""
import os


def passive_openmp() -> None:
    """Let idle OpenMP threads sleep (a user's own ``OMP_WAIT_POLICY`` wins). OpenMP reads it once, when torch is
    imported: entry points call this before importing anything that imports torch."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
