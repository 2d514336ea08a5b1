"""What the planner needs to know about a model: its shape and how many bytes each part takes in
memory once loaded (not on disk: the engine holds bf16 matrices as bf16, fp16 and float32 ones and
every vector as float32, and quantized scales as float32, so a Q4_1 file grows by a fifth).

`ModelSpec.from_checkpoint(path)` reads the config and the tensor sizes of a local checkpoint
without loading any weights; `ModelSpec.from_catalog(entry)` estimates the same from the catalog's
published figures, for models this node has not downloaded.
"""

from __future__ import annotations

from pathlib import Path

from typing import Any

from pydantic import BaseModel, ConfigDict

from shoal.catalog import CatalogEntry

KV_BYTES_PER_VALUE = 4  # the KV cache is float32 (kernels/cache.py)
MOE_TYPES = ("deepseek_v3", "kimi_k2", "qwen3_moe", "mixtral")
Q4_BYTES_PER_PARAM = 0.75  # 4-bit codes + float32 scale and bias per 32: how INT4/MLX-4bit experts are held
FP8_HELD_BYTES_PER_PARAM = 1.125  # FP8 weights are held as 8-bit codes + a float32 scale per 32
BF16_BYTES_PER_PARAM = 2.0  # bf16 matrices are held as stored
# The names of the matrices (every linear layer's, MLA's kv_a_proj_with_mqa, Mixtral's experts' w1-w3,
# the embedding and head): bf16 ones are held as stored, or all float ones as 8-bit where a placement
# asks (engine/loader.held_as_q8); vectors (norms, biases) become float32.
FLOAT_MATRICES = ("proj.weight", "proj_with_mqa.weight", ".w1.weight", ".w2.weight", ".w3.weight", "embed_tokens.weight",
                  "lm_head.weight")
Q8_HELD_BYTES_PER_PARAM = 1.125  # float matrices held as 8-bit codes + a float32 scale per 32, where asked


def held_float(bpp: float, weights: str) -> float:
    """Bytes a parameter of a float matrix held at `bpp` takes when a placement asks for `weights`
    (contract.HeldAs): "q8" holds bf16, fp16 and float32 matrices as 8-bit codes."""
    return Q8_HELD_BYTES_PER_PARAM if weights == "q8" and bpp >= 2 else bpp


class MoEShape(BaseModel):
    """The mixture-of-experts part of a model, as the planner needs it: what an expert group splits
    (the routed experts, whole, and the shared experts' columns) and what decode reads (only the
    `experts_per_token` routed experts a token picks)."""

    model_config = ConfigDict(frozen=True)

    num_experts: int  # routed experts per MoE layer
    experts_per_token: int  # top-k
    moe_layers: int  # layers with routed experts (the others have a dense MLP)
    expert_bytes: int  # one routed expert of one layer, in memory
    expert_params: int
    shared_bytes: int  # the shared experts of one MoE layer, in memory (cut by columns in an expert group)
    shared_params: int
    shared_size: int  # their intermediate width
    cache_values: int  # cache values per token per layer (MLA: the latent and the rope key)
    active_params: int  # parameters read per token, whole model (the embedding row aside)
    total_params: int


class ModelSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    architecture: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int
    attn_bytes: int  # per layer, in memory: q, k, v, o (+ biases, q/k norms)
    mlp_bytes: int  # per layer, in memory: gate, up, down
    norm_bytes: int  # per layer: the two RMSNorm weights (kept whole on every tensor-parallel rank)
    embed_bytes: int  # the token embedding
    head_bytes: int  # the output head (read once per token); equals embed_bytes when tied
    tied: bool  # the head *is* the embedding: one copy in memory where both live
    quant_group: int = 1  # column cuts of o_proj/down_proj fall on multiples of this (1: dense)
    # Mixture of experts: then `mlp_bytes` is what every rank of an expert group holds whole (the
    # dense layers' MLPs and the routers, averaged over the layers) and `intermediate_size` the
    # dense MLP's; the routed and shared experts are in `moe`.
    moe: MoEShape | None = None
    # The weights as the checkpoint stores them (bf16 as bf16, 4-bit codes with bf16 scales): what
    # MLX holds (placement/cost.py `held_as`). None where not known: then bf16 for float32-held
    # weights and as held for quantized ones.
    stored_bytes: int | None = None

    @property
    def is_moe(self) -> bool:
        return self.moe is not None

    @property
    def routed_bytes(self) -> int:
        """All routed experts of one layer, averaged over the layers."""
        m = self.moe
        return 0 if m is None else m.num_experts * m.expert_bytes * m.moe_layers // self.num_layers

    @property
    def shared_bytes(self) -> int:
        """The shared experts of one layer, averaged over the layers."""
        m = self.moe
        return 0 if m is None else m.shared_bytes * m.moe_layers // self.num_layers

    # -- derived sizes
    @property
    def layer_bytes(self) -> int:
        return self.attn_bytes + self.mlp_bytes + self.norm_bytes + self.shared_bytes + self.routed_bytes

    @property
    def weight_bytes(self) -> int:
        return self.num_layers * self.layer_bytes + self.embed_bytes + (0 if self.tied else self.head_bytes)

    @property
    def kv_bytes_per_token_layer(self) -> int:
        """K and V of one token in one layer, all KV heads (MLA: the compressed cache)."""
        if self.moe is not None and self.moe.cache_values:
            return self.moe.cache_values * KV_BYTES_PER_VALUE
        return 2 * self.num_kv_heads * self.head_dim * KV_BYTES_PER_VALUE

    @property
    def attn_params(self) -> int:
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return self.hidden_size * (2 * q + 2 * kv)

    @property
    def mlp_params(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size

    # -- builders
    @classmethod
    def from_catalog(cls, entry: CatalogEntry, weights: str = "stored") -> "ModelSpec":
        """An estimate from published figures: the catalog's bytes per parameter, as the engine
        holds them (the catalog's 2-byte checkpoints are bf16, held as stored, or as 8-bit where
        `weights` asks; ~4.5-bit GGUF quantizations grow by a fifth). A mixture of experts is built
        from its published config.json (`moe_spec_from_config`)."""
        if entry.config is not None:
            return moe_spec_from_config(dict(entry.config), entry.id, weights)
        mem_per_param = held_float(entry.bytes_per_param, weights) if entry.bytes_per_param >= 2 else entry.bytes_per_param * 1.2
        h, f = entry.hidden_size, entry.intermediate_size
        q, kv = entry.num_heads * entry.head_dim, entry.num_kv_heads * entry.head_dim
        embed = int(entry.vocab_size * h * mem_per_param)
        return cls(
            name=entry.id,
            architecture=entry.architecture,
            num_layers=entry.num_layers,
            hidden_size=h,
            intermediate_size=f,
            num_heads=entry.num_heads,
            num_kv_heads=entry.num_kv_heads,
            head_dim=entry.head_dim,
            vocab_size=entry.vocab_size,
            max_context=entry.context_length,
            attn_bytes=int(h * (2 * q + 2 * kv) * mem_per_param),
            mlp_bytes=int(3 * h * f * mem_per_param),
            norm_bytes=2 * h * 4,
            embed_bytes=embed,
            head_bytes=embed,
            tied=entry.tie_word_embeddings,
            quant_group=32 if mem_per_param < 2 else 1,
            stored_bytes=int(entry.params_b * 1e9 * entry.bytes_per_param),
        )

    @classmethod
    def from_checkpoint(cls, path: Path, name: str | None = None, weights: str = "stored") -> "ModelSpec":
        """Exact in-memory sizes of a local checkpoint (GGUF file or HF directory), weights unread,
        its float matrices held as `weights` asks (contract.HeldAs)."""
        from shoal.engine.loader import open_checkpoint
        from shoal.models.llama import ModelArgs
        from shoal.weights.gguf import GGUFCheckpoint

        ckpt = open_checkpoint(path)
        if ckpt.config.get("model_type") in MOE_TYPES:
            try:
                return _moe_spec_from_checkpoint(ckpt, name or path.stem, weights)
            finally:
                ckpt.close()
        try:
            args = ModelArgs.from_dict(ckpt.config)
            names = ckpt.tensor_names()
            is_gguf = isinstance(ckpt, GGUFCheckpoint)
            quant = getattr(ckpt, "quantization", None)  # MLX: {"bits", "group_size"}

            def mem(tensor: str) -> int:
                params = _params(args, tensor)
                if is_gguf:
                    per_param = _gguf_memory_per_param(ckpt.tensor_nbytes(tensor) / max(params, 1))
                    return int(params * (held_float(per_param, weights) if tensor.endswith(FLOAT_MATRICES) else per_param))
                if quant and tensor.endswith(("proj.weight", "embed_tokens.weight", "lm_head.weight")):
                    return int(params * (quant["bits"] / 8 + 8 / quant["group_size"]))
                if tensor.endswith(FLOAT_MATRICES):  # bf16 held as stored (quant/linear.BF16Linear), or 8-bit where asked
                    return int(params * held_float(2.0 if ckpt.stored_dtype(tensor) == "BF16" else 4.0, weights))
                return params * 4  # the rest as float32

            def layer_sum(i: int, part: str) -> int:
                prefix = f"model.layers.{i}.{part}"
                return sum(mem(n) for n in names if n.startswith(prefix))

            n = args.num_hidden_layers
            attn = max(layer_sum(i, "self_attn.") for i in range(n))
            mlp = max(layer_sum(i, "mlp.") for i in range(n))
            norms = max(layer_sum(i, "input_layernorm") + layer_sum(i, "post_attention_layernorm") for i in range(n))
            embed = mem("model.embed_tokens.weight")
            tied = args.tie_word_embeddings or "lm_head.weight" not in names
            head = embed if tied else mem("lm_head.weight")
            # Quantized GGUF formats all become groups of 32 (or 16, which divides 32).
            down = "model.layers.0.mlp.down_proj.weight"
            if is_gguf:
                group = 32 if mem(down) < 4 * _params(args, down) else 1
            else:
                group = int(quant["group_size"]) if quant else 32 if weights == "q8" else 1
        finally:
            ckpt.close()
        return cls(
            name=name or path.stem,
            architecture=args.model_type,
            num_layers=n,
            hidden_size=args.hidden_size,
            intermediate_size=args.intermediate_size,
            num_heads=args.num_attention_heads,
            num_kv_heads=args.num_key_value_heads,
            head_dim=args.head_dim,
            vocab_size=args.vocab_size,
            max_context=args.max_context,
            attn_bytes=attn,
            mlp_bytes=mlp,
            norm_bytes=norms,
            embed_bytes=embed,
            head_bytes=head,
            tied=tied,
            quant_group=group,
        )


# ----------------------------------------------------------------------------- mixtures of experts
def moe_census(config: dict[str, Any]) -> dict[str, int]:
    """Parameter counts of a DeepSeek-V3 / Kimi-K2, Qwen3-MoE or Mixtral model from its config.json."""
    c = config
    h, L, V = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    if c["model_type"] in ("deepseek_v3", "kimi_k2"):
        H = c["num_attention_heads"]
        nope, rope, v, r, qr = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["kv_lora_rank"], c.get("q_lora_rank")
        q = (h * qr + qr + qr * H * (nope + rope)) if qr else h * H * (nope + rope)
        attn = q + h * (r + rope) + r + r * H * (nope + v) + H * v * h
        moe = sum(1 for i in range(L) if i >= c.get("first_k_dense_replace", 0) and i % c.get("moe_layer_freq", 1) == 0)
        experts, mi = c["n_routed_experts"], c["moe_intermediate_size"]
        shared_size = mi * (c.get("n_shared_experts") or 0)
        router, cache, dense_f = experts * (h + 1), r + rope, c["intermediate_size"]
        kv_heads, head_dim = H, nope + rope
    else:
        H, kv_heads = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
        head_dim = c.get("head_dim") or h // H
        attn = h * H * head_dim * 2 + h * kv_heads * head_dim * 2 + (2 * head_dim if c["model_type"] == "qwen3_moe" else 0)
        experts = c.get("num_experts") or c.get("num_local_experts")
        mi = c.get("moe_intermediate_size") or c["intermediate_size"]
        if c["model_type"] == "mixtral":
            moe = L
        else:
            step, only = c.get("decoder_sparse_step", 1), set(c.get("mlp_only_layers") or [])
            moe = sum(1 for i in range(L) if i not in only and (i + 1) % step == 0)
        shared_size, router, cache, dense_f = 0, experts * h, 0, c["intermediate_size"]
    expert = 3 * h * mi
    dense = L - moe
    top_k = c["num_experts_per_tok"]
    embed = head = V * h
    tied = bool(c.get("tie_word_embeddings"))
    base = L * (attn + 2 * h) + dense * 3 * h * dense_f + moe * (router + 3 * h * shared_size) + h
    return dict(
        layers=L, moe_layers=moe, attn=attn, dense_mlp=3 * h * dense_f, dense_f=dense_f, router=router,
        shared=3 * h * shared_size, shared_size=shared_size, expert=expert, experts=experts, top_k=top_k,
        embed=embed, head=head, tied=int(tied), cache_values=cache, kv_heads=kv_heads, head_dim=head_dim, heads=H,
        total=base + moe * experts * expert + embed + (0 if tied else head),
        active=base + moe * top_k * expert + (head if not tied else embed),
    )


def moe_spec(config: dict[str, Any], name: str, dense_bpp: float, expert_bpp: float, quant_group: int = 1,
             embed_bpp: float | None = None) -> ModelSpec:
    """A mixture-of-experts spec from a config and how many bytes per parameter the engine holds the
    dense tensors (`dense_bpp`: 4 for float32), the routed experts (`expert_bpp`) and the
    embedding and head (`embed_bpp`, default `dense_bpp`) in."""
    embed_bpp = dense_bpp if embed_bpp is None else embed_bpp
    k = moe_census(config)
    L, h = k["layers"], config["hidden_size"]
    replicated_mlp = ((L - k["moe_layers"]) * k["dense_mlp"] + k["moe_layers"] * k["router"]) / L
    return ModelSpec(
        name=name,
        architecture=config["model_type"],
        num_layers=L,
        hidden_size=h,
        intermediate_size=k["dense_f"],
        num_heads=k["heads"],
        num_kv_heads=k["kv_heads"],
        head_dim=k["head_dim"],
        vocab_size=config["vocab_size"],
        max_context=config.get("max_position_embeddings", 4096),
        attn_bytes=int(k["attn"] * dense_bpp),
        mlp_bytes=int(replicated_mlp * dense_bpp),
        norm_bytes=2 * h * 4,
        embed_bytes=int(k["embed"] * embed_bpp),
        head_bytes=int(k["head"] * embed_bpp),
        tied=bool(k["tied"]),
        quant_group=quant_group,
        moe=MoEShape(
            num_experts=k["experts"], experts_per_token=k["top_k"], moe_layers=k["moe_layers"],
            expert_bytes=int(k["expert"] * expert_bpp), expert_params=k["expert"],
            shared_bytes=int(k["shared"] * dense_bpp), shared_params=k["shared"], shared_size=k["shared_size"],
            cache_values=k["cache_values"], active_params=k["active"], total_params=k["total"],
        ),
    )


def moe_spec_from_config(config: dict[str, Any], name: str, weights: str = "stored") -> ModelSpec:
    """A mixture-of-experts spec from a published config.json alone, its quantization read from the
    config as the loader would find it: MLX's `quantization` (every linear and the embedding
    `bits`-bit in groups, bf16 scale and bias held as float32), compressed-tensors INT4 experts
    (Kimi-K2-Thinking: packed, the rest bf16 held as bf16), FP8 (8-bit codes; the embedding and
    head bf16), else bf16 held as bf16. Also
    counts the bytes as stored, which MLX holds."""
    mlx = config.get("quantization")
    qc = config.get("quantization_config") or {}
    if mlx:
        bits, group = int(mlx["bits"]), int(mlx["group_size"])
        held = (bits / 8 + 8 / group,) * 3
        stored = (bits / 8 + 4 / group,) * 3
    elif qc.get("quant_method") == "compressed-tensors":
        group = 32
        held, stored = (BF16_BYTES_PER_PARAM, Q4_BYTES_PER_PARAM, BF16_BYTES_PER_PARAM), (2.0, 0.5 + 2 / group, 2.0)
    elif qc.get("quant_method") == "fp8":
        group = 32
        held, stored = (FP8_HELD_BYTES_PER_PARAM, FP8_HELD_BYTES_PER_PARAM, BF16_BYTES_PER_PARAM), (1.0, 1.0, 2.0)
    else:
        group, held, stored = 1, (BF16_BYTES_PER_PARAM,) * 3, (2.0, 2.0, 2.0)
    if weights == "q8":
        held = tuple(held_float(b, weights) for b in held)
        group = max(group, 32)
    as_stored = moe_spec(config, name, stored[0], stored[1], group, stored[2]).weight_bytes
    return moe_spec(config, name, held[0], held[1], group, held[2]).model_copy(update={"stored_bytes": as_stored})


def _moe_spec_from_checkpoint(ckpt, name: str, weights: str = "stored") -> ModelSpec:
    """Bytes per parameter as the loader will hold them, judged from one stored tensor of each kind:
    4-bit experts (compressed-tensors INT4, MLX 4-bit) stay packed; FP8 linear layers become 8-bit
    codes (1.125, hf_quant.fp8_to_q8); bf16 matrices stay bf16; everything else becomes float32."""
    cfg = ckpt.config
    k = moe_census(cfg)
    names = ckpt.tensor_names()
    expert = next((n for n in names if ".experts." in n and n.endswith(".weight")), None)
    expert_bpp = 4.0
    if expert is not None and ckpt.tensor_nbytes(expert) < 0.7 * k["expert"] / 3:
        expert_bpp = Q4_BYTES_PER_PARAM
    quant = getattr(ckpt, "quantization", None)
    dense = next((n for n in names if n.endswith("self_attn.o_proj.weight")), None)
    dense_bpp = BF16_BYTES_PER_PARAM if dense is not None and ckpt.stored_dtype(dense) == "BF16" else 4.0
    embed_bpp = BF16_BYTES_PER_PARAM if ckpt.stored_dtype("model.embed_tokens.weight") == "BF16" else 4.0
    if expert_bpp == 4.0 and expert is not None and ckpt.stored_dtype(expert) == "BF16":
        expert_bpp = BF16_BYTES_PER_PARAM
    group = 32 if expert_bpp < 1 else 1
    if quant:  # MLX: every linear layer quantized, the embedding too
        dense_bpp, embed_bpp = quant["bits"] / 8 + 8 / quant["group_size"], None
        group = int(quant["group_size"])
    elif (cfg.get("quantization_config") or {}).get("quant_method") == "fp8":
        dense_bpp, group = FP8_HELD_BYTES_PER_PARAM, 32
        expert_bpp = min(expert_bpp, FP8_HELD_BYTES_PER_PARAM)
    if weights == "q8":
        dense_bpp, expert_bpp = held_float(dense_bpp, weights), held_float(expert_bpp, weights)
        embed_bpp = None if embed_bpp is None else held_float(embed_bpp, weights)
        group = max(group, 32)
    spec = moe_spec(cfg, name, dense_bpp, expert_bpp, group, embed_bpp)
    if quant:  # MLX holds it as stored: the scale and bias per group in bf16
        stored = quant["bits"] / 8 + 4 / quant["group_size"]
        return spec.model_copy(update={"stored_bytes": moe_spec(cfg, name, stored, stored, group).weight_bytes})
    return spec


def spec_for(ref: str, weights: str = "stored") -> ModelSpec:
    """The spec of a model reference, its float matrices held as `weights` asks: exact from the
    checkpoint when it is on this machine, else estimated from the catalog. Raises the loader's
    ModelNotFound for an unknown reference."""
    from shoal.catalog import CATALOG
    from shoal.engine.loader import ModelNotFound, resolve_model

    try:
        return ModelSpec.from_checkpoint(resolve_model(ref), name=ref, weights=weights)
    except ModelNotFound:
        if ref in CATALOG:
            return ModelSpec.from_catalog(CATALOG[ref], weights)
        raise


def _params(args, name: str) -> int:
    """Parameter count of a Llama-family tensor, from the config alone."""
    h, d = args.hidden_size, args.head_dim
    q, kv, f = args.num_attention_heads * d, args.num_key_value_heads * d, args.intermediate_size
    shapes = {
        "q_proj.weight": q * h, "k_proj.weight": kv * h, "v_proj.weight": kv * h, "o_proj.weight": h * q,
        "q_proj.bias": q, "k_proj.bias": kv, "v_proj.bias": kv, "q_norm.weight": d, "k_norm.weight": d,
        "gate_proj.weight": f * h, "up_proj.weight": f * h, "down_proj.weight": h * f,
        "input_layernorm.weight": h, "post_attention_layernorm.weight": h, "norm.weight": h,
        "embed_tokens.weight": args.vocab_size * h, "lm_head.weight": args.vocab_size * h,
    }
    for suffix, n in shapes.items():
        if name.endswith(suffix):
            return n
    return 0


def _gguf_memory_per_param(file_bytes_per_param: float) -> float:
    """In-memory bytes per parameter of a GGUF tensor, from its size on disk per parameter (which
    identifies the block format): every 4-bit format becomes 4-bit codes + float32 scale and bias
    per 32 (0.75); Q8_0 becomes int8 + a float32 scale per 32 (1.125); 5- and 6-bit formats become
    8-bit codes (1.25); F16/BF16 become float32 (4)."""
    b = file_bytes_per_param
    if b <= 0.65:  # Q4_0 0.5625, Q4_K 0.5625, Q4_1 0.625
        return 0.75
    if b <= 0.9:  # Q5_0 0.6875, Q5_K 0.6875, Q5_1 0.75, Q6_K 0.82
        return 1.25
    if b <= 1.2:  # Q8_0 1.0625, Q8_K 1.14
        return 1.125
    return 4.0
