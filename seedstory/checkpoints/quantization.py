"""8-/4-bit LLM weights through bitsandbytes (``runtime.llm_quantization``; CUDA only).

What is supported, precisely: after the agent is loaded (LoRA merged, in the preset's dtype, on the CPU), every
``nn.Linear`` inside the LLM's decoder layers (q/k/v/o and gate/up/down projections: 6.5 B of Llama-2-7b's
6.7 B parameters) is replaced by ``bnb.nn.Linear8bitLt`` (LLM.int8(), threshold 6.0, int8 weights) or
``bnb.nn.Linear4bit`` (NF4, compute in the preset's dtype), and quantized as it moves to the GPU, one layer at a
time, so the full-precision LLM never sits on the GPU. Embeddings, ``lm_head``, norms and both resamplers keep
the preset's dtype. Quantization is for inference only; quantized pipelines cannot be saved (``convert`` always
writes full-precision weights). ``runtime_options`` (seedstory.config) refuses it up front without CUDA or
without bitsandbytes.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..config import LLM_QUANTIZATION, PresetError


def decoder_linears(llm: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """``(parent, attribute, linear)`` for every ``nn.Linear`` inside the decoder layers."""
    out = []
    for layer in llm.get_decoder().layers:
        for parent in layer.modules():
            for name, child in parent.named_children():
                if type(child) is nn.Linear:
                    out.append((parent, name, child))
    return out


def quantize_llm(llm: nn.Module, mode: str, device, compute_dtype: Optional[torch.dtype] = None) -> int:
    """Replace the decoder Linears of ``llm`` by bitsandbytes layers quantized on ``device`` (CUDA). Returns
    how many were replaced. The rest of ``llm`` is left where it is (move it afterwards)."""
    if mode not in LLM_QUANTIZATION:
        raise PresetError(f"llm_quantization must be one of {', '.join(LLM_QUANTIZATION)}, got {mode!r}")
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise PresetError(f"llm_quantization={mode} needs a CUDA device, got {device}")
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise PresetError(f"llm_quantization={mode} needs the bitsandbytes package (pip install bitsandbytes)") from e

    compute_dtype = compute_dtype or torch.float16
    n = 0
    for parent, name, lin in decoder_linears(llm):
        w = lin.weight.detach().to("cpu")
        bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().to(compute_dtype), requires_grad=False)
        if mode == "8bit":
            new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=bias is not None,
                                      has_fp16_weights=False, threshold=6.0)
            new.weight = bnb.nn.Int8Params(w.to(torch.float16), requires_grad=False, has_fp16_weights=False)
        else:
            new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=bias is not None,
                                    compute_dtype=compute_dtype, quant_type="nf4")
            new.weight = bnb.nn.Params4bit(w.to(compute_dtype), requires_grad=False, quant_type="nf4")
        if bias is not None:
            new.bias = bias
        setattr(parent, name, new.to(device))  # bitsandbytes quantizes on the move to CUDA
        del lin, w
        n += 1
    return n


def quantized_bytes(parameters: int, mode: str) -> float:
    """Approximate bytes per Linear parameter after quantization (int8: 1 + per-row scales; NF4: 0.5 + block
    absmax, double-quantized)."""
    return parameters * {"8bit": 1.0 + 1 / 512, "4bit": 0.5 + 1 / 64}[mode]
