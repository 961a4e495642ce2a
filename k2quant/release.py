"""The official Kimi K2 release form: every attention / MLP / expert linear in FP8 e4m3
with a float32 `weight_scale_inv` per 128x128 block; embeddings, lm_head, norms and the
router in bf16; e_score_correction_bias in float32.

Used to write mini-K2 and test checkpoints exactly as Moonshot ships K2, so the reader
and converters are exercised on the real layout.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from .names import parse_name
from .quant.fp8 import DEFAULT_BLOCK, quantize_fp8_block

FP8_QUANTIZATION_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": list(DEFAULT_BLOCK),
}


def release_tensors(state: Mapping[str, torch.Tensor], fp8: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, stored tensor) pairs in the release's dtypes; fp8=False gives the BF16 copy."""
    for name, t in state.items():
        ni = parse_name(name)
        if name.endswith("e_score_correction_bias"):
            yield name, t.detach().to(torch.float32)
        elif fp8 and ni.is_linear and ni.component != "embeddings":  # lm_head stays bf16
            q, s = quantize_fp8_block(t.detach())
            yield name, q
            yield name + "_scale_inv", s
        else:
            yield name, t.detach().to(torch.bfloat16)
