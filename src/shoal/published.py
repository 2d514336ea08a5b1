"""Published config.json figures of large mixture-of-experts models, for the catalog's specs and the
planner's dry runs (no download needed). Literal dicts with the checkpoints' own keys; the MLX
conversions (mlx-community) add MLX's `quantization` and drop the original's."""

from __future__ import annotations

from typing import Any

# Qwen/Qwen3-235B-A22B: 94 layers, all MoE (128 experts, top 8, no shared expert); 235B total, 22B active.
QWEN3_235B_A22B: dict[str, Any] = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 4096,
    "intermediate_size": 12288, "moe_intermediate_size": 1536, "num_hidden_layers": 94, "num_attention_heads": 64,
    "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "hidden_act": "silu", "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None, "attention_bias": False,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}

_YARN = {"beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"}

# deepseek-ai/DeepSeek-V3 (and V3.1, -V3-0324, R1: the same shapes): MLA attention, 3 dense layers then 58
# MoE (256 routed experts, top 8, one shared); FP8 weights; 671B total, 37B active.
DEEPSEEK_V3: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
    "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": True,
    "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-6,
    "rope_theta": 10000, "rope_scaling": {**_YARN, "factor": 40}, "attention_bias": False,
    "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1, "num_nextn_predict_layers": 1,
    "torch_dtype": "bfloat16",
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]},
}

# moonshotai/Kimi-K2-Thinking: the DeepSeek-V3 architecture with 384 experts, 64 heads, one dense
# layer; routed experts in compressed-tensors INT4 (group 32), the rest bf16. 1.04T total, 32B active.
KIMI_K2_THINKING: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "kimi_k2", "vocab_size": 163840,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_attention_heads": 64, "num_key_value_heads": 64, "n_shared_experts": 1, "n_routed_experts": 384,
    "routed_scaling_factor": 2.827, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 1, "topk_group": 1,
    "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 1, "norm_topk_prob": True,
    "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 262144, "rms_norm_eps": 1e-5,
    "rope_theta": 50000.0, "rope_scaling": {**_YARN, "beta_fast": 1.0, "beta_slow": 1.0, "factor": 64.0},
    "attention_bias": False, "tie_word_embeddings": False, "bos_token_id": 163584, "eos_token_id": 163586,
    "num_nextn_predict_layers": 0, "torch_dtype": "bfloat16",
    "quantization_config": {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "output_activations": None, "weights": {
            "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32, "dynamic": False,
            "observer": "minmax", "actorder": None, "block_structure": None}}},
        "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
        "kv_cache_scheme": None,
    },
}


def mlx_quantized(config: dict[str, Any], bits: int, group_size: int = 64) -> dict[str, Any]:
    """The config of an mlx-community conversion: every linear layer and the embedding `bits`-bit."""
    out = {k: v for k, v in config.items() if k != "quantization_config"}
    out["quantization"] = {"group_size": group_size, "bits": bits}
    return out
