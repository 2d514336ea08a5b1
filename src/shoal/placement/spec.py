"""What the planner needs to know about a model: its shape and how many bytes each part takes in
memory once loaded (not on disk: the engine holds fp16/bf16 weights as float32 and quantized
scales as float32, so a Q4_1 file grows by a fifth and a bf16 one doubles).

`ModelSpec.from_checkpoint(path)` reads the config and the tensor sizes of a local checkpoint
without loading any weights; `ModelSpec.from_catalog(entry)` estimates the same from the catalog's
published figures, for models this node has not downloaded.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from shoal.catalog import CatalogEntry

KV_BYTES_PER_VALUE = 4  # the KV cache is float32 (engine/cache.py)


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

    # -- derived sizes
    @property
    def layer_bytes(self) -> int:
        return self.attn_bytes + self.mlp_bytes + self.norm_bytes

    @property
    def weight_bytes(self) -> int:
        return self.num_layers * self.layer_bytes + self.embed_bytes + (0 if self.tied else self.head_bytes)

    @property
    def kv_bytes_per_token_layer(self) -> int:
        """K and V of one token in one layer, all KV heads."""
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
    def from_catalog(cls, entry: CatalogEntry) -> "ModelSpec":
        """An estimate from published figures: the catalog's bytes per parameter, as the engine
        holds them (bf16/fp16 -> float32; ~4.5-bit GGUF quantizations grow by a fifth)."""
        mem_per_param = 4.0 if entry.bytes_per_param >= 2 else entry.bytes_per_param * 1.2
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
        )

    @classmethod
    def from_checkpoint(cls, path: Path, name: str | None = None) -> "ModelSpec":
        """Exact in-memory sizes of a local checkpoint (GGUF file or HF directory), weights unread."""
        from shoal.engine.loader import open_checkpoint
        from shoal.models.llama import ModelArgs
        from shoal.weights.gguf import GGUFCheckpoint

        ckpt = open_checkpoint(path)
        try:
            args = ModelArgs.from_dict(ckpt.config)
            names = ckpt.tensor_names()
            is_gguf = isinstance(ckpt, GGUFCheckpoint)
            quant = getattr(ckpt, "quantization", None)  # MLX: {"bits", "group_size"}

            def mem(tensor: str) -> int:
                params = _params(args, tensor)
                if is_gguf:
                    return int(params * _gguf_memory_per_param(ckpt.tensor_nbytes(tensor) / max(params, 1)))
                if quant and tensor.endswith(("proj.weight", "embed_tokens.weight", "lm_head.weight")):
                    return int(params * (quant["bits"] / 8 + 8 / quant["group_size"]))
                return params * 4  # dense weights are held as float32

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
                group = int(quant["group_size"]) if quant else 1
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


def spec_for(ref: str) -> ModelSpec:
    """The spec of a model reference: exact from the checkpoint when it is on this machine, else
    estimated from the catalog. Raises the loader's ModelNotFound for an unknown reference."""
    from shoal.catalog import CATALOG
    from shoal.engine.loader import ModelNotFound, resolve_model

    try:
        return ModelSpec.from_checkpoint(resolve_model(ref), name=ref)
    except ModelNotFound:
        if ref in CATALOG:
            return ModelSpec.from_catalog(CATALOG[ref])
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
