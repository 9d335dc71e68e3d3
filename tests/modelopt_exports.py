"""Real NVIDIA ModelOpt 0.47 exports of random tiny transformers NemotronH models, made as a user
makes them: `mtq.quantize` with a recipe and a calibration loop, then `export_hf_checkpoint`.
The reference logits of each export are those of ModelOpt's own fake-quantized model as the
export sees it: after `requantize_resmooth_fused_llm_layers`, the export's first step (it gives
modules that share an input one NVFP4 global weight scale: q/k/v), and before the export proper
(which replaces the model's weights with their quantized storage).

ModelOpt's FP8 fake quantization runs on the CPU. Its NVFP4 fake quantization does not: in 0.47
the dynamic-block path asserts a CUDA amax and calls a Triton kernel
(`modelopt/torch/kernels/quantization/gemm/fp4_kernel_hopper.py`, `fp4_fake_quant_block`). While
a model is quantized, `cpu_nvfp4_fake_quantization` stands in for exactly that kernel, built on
ModelOpt's own `NVFP4QTensor`: the kernel's block scale (block amax / (6 * global scale), capped at
448, rounded to E4M3, times the global scale; a product under 1e-5 replaced by 1.0, as the kernel
does) is given to `NVFP4QTensor.quantize` as a float32 per-block scale with a second-level scale
of 1.0, so that ModelOpt's own E2M1 rounding (`_cast_fp4`, ties to even) divides each value by
the very float32 the kernel divides by, and `NVFP4QTensor.dequantize` multiplies it back by it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # ModelOpt warns about untested transformers versions on import
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers
    from modelopt.torch.quantization.nn.modules.tensor_quantizer import TensorQuantizer
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor
import transformers

# the same tiny model as the layout tests: 4 experts, pattern M*E-
from test_modelopt_checkpoints import CONFIG, randomize_routing

NVFP4_BLOCK = 16
E2M1_MAX, E4M3_MAX = 6.0, 448.0
KERNEL_MIN_BLOCK_SCALE = 1e-5  # fp4_fake_quant_block divides by 1.0 where the block scale is below this


def _fp8_format() -> dict[str, Any]:
    return {"num_bits": (4, 3), "axis": None}


def _nvfp4_format() -> dict[str, Any]:
    return {"num_bits": (2, 1), "block_sizes": {-1: NVFP4_BLOCK, "type": "dynamic", "scale_bits": (4, 3)}}


def mixed_recipe() -> dict[str, Any]:
    """Like NVIDIA's published Nemotron 3 recipes: NVFP4 (W4A4) routed experts; FP8 (W8A8) shared
    experts, Mamba in/out projections and the dense MLP; attention, lm_head, router, conv1d and
    embeddings left unquantized."""
    quantized = [("*mixer.experts.*", _nvfp4_format()), ("*shared_experts*", _fp8_format()),
                 ("*mixer.in_proj*", _fp8_format()), ("*mixer.out_proj*", _fp8_format()),
                 ("*mixer.up_proj*", _fp8_format()), ("*mixer.down_proj*", _fp8_format())]
    entries: list[dict[str, Any]] = [{"quantizer_name": "*", "enable": False}]
    for pattern, fmt in quantized:
        entries += [{"quantizer_name": f"{pattern}weight_quantizer*", "cfg": fmt},
                    {"quantizer_name": f"{pattern}input_quantizer", "cfg": fmt}]
    return {"quant_cfg": entries, "algorithm": "max"}


RECIPES: dict[str, Callable[[], dict[str, Any]]] = {
    "fp8": lambda: mtq.FP8_DEFAULT_CFG,
    "nvfp4": lambda: mtq.NVFP4_DEFAULT_CFG,
    "mixed": mixed_recipe,
    # FP8 W8A8 GEMMs and an FP8 KV cache, as hf_ptq.py's `--qformat fp8 --kv_cache_qformat fp8`
    "fp8_kv": lambda: {**mtq.FP8_DEFAULT_CFG,
                       "quant_cfg": [*mtq.FP8_DEFAULT_CFG["quant_cfg"], *mtq.FP8_KV_CFG["quant_cfg"]]},
    # the mixed recipe with an FP8 KV cache (quant_algo MIXED_PRECISION, kv_cache_quant_algo FP8)
    "mixed_kv": lambda: {**mixed_recipe(),
                         "quant_cfg": [*mixed_recipe()["quant_cfg"], *mtq.FP8_KV_CFG["quant_cfg"]]},
    # an FP8 KV cache alone: every GEMM float (ModelOpt exports quant_algo null)
    "kv_only": lambda: {"quant_cfg": [{"quantizer_name": "*", "enable": False}, *mtq.FP8_KV_CFG["quant_cfg"]],
                        "algorithm": "max"},
}


def cpu_nvfp4_fake_quantization(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """ModelOpt 0.47's NVFP4 fake quantization (`fp4_fake_quant_block`) on the CPU, on NVFP4QTensor."""
    global_scale = amax.float().reshape(()) / (E2M1_MAX * E4M3_MAX)
    global_scale = torch.where(global_scale > 0, global_scale, torch.tensor(1e-12))
    rows = x.float().reshape(-1, x.shape[-1])
    block_amax = rows.abs().reshape(rows.shape[0], -1, NVFP4_BLOCK).amax(-1)
    fp8_scale = (block_amax / (E2M1_MAX * global_scale)).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    block_scale = fp8_scale.float() * global_scale
    block_scale = torch.where(block_scale >= KERNEL_MIN_BLOCK_SCALE, block_scale, torch.tensor(1.0))
    one = torch.tensor(1.0)
    packed, _, _ = NVFP4QTensor.quantize(rows, NVFP4_BLOCK, weights_scaling_factor=block_scale,
                                         weights_scaling_factor_2=one)
    values = packed.dequantize(torch.float32, scale=block_scale, double_scale=one, block_sizes={-1: NVFP4_BLOCK})
    return values.reshape(x.shape).to(x.dtype)


def _is_dynamic_nvfp4(quantizer: TensorQuantizer) -> bool:
    block_sizes = quantizer.block_sizes or {}
    return (quantizer.num_bits == (2, 1) and block_sizes.get("type") == "dynamic"
            and block_sizes.get("scale_bits") == (4, 3) and block_sizes.get(-1) == NVFP4_BLOCK)


@contextmanager
def nvfp4_fake_quantization_on_cpu() -> Iterator[None]:
    """Route ModelOpt's dynamic NVFP4 fake quantization to `cpu_nvfp4_fake_quantization`; every
    other format runs ModelOpt's own code."""
    original = TensorQuantizer._fake_quantize

    def fake_quantize(self: TensorQuantizer, inputs: torch.Tensor) -> torch.Tensor:
        if _is_dynamic_nvfp4(self) and self.backend is None:
            return cpu_nvfp4_fake_quantization(inputs, self._get_amax(inputs))
        return original(self, inputs)

    TensorQuantizer._fake_quantize = fake_quantize  # type: ignore[method-assign]
    try:
        yield
    finally:
        TensorQuantizer._fake_quantize = original  # type: ignore[method-assign]


def random_model(seed: int = 0) -> Any:
    """A random tiny NemotronHForCausalLM in fp32 with non-trivial routing (the default router
    weights are zeros: every token would pick experts 0 and 1)."""
    torch.manual_seed(seed)
    model = transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**CONFIG)).eval()
    model.config.architectures = ["NemotronHForCausalLM"]  # as from_pretrained sets it; the export reads it
    randomize_routing(model)
    return model


@dataclass(frozen=True)
class Export:
    directory: Path
    prompt: torch.Tensor  # [batch, seq] token ids
    logits: torch.Tensor  # ModelOpt's fake-quantized model on the prompt, fp32


def calibration_batches() -> list[torch.Tensor]:
    """The token batches make_export calibrates with."""
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(0, CONFIG["vocab_size"], (2, 32), generator=generator) for _ in range(4)]


def make_export(recipe: str, directory: Path, seed: int = 0) -> Export:
    """Quantize a random tiny model with ModelOpt and export it to `directory`."""
    model = random_model(seed)
    batches = calibration_batches()
    prompt = torch.randint(0, CONFIG["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(5))

    def calibrate(m: Any) -> None:
        for batch in batches:
            m(batch)

    with torch.no_grad(), warnings.catch_warnings(), nvfp4_fake_quantization_on_cpu():
        warnings.simplefilter("ignore")
        mtq.quantize(model, RECIPES[recipe](), calibrate)
        # export_hf_checkpoint's first step (run here so that the reference sees it): modules that
        # share an input share one NVFP4 global weight scale (q/k/v; fused GEMMs need it).
        # Running it twice is harmless: the second finds the scales already shared.
        requantize_resmooth_fused_llm_layers(model)
        logits = model(prompt).logits.float().clone()
        export_hf_checkpoint(model, export_dir=directory)
    return Export(directory, prompt, logits)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest logit difference relative to the largest reference logit."""
    return float((got - expected).abs().max() / expected.abs().max())


def export_maker(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Export]:
    """A recipe's export, made on first use (for a test module's `exports` fixture)."""
    made: dict[str, Export] = {}

    def get(recipe: str) -> Export:
        if recipe not in made:
            made[recipe] = make_export(recipe, tmp_path_factory.mktemp(f"modelopt-{recipe}") / "export")
        return made[recipe]
    return get
