"""How familiar a picture is to a model: the distance of its visual-tokenizer features from the subspace the
model's training pictures span (a PCA residual), in units of the largest distance seen on held-out pictures of
the same kind. Below 1: like what the model was trained on; above 1: unlike anything it saw.

A model trained on a narrow world (the demo model knows only the synthetic story world) says so when a
visitor uploads a photo, instead of silently walking off into its own world. The statistics are fitted when
a model is published (``training.build_demo``) and saved beside the weights as ``familiarity.safetensors``;
models without them (the release) never warn.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

__all__ = ["Familiarity", "FAMILIARITY_FILE"]

FAMILIARITY_FILE = "familiarity.safetensors"


class Familiarity:
    def __init__(self, mean: torch.Tensor, basis: torch.Tensor, threshold: float):
        self.mean = mean.float()      # [D]: the training features' mean (features flattened: n_queries x dim)
        self.basis = basis.float()    # [D, rank]: their principal directions
        self.threshold = float(threshold)  # the residual that counts as 1.0

    @classmethod
    def fit(cls, train: torch.Tensor, held_out: torch.Tensor, rank: int = 128, margin: float = 1.15) -> "Familiarity":
        """``train`` [N, ...] and ``held_out`` [M, ...] features of the model's own kind of pictures. The held-out
        ones set the scale: their largest residual times ``margin`` is 1.0."""
        train, held_out = train.flatten(1).float(), held_out.flatten(1).float()
        rank = min(rank, train.shape[0] - 1, train.shape[1])
        mean = train.mean(0)
        _, _, vh = torch.linalg.svd(train - mean, full_matrices=False)  # exact, so a rebuild gives the same file
        made = cls(mean, vh[:rank].T.contiguous(), 1.0)
        made.threshold = float(made.residual(held_out).max()) * margin
        return made

    def residual(self, features: torch.Tensor) -> torch.Tensor:
        x = features.flatten(1).float() - self.mean  # [n, D]
        return (x - (x @ self.basis) @ self.basis.T).norm(dim=1)

    def distance(self, features: torch.Tensor) -> torch.Tensor:
        """[n]: each picture's distance from the training pictures (> 1: unfamiliar)."""
        return self.residual(features) / self.threshold

    def save(self, folder: str) -> None:
        save_file({"mean": self.mean.contiguous(), "basis": self.basis.contiguous()},
                  os.path.join(folder, FAMILIARITY_FILE), metadata={"threshold": repr(self.threshold)})

    @classmethod
    def load(cls, folder: str) -> Optional["Familiarity"]:
        """The statistics saved in ``folder``; None when it has none."""
        from safetensors import safe_open

        path = os.path.join(folder, FAMILIARITY_FILE)
        if not os.path.isfile(path):
            return None
        with safe_open(path, "pt") as f:
            threshold = float((f.metadata() or {}).get("threshold", "nan"))
        tensors = load_file(path)
        if (set(tensors) != {"mean", "basis"} or not threshold > 0
                or tensors["basis"].shape[0] != tensors["mean"].shape[0]):
            raise ValueError(f"{FAMILIARITY_FILE} is not a familiarity file")
        return cls(tensors["mean"], tensors["basis"], threshold)
