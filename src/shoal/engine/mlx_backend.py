"""The MLX backend (`--device mlx`): a shard computed by Apple's MLX with mlx-lm's own model files.

mlx-lm keeps an implementation of each architecture (`mlx_lm.models.<model_type>`: its `ModelArgs`
and `Model`), with its `sanitize` for the checkpoint's names; this file does not rewrite them. It
builds mlx-lm's `Model` from the checkpoint's config, keeps only the part's layers — the others are
set to None at their index, as mlx-lm's own pipeline does, so the checkpoint's names still load —
and the embedding, final norm and head where the part holds them, then loads only those tensors.
Safetensors go through `mx.load`, which maps the file and reads a tensor only when it is used, so a
stage never reads another stage's bytes. A GGUF file goes through `mx.load` too (its Q4_0, Q4_1
and Q8_0 tensors arrive packed, as MLX's own affine quantization); MLX reads a GGUF whole, then this
keeps the part's tensors. MLX-community quantized checkpoints (`quantization` in config.json) stay
packed likewise.

`MLXShard` offers a shard's public steps (models/base.Shard: `make_cache`, `embed`, `run_layers`,
`logits`, `forward`) on host float32 torch tensors, crossing to MLX as numpy, so the runner, the
sampler and the wire see what every other backend gives them and a pipeline may mix an MLX stage
with numba or torch stages. The caches are mlx-lm's `KVCache`, one per layer per sequence (its
`offset` is the sequence's position: it must agree with the layout's positions). A flat batch is
run sequence by sequence through the layers (correct first; one lazy graph for the whole step, one
`mx.eval`), not yet as one padded batch.

A rank of a tensor group (`Part.kv_heads`, `Part.ffn`, `Part.vocab`; inside an MoE also
`Part.expert_cols` and `Part.shared`) is mlx-lm's model with each layer cut to the part after
loading (`_cut_to_part`): attention to the part's heads, MLPs and every routed expert to its columns,
the embedding and head to its vocabulary rows. A rank of an expert group (`Part.experts`) keeps its
routed experts (`HeldExperts`) and its columns of the shared experts. mlx-lm's own `shard` needs
an `mx.distributed` group and even splits; shoal's ranks sum over the runner's encrypted links
(runner/stage.TensorGroup) in uneven shares, so each layer that ends a partial product — o_proj, a dense down_proj, a whole MoE
layer (routed and shared experts summed once) — is wrapped in `SummedOverGroup`, which completes it
with the group's all-reduce: the same two collectives a layer, in the same order, as a numba or torch
rank, so MLX, CPU and CUDA ranks make one group (engine/device.MLX_GROUP_FAMILIES: the families
whose layers this file cuts).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import torch
from mlx import nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache
from mlx_lm.utils import infer_quant_config

from shoal.engine.device import MLX_GROUP_FAMILIES
from shoal.models.base import BatchLayout, Part, all_reduce
from shoal.weights.errors import ModelFileError
from shoal.weights.gguf import GGUFCheckpoint, hf_name
from shoal.weights.hf import HFCheckpoint

_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.")


def mlx_family(model_type: str):
    """The mlx-lm model file of a config.json `model_type` (a literal table: grep-able). Only
    families whose every layer takes mlx-lm's plain `KVCache` are here."""
    from mlx_lm.models import deepseek_v3, llama, mixtral, qwen2, qwen3, qwen3_moe

    families = {
        "llama": llama, "mistral": llama, "qwen2": qwen2, "qwen3": qwen3, "qwen3_moe": qwen3_moe, "mixtral": mixtral,
        "deepseek_v3": deepseek_v3, "kimi_k2": deepseek_v3,  # Kimi-K2 is the DeepSeek-V3 architecture
    }
    if model_type not in families:
        raise ValueError(f"--device mlx does not run {model_type!r} (it runs {', '.join(families)})")
    return families[model_type]


class MLXShard:
    """Layers [part.start, part.end) of a model as mlx-lm builds them, with the embedding, final norm
    and head where the part holds them. `args` is shoal's config of the model (what the runner
    reads: hidden_size, max_context); `model` is mlx-lm's `Model`, its other layers None."""

    def __init__(self, args: Any, part: Part, model: nn.Module, tied: bool):
        self.args, self.part, self.model = args, part, model
        self.layers = model.model.layers[part.start : part.end]
        self.embed_tokens = model.model.embed_tokens if part.has_embedding or (part.has_head and tied) else None
        self.norm = model.model.norm if part.has_head else None
        self.lm_head = None
        if part.has_head:  # a tied head is the embedding read as a linear
            self.lm_head = model.model.embed_tokens.as_linear if tied else model.lm_head
        # What the hidden states are computed in: the weights' own float dtype (float32 for fp32
        # checkpoints and for GGUF, whose fp16 scales are widened at load; bf16 for bf16 and MLX ones).
        self.dtype = self.layers[0].input_layernorm.weight.dtype
        self.group = None  # the tensor group a vocabulary-split embedding sums over (`shard`)

    # -- loading

    @classmethod
    def load(cls, ckpt: HFCheckpoint | GGUFCheckpoint, args: Any, part: Part) -> MLXShard:
        """Build the part's share of mlx-lm's model and read only its tensors from `ckpt`."""
        config = _rope_keys(dict(ckpt.config))
        if part.size > 1 and config["model_type"] not in MLX_GROUP_FAMILIES:
            raise ValueError(f"--device mlx: a rank of a {config['model_type']} group is not run on MLX (MLX ranks join "
                             f"the groups of {', '.join(MLX_GROUP_FAMILIES)}; place it as a pipeline stage)")
        if part.size > 1 and (part.kv_heads is None) == (part.experts is None or part.expert_cols is not None):
            raise ValueError("--device mlx: a group's rank holds KV heads (a tensor group) or some routed experts "
                             "(an expert group)")
        gguf = isinstance(ckpt, GGUFCheckpoint)
        if gguf and ckpt.rope_freqs is not None:
            raise ModelFileError(ckpt.path, "--device mlx: GGUF RoPE frequency factors (Llama 3.1) are not read; use the HF checkpoint")
        if gguf and ckpt.arch == "llama":
            # llama.cpp's converter interleaves q and k rows for RoPE: that is MLX's `traditional` RoPE.
            config["rope_traditional"] = True
        family = mlx_family(config["model_type"])
        model = family.Model(family.ModelArgs.from_dict(config))
        tied = bool(config.get("tie_word_embeddings", False))
        names = _checkpoint_names(ckpt)
        tied = tied or "lm_head.weight" not in names
        weights = _read(ckpt, names, lambda n: _held(n, part, tied))
        weights = model.sanitize(weights)  # mlx-lm's renames for the family (stacked experts, MLA's kv_b split)
        # The other stages' layers, and the ends this part lacks, leave the model (mlx-lm's pipeline does the same).
        layers = model.model.layers
        model.model.layers = [None] * part.start + layers[part.start : part.end]
        if not part.has_embedding and not (part.has_head and tied):
            model.model.embed_tokens = None
        if not part.has_head:
            model.model.norm = None
            if "lm_head" in model:
                model.lm_head = None
        elif tied and "lm_head" in model:
            model.lm_head = None
        if any(k.endswith(".scales") for k in weights):
            _quantize(model, weights)
        model.eval()
        try:
            model.load_weights(list(weights.items()), strict=True)
        except ValueError as e:
            raise ModelFileError(ckpt.path, f"--device mlx: the checkpoint does not fit mlx-lm's model ({e})") from None
        if part.size > 1:
            _cut_to_part(model, part, tied)
        # Every array, the modules' private ones too (RoPE frequencies): a lazy array is tied to
        # the stream of the thread that made it, and a rank may compute on another thread.
        mx.eval([v for m in model.modules() for v in m.values() if isinstance(v, mx.array)], model.parameters())
        return cls(args, part, model, tied)

    # -- the Shard interface (models/base.Shard), on host float32 tensors

    def eval(self) -> MLXShard:
        return self

    def shard(self, group: Any | None) -> MLXShard:
        """Join the stage's tensor group (runner/stage.TensorGroup, or any object with its
        `allreduce([x])`): the vocabulary-split embedding and every `SummedOverGroup` sum over it."""
        if self.part.size == 1:
            return self
        self.group = group
        for module in self.model.modules():
            if isinstance(module, SummedOverGroup):
                module.group = group
        return self

    def make_cache(self) -> list[KVCache]:
        """One mlx-lm cache per layer of this shard, for one sequence."""
        return [KVCache() for _ in self.layers]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (T,) -> hidden states (T, hidden)."""
        return _to_host(self._embed(ids))

    def run_layers(self, h: torch.Tensor, layout: BatchLayout) -> torch.Tensor:
        """Hidden states (T, hidden) through this shard's layers."""
        return _to_host(self._run_layers(self._in(h), layout))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and head of some rows (R, hidden) -> logits (R, vocab)."""
        return _to_host(self.lm_head(self.norm(self._in(h))))

    def forward(self, x: torch.Tensor, layout: BatchLayout, logit_rows: torch.Tensor | None = None) -> torch.Tensor:
        """x: token ids (T,) on the first shard, hidden states (T, hidden) otherwise. Returns hidden
        states (T, hidden) on a middle shard; on the last, logits (R, vocab) for `logit_rows` of the
        flat batch (default: each sequence's last token)."""
        h = self._embed(x) if self.part.has_embedding else self._in(x)
        h = self._run_layers(h, layout)
        if self.lm_head is None:
            return _to_host(h)
        if logit_rows is None:
            logit_rows = torch.tensor(np.cumsum(layout.lengths) - 1)
        return _to_host(self.lm_head(self.norm(h[mx.array(logit_rows.numpy())])))

    __call__ = forward

    def _embed(self, ids: torch.Tensor) -> mx.array:
        if self.part.vocab is None:
            return self.embed_tokens(mx.array(ids.numpy())).astype(self.dtype)
        # This rank's vocabulary rows: zeros for the other tokens, and the group's sum assembles each row.
        v0, v1 = self.part.vocab
        mine = (ids >= v0) & (ids < v1)
        rows = self.embed_tokens(mx.array(torch.where(mine, ids - v0, 0).numpy()))
        h = _to_host(rows * mx.array(mine.numpy())[:, None])
        return self._in(all_reduce(h, self.group))

    def _in(self, h: torch.Tensor) -> mx.array:
        return mx.array(h.numpy()).astype(self.dtype)

    def _run_layers(self, h: mx.array, layout: BatchLayout) -> mx.array:
        """Each sequence's rows through every layer with its own caches; (T, hidden) in and out."""
        out, row = [], 0
        for n, caches in zip(layout.lengths, layout.caches, strict=True):
            if caches[0].offset != int(layout.positions[row]):
                raise ValueError(f"a sequence's cache holds {caches[0].offset} tokens, its new tokens start at {int(layout.positions[row])}")
            x = h[row : row + n][None]  # (1, n, hidden)
            # An array mask (not mlx-lm's "causal" shortcut), which every family's attention takes.
            mask = create_attention_mask(x, caches[0], return_array=True)
            for layer, cache in zip(self.layers, caches, strict=True):
                x = layer(x, mask, cache)
            out.append(x[0])
            row += n
        return mx.concatenate(out) if len(out) > 1 else out[0]


# ----------------------------------------------------------------------------- tensor groups


class SummedOverGroup(nn.Module):
    """A layer whose output is this rank's share of a sum over the group — a row-split linear (o_proj,
    down_proj holding some input columns) or a whole MoE layer (some experts, or some columns of
    every expert) —, made the whole by the group's all-reduce (models/base.all_reduce: shoal's links,
    or MLX's ring sealed). The sum runs on host float32, as every rank's partials travel."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.group = None  # set by MLXShard.shard

    def __call__(self, x: mx.array) -> mx.array:
        y = self.layer(x)
        total = all_reduce(_to_host(y.reshape(-1, y.shape[-1])), self.group)  # (tokens, hidden), as every rank sends it
        return mx.array(total.numpy()).astype(y.dtype).reshape(y.shape)


class HeldExperts(nn.Module):
    """An expert group's rank's routed experts: mlx-lm's SwitchGLU keeping only the held experts
    (`ids`), indexed by a lookup from the router's global ids. A token's pick of an expert held
    elsewhere adds nothing here (its output is zeroed; the rank it is held on adds it), so the MoE
    layer's sum over the group adds each pick once. (Such a pick is computed on local expert 0 and
    dropped: one more read of an expert already read, instead of a data-dependent gather.)"""

    def __init__(self, switch: nn.Module, ids: tuple[int, ...], num_experts: int):
        super().__init__()
        self.switch = switch
        lookup = np.full(num_experts, -1, np.int32)
        lookup[list(ids)] = np.arange(len(ids), dtype=np.int32)
        self._lookup = mx.array(lookup)  # private: not a parameter

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        local = self._lookup[indices]
        mine = local >= 0
        y = self.switch(x, mx.where(mine, local, 0))
        return y * mine[..., None].astype(y.dtype)


def _keep_experts(switch: nn.Module, ids: tuple[int, ...]) -> None:
    """Only the experts `ids` of each of a SwitchGLU's stacked projections (weights, packed scales and
    biases, a bias) — the rest of the stack is dropped before it is evaluated."""
    keep = mx.array(list(ids))
    for proj in (switch.gate_proj, switch.up_proj, switch.down_proj):
        for key in ("weight", "scales", "biases", "bias"):
            if key in proj:
                proj[key] = proj[key][keep]


def _cut_to_part(model: nn.Module, part: Part, tied: bool) -> None:
    """Cut the loaded (still lazy) layers, embedding and head to a group rank's share, as the numba
    engine's `slice_weight`s and `required_weights` cut theirs. A rank of an expert group keeps
    attention and dense MLPs whole, its routed experts (`HeldExperts`) and its columns of the shared
    experts, and sums each MoE layer over the group. A rank of a tensor group is cut:
    - attention: the part's heads — GQA's KV heads with their query heads (q/k/v by rows), or MLA's
      heads (q by rows, the per-head latent projections by head) —, o_proj by input columns;
    - a dense MLP: gate/up by rows, down by columns ([ffn));
    - an MoE layer: every routed expert's columns [expert_cols) and the shared experts' [shared),
      the router whole, and the layer's output (routed plus shared partials) summed once;
    - the embedding and head: the vocabulary rows [vocab).
    Every sum over the group is a `SummedOverGroup`: as many, in the same order, as on every other
    backend (a tensor rank two a layer, an expert rank one an MoE layer)."""
    experts_only = part.kv_heads is None
    for layer in model.model.layers[part.start : part.end]:
        ffn = "block_sparse_moe" if "block_sparse_moe" in layer else "mlp"  # Mixtral's name, everyone else's
        mlp = layer[ffn]
        if experts_only:
            if "switch_mlp" in mlp:
                mlp.switch_mlp = HeldExperts(mlp.switch_mlp, part.experts, mlp.switch_mlp.gate_proj.weight.shape[0])
                _keep_experts(mlp.switch_mlp.switch, part.experts)
                if "shared_experts" in mlp and part.shared is not None:
                    _cut_mlp(mlp.shared_experts, *part.shared, part.rank == 0)
                setattr(layer, ffn, SummedOverGroup(mlp))
                mx.eval(layer.parameters())  # one layer's whole stack of experts in memory at a time, not every layer's
            continue
        attn = layer.self_attn
        if "kv_a_proj_with_mqa" in attn:  # MLA (DeepSeek-V3, Kimi-K2): the latent projections stay whole
            h0, h1 = part.kv_heads
            _keep_rows(attn.q_b_proj if "q_b_proj" in attn else attn.q_proj, h0 * attn.q_head_dim, h1 * attn.q_head_dim)
            for per_head in (attn.embed_q, attn.unembed_out):
                for key in ("weight", "scales", "biases"):
                    if key in per_head:
                        per_head[key] = per_head[key][h0:h1]
            attn.o_proj = SummedOverGroup(_keep_cols(attn.o_proj, h0 * attn.v_head_dim, h1 * attn.v_head_dim, part.rank == 0))
            attn.num_heads = h1 - h0
        else:
            heads, kv_heads = ("n_heads", "n_kv_heads") if hasattr(attn, "n_heads") else ("num_heads", "num_key_value_heads")
            kv0, kv1 = part.kv_heads
            per_kv = getattr(attn, heads) // getattr(attn, kv_heads)
            d = attn.k_proj.weight.shape[0] // getattr(attn, kv_heads)
            _keep_rows(attn.q_proj, kv0 * per_kv * d, kv1 * per_kv * d)
            _keep_rows(attn.k_proj, kv0 * d, kv1 * d)
            _keep_rows(attn.v_proj, kv0 * d, kv1 * d)
            attn.o_proj = SummedOverGroup(_keep_cols(attn.o_proj, kv0 * per_kv * d, kv1 * per_kv * d, part.rank == 0))
            setattr(attn, heads, (kv1 - kv0) * per_kv)
            setattr(attn, kv_heads, kv1 - kv0)
        if "switch_mlp" in mlp:
            _cut_mlp(mlp.switch_mlp, *part.expert_cols, part.rank == 0)
            if "shared_experts" in mlp:
                _cut_mlp(mlp.shared_experts, *(part.shared or (0, mlp.shared_experts.gate_proj.weight.shape[-2])), part.rank == 0)
            setattr(layer, ffn, SummedOverGroup(mlp))
        else:
            _cut_mlp(mlp, *part.ffn, part.rank == 0)
            mlp.down_proj = SummedOverGroup(mlp.down_proj)
    if part.vocab is not None:
        v0, v1 = part.vocab
        if model.model.embed_tokens is not None:  # a tied head is this same (cut) table
            _keep_rows(model.model.embed_tokens, v0, v1)
        if part.has_head and not tied:
            _keep_rows(model.lm_head, v0, v1)


def _cut_mlp(mlp: nn.Module, a: int, b: int, keeps_bias: bool) -> None:
    """A gated MLP (or every expert of a SwitchGLU) cut to its intermediate columns [a, b)."""
    _keep_rows(mlp.gate_proj, a, b)
    _keep_rows(mlp.up_proj, a, b)
    _keep_cols(mlp.down_proj, a, b, keeps_bias)


def _keep_rows(layer: nn.Module, a: int, b: int) -> None:
    """Output rows [a, b) of a linear or embedding, plain or packed, or of every expert of a
    SwitchLinear (the rows are the second-last axis; a packed layer's scales and biases go with them)."""
    for key in ("weight", "scales", "biases"):
        if key in layer:
            layer[key] = layer[key][..., a:b, :]
    if "bias" in layer:
        layer.bias = layer.bias[..., a:b]


def _keep_cols(layer: nn.Module, a: int, b: int, keeps_bias: bool) -> nn.Module:
    """Input columns [a, b) of a linear (or of every expert of a SwitchLinear), plain or packed. A
    packed layer is cut between whole quantization groups; a bias is added once, by the group's
    first rank."""
    if "scales" in layer:
        g, bits = layer.group_size, layer.bits
        if a % g or b % g:
            raise ValueError(f"--device mlx: a tensor-parallel cut at columns {a}-{b} splits a quantization group of {g}")
        layer.weight = layer.weight[..., a * bits // 32 : b * bits // 32]
        layer.scales = layer.scales[..., a // g : b // g]
        if "biases" in layer:
            layer.biases = layer.biases[..., a // g : b // g]
    else:
        layer.weight = layer.weight[..., a:b]
    if "bias" in layer and not keeps_bias:
        del layer["bias"]
    return layer


# ----------------------------------------------------------------------------- prefix copies


def keep_prefix(caches: list[KVCache], n: int) -> list[tuple[mx.array, mx.array]]:
    """The first n tokens of a sequence's caches (engine/prefix.CopyKeeper). MLX arrays are values:
    a later write to the cache makes a new buffer rather than changing these."""
    kept = [(c.keys[..., :n, :], c.values[..., :n, :]) for c in caches]
    mx.eval(kept)
    return kept


def load_prefix(caches: list[KVCache], kept: list[tuple[mx.array, mx.array]], n: int) -> None:
    """Fill a new sequence's empty caches with the first n tokens of a kept prefix."""
    for cache, (k, v) in zip(caches, kept, strict=True):
        cache.update_and_fetch(k[..., :n, :], v[..., :n, :])


# ----------------------------------------------------------------------------- reading a checkpoint


def _rope_keys(config: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 writes `rope_parameters`; mlx-lm's model files read `rope_theta` and `rope_scaling`."""
    params = config.get("rope_parameters") or {}
    if "rope_theta" not in config and "rope_theta" in params:
        config["rope_theta"] = params["rope_theta"]
    if config.get("rope_scaling") is None and params.get("rope_type", "default") != "default":
        config["rope_scaling"] = params
    return config


def _held(name: str, part: Part, tied: bool) -> bool:
    """Whether a part holds a checkpoint tensor (by its HF name; `.scales`/`.biases` go with their weight)."""
    m = _LAYER_RE.match(name)
    if m:
        return part.start <= int(m.group(1)) < part.end  # layers past the model's (DeepSeek's MTP) are never held
    if name.startswith("model.embed_tokens."):
        return part.has_embedding or (part.has_head and tied)
    if name.startswith(("model.norm.", "lm_head.")):
        return part.has_head
    return False


def _checkpoint_names(ckpt: HFCheckpoint | GGUFCheckpoint) -> set[str]:
    if isinstance(ckpt, GGUFCheckpoint):
        return set(ckpt.tensor_names())
    return set(_safetensors_files(ckpt.path))


def _safetensors_files(path: Path) -> dict[str, Path]:
    """Each stored tensor's file: from model.safetensors.index.json, else from each file's header."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        return {k: path / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    files = {}
    for f in sorted(path.glob("*.safetensors")):
        files.update(dict.fromkeys(_header_names(f), f))
    return files


def _header_names(f: Path) -> list[str]:
    with open(f, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        return [k for k in json.loads(fh.read(n)) if k != "__metadata__"]


def _read(ckpt: HFCheckpoint | GGUFCheckpoint, names: set[str], held) -> dict[str, mx.array]:
    """The held tensors of a checkpoint under their HF names, as MLX arrays."""
    if isinstance(ckpt, GGUFCheckpoint):
        out = {}
        for gname, a in mx.load(str(ckpt.path)).items():
            base, _, suffix = gname.rpartition(".")
            name = hf_name(base + ".weight")
            if name is None or not held(name):
                continue
            # GGUF scales and biases are fp16: widened, so the matmuls run in float32 like the reference.
            out[name[: -len("weight")] + suffix] = a.astype(mx.float32) if a.dtype == mx.float16 else a
        return out
    files = _safetensors_files(ckpt.path)
    out = {}
    for f in sorted({files[n] for n in names if held(n)}):
        out.update({k: v for k, v in mx.load(str(f)).items() if held(k)})  # lazy: unread until evaluated
    return out


def _quantize(model: nn.Module, weights: dict[str, mx.array]) -> None:
    """Make packed layers of the modules whose weights arrive packed (`<name>.scales` beside them),
    each with the group size and bits its tensors show (mlx-lm's `infer_quant_config`)."""

    def predicate(path: str, module: nn.Module) -> bool | dict:
        return f"{path}.scales" in weights and infer_quant_config(path, module, weights)

    nn.quantize(model, class_predicate=predicate)


def _to_host(a: mx.array) -> torch.Tensor:
    return torch.from_numpy(np.array(a.astype(mx.float32)))


__all__ = ["MLXShard", "SummedOverGroup", "keep_prefix", "load_prefix", "mlx_family"]
