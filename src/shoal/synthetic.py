"""Shape-faithful synthetic mixture-of-experts checkpoints, for tests and benchmarks.

`make_checkpoint(kind, out_dir, experts=16, ...)` writes a Hugging Face directory (config.json +
model.safetensors) whose config has the published model's keys and switches (model_type, routing,
YaRN, dense first layers, shared experts...) and whose tensors have the real names and structure,
at reduced sizes and with random weights — a "Kimi-K2-shaped" model with 16 experts is a few MB.
It can be written in the formats the real models ship in:

* `fp32`, `bf16`: plain safetensors;
* `fp8`: DeepSeek-V3's release format — every projection float8_e4m3fn with 128×128 block scales
  (`weight_scale_inv`), everything else bf16;
* `int4`: Kimi-K2-Thinking's — routed experts compressed-tensors pack-quantized (symmetric int4,
  group 32), everything else bf16;
* `mlx4`: an MLX-community 4-bit conversion as mlx-lm writes it — every linear and the embedding
  quantized, routed experts stacked under `switch_mlp`, DeepSeek's kv_b_proj split into
  `embed_q` / `unembed_out`.

`PUBLISHED` keeps the published config.json figures of the real models (no download needed); the
planner dry run (scripts/plan_moe_dry_run.py) reads them too.

CLI: `python -m shoal.synthetic kimi-k2 OUT_DIR --experts 16 --format int4`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path
from typing import Any

import torch

from shoal.published import DEEPSEEK_V3, KIMI_K2_THINKING

# ----------------------------------------------------------------------------- published configs

PUBLISHED: dict[str, dict[str, Any]] = {
    "deepseek-v3": DEEPSEEK_V3,
    "kimi-k2": KIMI_K2_THINKING,
    # Qwen/Qwen3-30B-A3B
    "qwen3-moe": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048,
        "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
        "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "hidden_act": "silu", "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None, "attention_bias": False,
        "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645, "sliding_window": None,
        "torch_dtype": "bfloat16",
    },
    # mistralai/Mixtral-8x7B-v0.1
    "mixtral": {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "num_local_experts": 8, "num_experts_per_tok": 2, "hidden_act": "silu", "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
    },
}

FORMATS = ("fp32", "bf16", "fp8", "int4", "mlx4")


# ----------------------------------------------------------------------------- reduced configs


def tiny_config(kind: str, experts: int = 16, layers: int = 3, hidden: int = 64, vocab: int = 160) -> dict[str, Any]:
    """The published config of `kind` with every size reduced and every switch kept."""
    cfg = copy.deepcopy(PUBLISHED[kind])
    cfg.pop("quantization_config", None)
    top_k = max(2, min(cfg["num_experts_per_tok"], experts // 4))
    heads = max(4, hidden // 16)
    half = max(32, hidden // 2)
    cfg.update(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_experts_per_tok=top_k,
               bos_token_id=1, eos_token_id=2)  # inside the reduced vocabulary
    if cfg["model_type"] in ("deepseek_v3", "kimi_k2"):
        # Head dims keep DeepSeek's 2:1:2 nope:rope:v; widths stay multiples of a 32-wide quantization group.
        cfg.update(num_key_value_heads=heads, intermediate_size=_round32(2.5 * hidden), moe_intermediate_size=half,
                   n_routed_experts=experts, q_lora_rank=half, kv_lora_rank=half, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)
        if cfg["n_group"] > 1:  # group-limited routing: groups of 2, half of them kept
            cfg["n_group"] = max(2, min(cfg["n_group"], experts // 2))
            cfg["topk_group"] = max(1, cfg["n_group"] // 2)
            cfg["num_experts_per_tok"] = min(top_k, cfg["topk_group"] * experts // cfg["n_group"])
        cfg["first_k_dense_replace"] = min(cfg["first_k_dense_replace"], max(1, layers // 3))
        old = 16
        cfg["rope_scaling"] = {**cfg["rope_scaling"], "original_max_position_embeddings": old}
        cfg["max_position_embeddings"] = int(old * cfg["rope_scaling"]["factor"])
    elif cfg["model_type"] == "qwen3_moe":
        cfg.update(num_key_value_heads=heads // 2, head_dim=32, intermediate_size=_round32(1.5 * hidden), moe_intermediate_size=half,
                   num_experts=experts, max_position_embeddings=256)
    else:
        cfg.update(num_key_value_heads=heads // 2, intermediate_size=_round32(1.5 * hidden), num_local_experts=experts,
                   max_position_embeddings=256)
    return cfg


def _round32(x: float) -> int:
    return max(32, int(round(x / 32)) * 32)


def random_weights(cfg: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """float32 tensors under the checkpoint's real names and shapes. Scales keep activations O(1)
    and spread the router, so routing decisions are not near-ties."""
    g = torch.Generator().manual_seed(seed)

    def lin(n: int, k: int) -> torch.Tensor:
        return torch.randn(n, k, generator=g) / math.sqrt(k)

    def norm(n: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(n, generator=g)

    h, V = cfg["hidden_size"], cfg["vocab_size"]
    w = {"model.embed_tokens.weight": torch.randn(V, h, generator=g), "model.norm.weight": norm(h)}
    if not cfg.get("tie_word_embeddings"):
        w["lm_head.weight"] = lin(V, h)
    deepseek = cfg["model_type"] in ("deepseek_v3", "kimi_k2")
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        w[f"{p}.input_layernorm.weight"], w[f"{p}.post_attention_layernorm.weight"] = norm(h), norm(h)
        a = f"{p}.self_attn"
        H = cfg["num_attention_heads"]
        if deepseek:
            nope, rope, vd, r, qr = (cfg[k] for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank", "q_lora_rank"))
            if qr:
                w[f"{a}.q_a_proj.weight"], w[f"{a}.q_a_layernorm.weight"] = lin(qr, h), norm(qr)
                w[f"{a}.q_b_proj.weight"] = lin(H * (nope + rope), qr)
            else:
                w[f"{a}.q_proj.weight"] = lin(H * (nope + rope), h)
            w[f"{a}.kv_a_proj_with_mqa.weight"], w[f"{a}.kv_a_layernorm.weight"] = lin(r + rope, h), norm(r)
            w[f"{a}.kv_b_proj.weight"], w[f"{a}.o_proj.weight"] = lin(H * (nope + vd), r), lin(h, H * vd)
        else:
            d, kv = cfg.get("head_dim") or h // H, cfg["num_key_value_heads"]
            w[f"{a}.q_proj.weight"], w[f"{a}.o_proj.weight"] = lin(H * d, h), lin(h, H * d)
            w[f"{a}.k_proj.weight"], w[f"{a}.v_proj.weight"] = lin(kv * d, h), lin(kv * d, h)
            if cfg["model_type"] == "qwen3_moe":
                w[f"{a}.q_norm.weight"], w[f"{a}.k_norm.weight"] = norm(d), norm(d)
        for name, t in _mlp_weights(cfg, i, lin, g).items():
            w[f"{p}.{name}"] = t
    return w


def _mlp_weights(cfg: dict[str, Any], i: int, lin, g: torch.Generator) -> dict[str, torch.Tensor]:
    h, mt = cfg["hidden_size"], cfg["model_type"]

    def swiglu(prefix: str, f: int, names=("gate_proj", "up_proj", "down_proj")) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{names[0]}.weight": lin(f, h), f"{prefix}.{names[1]}.weight": lin(f, h), f"{prefix}.{names[2]}.weight": lin(h, f)}

    out: dict[str, torch.Tensor] = {}
    if mt in ("deepseek_v3", "kimi_k2"):
        if i < cfg["first_k_dense_replace"] or i % cfg.get("moe_layer_freq", 1):
            return swiglu("mlp", cfg["intermediate_size"])
        E, f = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
        out["mlp.gate.weight"] = 3 * lin(E, h)
        out["mlp.gate.e_score_correction_bias"] = 0.1 * torch.randn(E, generator=g)
        for e in range(E):
            out.update(swiglu(f"mlp.experts.{e}", f))
        out.update(swiglu("mlp.shared_experts", f * cfg["n_shared_experts"]))
        return out
    if mt == "qwen3_moe":
        if i in cfg["mlp_only_layers"] or (i + 1) % cfg["decoder_sparse_step"]:
            return swiglu("mlp", cfg["intermediate_size"])
        E, f, prefix, names = cfg["num_experts"], cfg["moe_intermediate_size"], "mlp", ("gate_proj", "up_proj", "down_proj")
    else:
        E, f, prefix, names = cfg["num_local_experts"], cfg["intermediate_size"], "block_sparse_moe", ("w1", "w3", "w2")
    out[f"{prefix}.gate.weight"] = 3 * lin(E, h)
    for e in range(E):
        out.update(swiglu(f"{prefix}.experts.{e}", f, names))
    return out


# ----------------------------------------------------------------------------- encoders


def fp8_block_quantize(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 scale_inv per block): each block's max maps to 448."""
    N, K = w.shape
    sn, sk = -(-N // block), -(-K // block)
    pad = torch.zeros(sn * block, sk * block)
    pad[:N, :K] = w
    blocks = pad.view(sn, block, sk, block)
    scale = (blocks.abs().amax(dim=(1, 3)) / 448.0).clamp_min(1e-12)  # (sn, sk)
    q = (blocks / scale[:, None, :, None]).view(sn * block, sk * block)[:N, :K]
    return q.to(torch.float8_e4m3fn), scale.float()


def pack_int4(w: torch.Tensor, group: int = 32) -> dict[str, torch.Tensor]:
    """compressed-tensors pack-quantized, symmetric int4 per group: weight_packed / _scale / _shape."""
    N, K = w.shape
    g = w.view(N, K // group, group)
    scale = (g.abs().amax(dim=-1) / 7.5).clamp_min(1e-8).to(torch.bfloat16)  # minmax observer: amax / (range / 2)
    q = torch.clamp(torch.round(g / scale.float()[..., None]), -8, 7).to(torch.int32).view(N, K) + 8
    words = torch.zeros(N, K // 8, dtype=torch.int64)
    for j in range(8):
        words |= q[:, j::8].to(torch.int64) << (4 * j)
    packed = (words - ((words >> 31) << 32)).to(torch.int32)  # two's complement into int32
    return {"weight_packed": packed, "weight_scale": scale, "weight_shape": torch.tensor([N, K], dtype=torch.int32)}


def mlx_quantize(w: torch.Tensor, bits: int = 4, group: int = 32) -> dict[str, torch.Tensor]:
    """MLX affine quantization of (..., N, K): uint32 words (element k in bits [k·bits mod 32, +bits)),
    bf16 scales and biases per group; value = scale·q + bias."""
    *lead, K = w.shape
    g = w.reshape(*lead, K // group, group)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    qmax = (1 << bits) - 1
    scale = ((hi - lo) / qmax).clamp_min(1e-8).to(torch.bfloat16)
    bias = lo.to(torch.bfloat16)
    q = torch.clamp(torch.round((g - bias.float()[..., None]) / scale.float()[..., None]), 0, qmax).to(torch.int64).reshape(*lead, K)
    per = 32 // bits
    words = torch.zeros(*lead, K // per, dtype=torch.int64)
    for j in range(per):
        words |= q[..., j::per] << (bits * j)
    packed = (words - ((words >> 31) << 32)).to(torch.int32).view(torch.uint32)
    return {"weight": packed, "scales": scale, "biases": bias}


def _encode(cfg: dict[str, Any], w: dict[str, torch.Tensor], fmt: str, group: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors in `fmt` and the config with its quantization keys."""
    cfg = dict(cfg)
    keep_f32 = ("e_score_correction_bias",)
    if fmt == "fp32":
        cfg["torch_dtype"] = "float32"
        return dict(w), cfg
    bf16 = {n: (t if n.endswith(keep_f32) else t.to(torch.bfloat16)) for n, t in w.items()}
    if fmt == "bf16":
        return bf16, cfg
    out: dict[str, torch.Tensor] = {}
    if fmt == "fp8":
        cfg["quantization_config"] = copy.deepcopy(PUBLISHED["deepseek-v3"]["quantization_config"])
        for n, t in w.items():
            if n.endswith("_proj.weight") or n.endswith("kv_a_proj_with_mqa.weight"):
                out[n], out[n.removesuffix("weight") + "weight_scale_inv"] = fp8_block_quantize(t)
            else:
                out[n] = bf16[n]
        return out, cfg
    if fmt == "int4":
        qc = copy.deepcopy(PUBLISHED["kimi-k2"]["quantization_config"])
        qc["config_groups"]["group_0"]["weights"]["group_size"] = group
        cfg["quantization_config"] = qc
        for n, t in w.items():
            if ".experts." in n:
                for part, v in pack_int4(t, group).items():
                    out[n.removesuffix("weight") + part] = v
            else:
                out[n] = bf16[n]
        return out, cfg
    if fmt == "mlx4":
        return _encode_mlx(cfg, w, bf16, group)
    raise ValueError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")


def _encode_mlx(cfg, w, bf16, group):
    q = {"group_size": group, "bits": 4}
    deepseek = cfg["model_type"] in ("deepseek_v3", "kimi_k2")
    out: dict[str, torch.Tensor] = {}

    def put(module: str, t: torch.Tensor, bits: int = 4) -> None:
        for part, v in mlx_quantize(t, bits, group).items():
            out[f"{module}.{part}"] = v

    stacks: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for n, t in w.items():
        module = n.removesuffix(".weight")
        if ".experts." in n:  # mlx-lm stacks a layer's experts: (E, N, K) under switch_mlp
            pre, rest = module.split(".experts.")
            e, proj = rest.split(".")
            proj = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}.get(proj, proj)
            stacks.setdefault(f"{pre}.switch_mlp.{proj}", []).append((int(e), t))
        elif n.endswith("kv_b_proj.weight"):  # mlx-lm splits it per head for absorbed attention
            H, nope = cfg["num_attention_heads"], cfg["qk_nope_head_dim"]
            v = t.view(H, nope + cfg["v_head_dim"], -1)
            a = module.removesuffix(".kv_b_proj")
            put(f"{a}.embed_q", v[:, :nope].transpose(1, 2).contiguous())
            put(f"{a}.unembed_out", v[:, nope:].contiguous())
        elif n.endswith(".gate.weight") and not deepseek:
            put(module, t, bits=8)  # mlx-lm keeps MoE routers at 8 bits
            q[module] = {"group_size": group, "bits": 8}
        elif t.dim() == 2 and not n.endswith(".gate.weight"):
            put(module, t)
        else:
            out[n] = bf16[n]
    for module, parts in stacks.items():
        put(module, torch.stack([t for _, t in sorted(parts, key=lambda p: p[0])]))
    cfg["quantization"] = q
    cfg["quantization_config"] = q
    return out, cfg


# ----------------------------------------------------------------------------- entry points


def make_checkpoint(kind: str, out_dir: str | Path, experts: int = 16, layers: int = 3, hidden: int = 64,
                    fmt: str = "bf16", seed: int = 0, group_size: int = 32, vocab: int = 160) -> Path:
    """Write a synthetic `kind` checkpoint (one of PUBLISHED) in `fmt` (one of FORMATS) to out_dir."""
    from safetensors.torch import save_file

    if kind not in PUBLISHED:
        raise ValueError(f"unknown kind {kind!r} (one of {', '.join(PUBLISHED)})")
    cfg = tiny_config(kind, experts, layers, hidden, vocab)
    tensors, cfg = _encode(cfg, random_weights(cfg, seed), fmt, group_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m shoal.synthetic", description="write a shape-faithful synthetic MoE checkpoint")
    ap.add_argument("kind", choices=sorted(PUBLISHED))
    ap.add_argument("out_dir")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--format", dest="fmt", choices=FORMATS, default="bf16")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    path = make_checkpoint(a.kind, a.out_dir, a.experts, a.layers, a.hidden, a.fmt, a.seed)
    print(path)


if __name__ == "__main__":
    main()
