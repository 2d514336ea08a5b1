"""Mixture-of-experts models: logits equal transformers' DeepseekV3, Qwen3Moe and Mixtral on tiny
synthetic checkpoints (shoal.synthetic), in fp32 and in the quantized formats the real models ship
in; the MLA cache holds kv_lora_rank + qk_rope_head_dim values per token per layer; expert-parallel
shards (2 and 3 ranks, and expert × pipeline) summed by an all-reduce done by hand in one process
equal the whole model token for token.
"""

from __future__ import annotations

import json
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from shoal.engine.loader import load_model, load_shard  # noqa: E402
from shoal.kernels.mla_cache import MLACache  # noqa: E402
from shoal.models.base import BatchLayout, Part  # noqa: E402
from shoal.models.moe import RoutedExperts, split_experts  # noqa: E402
from shoal.synthetic import make_checkpoint  # noqa: E402

IDS = [3, 17, 42, 5, 88, 1, 60, 23, 9, 71, 33, 2, 150, 99, 7, 120, 64, 31, 8, 140]
LONG = [(7 * i + 3) % 160 for i in range(40)]  # past the tiny YaRN models' original context (16)


# ----------------------------------------------------------------------------- helpers


def reference(path, tmp_path):
    """transformers' model of a synthetic fp32 checkpoint (Kimi's model_type is DeepSeek-V3's class)."""
    cfg = json.loads((path / "config.json").read_text())
    if cfg["model_type"] == "kimi_k2":
        ref_dir = tmp_path / "ref"
        ref_dir.mkdir(exist_ok=True)
        (ref_dir / "config.json").write_text(json.dumps({**cfg, "model_type": "deepseek_v3"}))
        (ref_dir / "model.safetensors").symlink_to(path / "model.safetensors")
        path = ref_dir
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def run_ours(model, ids: list[int], caches=None) -> torch.Tensor:
    caches = caches or model.make_cache()
    layout = BatchLayout([len(ids)], torch.arange(caches[0].offset, caches[0].offset + len(ids)), [caches])
    with torch.inference_mode():
        return model(torch.tensor(ids), layout, torch.arange(len(ids)))


def run_ref(ref, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0].float()


@pytest.fixture(scope="module")
def ckpts(moe_ckpts):
    """One fp32 synthetic checkpoint per family (conftest's, made once for the session)."""
    return moe_ckpts


# ----------------------------------------------------------------------------- equivalence with transformers


@pytest.mark.parametrize("kind", ["kimi-k2", "deepseek-v3", "qwen3-moe", "mixtral"])
def test_logits_match_transformers(ckpts, tmp_path, kind):
    ref = reference(ckpts[kind], tmp_path)
    lm = load_model(str(ckpts[kind]), with_tokenizer=False)
    ids = LONG if kind in ("kimi-k2", "deepseek-v3") else IDS
    ours, theirs = run_ours(lm.model, ids), run_ref(ref, ids)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("absorb", [True, False], ids=["absorbed", "expanded"])
def test_mla_both_attention_forms_and_incremental_decode(ckpts, tmp_path, absorb):
    ref = reference(ckpts["deepseek-v3"], tmp_path)
    lm = load_model(str(ckpts["deepseek-v3"]), with_tokenizer=False)
    for layer in lm.model.layers:
        layer.self_attn.absorb_max_tokens = 1 << 30 if absorb else 0
    full = run_ref(ref, LONG)
    caches = lm.model.make_cache()
    rows = [run_ours(lm.model, LONG[a:b], caches) for a, b in [(0, 9), (9, 30)] + [(i, i + 1) for i in range(30, 40)]]
    torch.testing.assert_close(torch.cat(rows), full, atol=1e-4, rtol=1e-4)


def test_mla_cache_holds_latent_and_rope_key_only(ckpts):
    lm = load_model(str(ckpts["kimi-k2"]), with_tokenizer=False)
    args = lm.model.args
    caches = lm.model.make_cache()
    run_ours(lm.model, IDS, caches)
    assert len(caches) == args.num_hidden_layers
    for c in caches:
        assert isinstance(c, MLACache) and c.offset == len(IDS)
        assert c.values_per_token == args.kv_lora_rank + args.qk_rope_head_dim == 48
        assert c.bytes_per_token == 4 * 48
    full_kv = 2 * args.num_attention_heads * (args.qk_nope_head_dim + args.qk_rope_head_dim)
    assert c.values_per_token < full_kv / 5


def test_flat_batch_of_different_lengths(ckpts):
    lm = load_model(str(ckpts["kimi-k2"]), with_tokenizer=False)
    a, b, c = IDS[:5], IDS[2:13], IDS[7:8]
    caches = [lm.model.make_cache() for _ in range(3)]
    layout = BatchLayout([5, 11, 1], torch.cat([torch.arange(5), torch.arange(11), torch.arange(1)]), caches)
    with torch.inference_mode():
        out = lm.model(torch.tensor(a + b + c), layout, torch.arange(17))
    alone = torch.cat([run_ours(lm.model, s) for s in (a, b, c)])
    torch.testing.assert_close(out, alone, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- expert parallel in one process


class HandAllReduce:
    """A stand-in for a torch.distributed group of `size` ranks in one process (each rank a
    thread): `member(rank).allreduce([t]).wait()` sums t over the ranks in rank order, so every
    rank gets the same bits — the all-reduce of `SparseMoE.forward`, done by hand."""

    def __init__(self, size: int):
        self.size, self.parts = size, [None] * size
        self.barrier = threading.Barrier(size, timeout=60)
        self.calls = 0

    def member(self, rank: int):
        group = self

        class Member:
            def allreduce(self, tensors):
                group.parts[rank] = tensors[0].clone()
                group.barrier.wait()
                total = group.parts[0].clone()
                for p in group.parts[1:]:
                    total += p
                group.barrier.wait()  # everyone has read the parts before any is overwritten
                tensors[0].copy_(total)
                if rank == 0:
                    group.calls += 1
                return self

            def wait(self):
                return True

        return Member()


def run_ranks(models, fn):
    """fn(rank, model) on one thread per rank; returns the results in rank order."""
    results, errors = [None] * len(models), []

    def work(r):
        try:
            results[r] = fn(r, models[r])
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(r,)) for r in range(len(models))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def greedy(step, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy decode with `step(ids, start) -> last-row logits`; returns tokens and every step's logits."""
    logits = [step(prompt, 0)]
    out = [int(logits[-1].argmax())]
    for i in range(n - 1):
        logits.append(step([out[-1]], len(prompt) + i))
        out.append(int(logits[-1].argmax()))
    return out, torch.stack(logits)


def shard_step(model, caches):
    def step(ids, start):
        layout = BatchLayout([len(ids)], torch.arange(start, start + len(ids)), [caches])
        with torch.inference_mode():
            return model(torch.tensor(ids), layout)[-1]

    return step


@pytest.mark.parametrize("kind,ranks", [("kimi-k2", 2), ("kimi-k2", 3), ("deepseek-v3", 3), ("qwen3-moe", 2), ("mixtral", 3)])
def test_expert_parallel_equals_whole_model(ckpts, kind, ranks):
    path = ckpts[kind]
    whole = load_model(str(path), with_tokenizer=False).model
    n_layers, args = whole.args.num_hidden_layers, whole.args
    n_experts = args.n_routed_experts if kind in ("kimi-k2", "deepseek-v3") else args.n_experts
    shared = args.shared_size if kind in ("kimi-k2", "deepseek-v3") else 0
    slices = split_experts(n_experts, [1.0, 2.0, 1.5][:ranks], shared, align=8)
    assert sorted(e for s in slices for e in s.experts) == list(range(n_experts))
    group = HandAllReduce(ranks)
    shards = [load_shard(str(path), s).model.shard(group.member(s.rank)) for s in slices]

    # Each shard holds only its experts: the routed-expert bytes split like the experts do.
    for s, m in zip(slices, shards):
        held = [mod for mod in m.modules() if isinstance(mod, RoutedExperts)]
        assert held and all(h.ids == s.experts for h in held)

    want_tokens, want_logits = greedy(shard_step(whole, whole.make_cache()), IDS[:9], 8)
    got = run_ranks(shards, lambda r, m: greedy(shard_step(m, m.make_cache()), IDS[:9], 8))
    for tokens, logits in got:
        assert tokens == want_tokens
        torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=1e-5)
    moe_layers = sum(args.is_moe(i) for i in range(n_layers))
    assert group.calls == 8 * moe_layers  # exactly one all-reduce per MoE layer per step


def tensor_moe_parts(whole, kind: str) -> tuple[list[Part], list[int]]:
    """Two ranks of a tensor group inside an MoE, cut 1:2 (a speed ratio): heads (GQA KV heads, or
    MLA heads), every routed expert's columns, the shared experts' and dense MLPs' columns; and the
    prompt to decode from."""
    args = whole.args
    mla = kind in ("deepseek-v3", "kimi-k2")
    width = args.moe_intermediate_size if mla else args.expert_size
    n_experts = args.n_routed_experts if mla else args.n_experts
    heads = args.num_attention_heads if mla else args.num_key_value_heads
    shared = args.shared_size if mla else 0

    def thirds(n: int) -> list[tuple[int, int]]:
        cut = max(1, n // 3)
        return [(0, cut), (cut, n)]

    parts = [Part(rank=r, size=2, kv_heads=thirds(heads)[r], ffn=thirds(args.intermediate_size)[r],
                  experts=tuple(range(n_experts)), expert_cols=thirds(width)[r], shared=thirds(shared)[r] if shared else None)
             for r in range(2)]
    return parts, LONG[:12] if mla else IDS[:9]


def check_tensor_moe_ranks(whole, shards, ids: list[int], group: HandAllReduce) -> None:
    """The ranks' 8 greedy tokens and logits equal the whole model's, with two all-reduces a layer a step."""
    want_tokens, want_logits = greedy(shard_step(whole, whole.make_cache()), ids, 8)
    got = run_ranks(shards, lambda r, m: greedy(shard_step(m, m.make_cache()), ids, 8))
    for tokens, logits in got:
        assert tokens == want_tokens
        torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=1e-4)
    assert group.calls == 8 * 2 * whole.args.num_hidden_layers


@pytest.mark.parametrize("kind", ["qwen3-moe", "mixtral", "deepseek-v3", "kimi-k2"])
def test_tensor_parallel_inside_an_moe_group_equals_whole_model(ckpts, kind):
    """Tensor parallel inside an MoE group, as exo runs MoE models: each of 2 ranks holds its heads
    (GQA KV heads with their query heads; MLA heads, the latent projections whole) and the columns
    [expert_cols) of every routed expert, its columns of the shared experts and dense MLPs, uneven
    by a 1:2 speed ratio; the routers whole; one all-reduce after attention and one after the MLP.
    Greedy tokens and logits equal the whole model's."""
    path = ckpts[kind]
    whole = load_model(str(path), with_tokenizer=False).model
    parts, ids = tensor_moe_parts(whole, kind)
    n_experts = len(parts[0].experts)
    group = HandAllReduce(2)
    shards = [load_shard(str(path), p).model.shard(group.member(p.rank)) for p in parts]
    for p, m in zip(parts, shards):  # each rank holds its columns of every expert, nothing more
        held = [mod for mod in m.modules() if isinstance(mod, RoutedExperts)]
        assert held and all(h.hidden == p.expert_cols[1] - p.expert_cols[0] and len(h.ids) == n_experts for h in held)
    check_tensor_moe_ranks(whole, shards, ids, group)
    with pytest.raises(ValueError, match="holds KV heads and expert columns"):
        load_shard(str(path), Part(rank=0, size=2, experts=tuple(range(n_experts)), expert_cols=(0, 8)))


def test_expert_times_pipeline_equals_whole_model(ckpts):
    """Two pipeline stages, each an expert group of 2 ranks: hidden states go stage to stage."""
    path = ckpts["kimi-k2"]
    whole = load_model(str(path), with_tokenizer=False).model
    args = whole.args
    stages = [(0, 2), (2, 3)]
    slices = split_experts(args.n_routed_experts, [1.0, 1.0], args.shared_size, align=8)
    groups = [HandAllReduce(2), HandAllReduce(2)]
    models = [[load_shard(str(path), replace(s, start=a, end=b)).model.shard(groups[k].member(s.rank)) for s in slices]
              for k, (a, b) in enumerate(stages)]
    caches = [[m.make_cache() for m in stage] for stage in models]

    def step(ids, start):
        layout = lambda k, r: BatchLayout([len(ids)], torch.arange(start, start + len(ids)), [caches[k][r]])  # noqa: E731
        with torch.inference_mode():
            h = run_ranks(models[0], lambda r, m: m(torch.tensor(ids), layout(0, r)))
            torch.testing.assert_close(h[0], h[1], atol=0, rtol=0)  # the ranks of a stage agree bit for bit
            out = run_ranks(models[1], lambda r, m: m(h[r], layout(1, r)))
        return out[0][-1]

    want = greedy(shard_step(whole, whole.make_cache()), IDS[:9], 6)
    got = greedy(step, IDS[:9], 6)
    assert got[0] == want[0]
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)


def test_expert_shard_reads_only_its_experts(ckpts):
    from shoal.engine.loader import open_checkpoint
    from shoal.models.deepseek import ModelArgs, required_weights

    ckpt = open_checkpoint(ckpts["kimi-k2"])
    args = ModelArgs.from_dict(ckpt.config)
    names = ckpt.tensor_names()
    need = required_weights(args, Part(1, 3, 3, rank=1, size=2, experts=(3, 4, 5), shared=(0, 16)), names)
    experts = {n.split(".experts.")[1].split(".")[0] for n in need if ".experts." in n}
    assert experts == {"3", "4", "5"}
    assert "model.layers.0.self_attn.kv_b_proj.weight" not in need  # layer 0 is another stage's
    assert "model.layers.2.mlp.shared_experts.down_proj.weight" in need
    assert "model.layers.2.mlp.gate.e_score_correction_bias" in need
    assert "lm_head.weight" in need and "model.embed_tokens.weight" not in need


def test_an_expert_rank_must_name_its_experts(ckpts):
    """A rank of an MoE model's group holds some of the experts: heads and columns are not its split."""
    with pytest.raises(ValueError, match="mixture of experts"):
        load_shard(str(ckpts["mixtral"]), Part(rank=0, size=2, kv_heads=(0, 1), ffn=(0, 64)))


def test_split_experts_is_proportional():
    s = split_experts(384, [512, 512, 256, 256], shared_size=2048, align=32)
    assert [len(x.experts) for x in s] == [128, 128, 64, 64]
    assert [x.shared for x in s] == [(0, 672), (672, 1376), (1376, 1696), (1696, 2048)]
    assert all(a % 32 == 0 for x in s for a in x.shared)
    assert split_experts(3, [100.0, 1.0, 1.0])[1].experts == (1,)  # everyone gets at least one


# ----------------------------------------------------------------------------- quantized checkpoints


def ref_hold_8bit(w: torch.Tensor, group: int = 32) -> torch.Tensor:
    """How shoal holds FP8 weights, from its definition: per 32 values of a row, scale = max|w|/127,
    value = scale * round(w / scale)."""
    g = w.reshape(w.shape[0], -1, group)
    scale = g.abs().amax(dim=-1, keepdim=True) / 127
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return (torch.round(g / scale).clamp(-127, 127) * scale).reshape(w.shape)


def dense_reference_dir(src, dst):
    """Decode a quantized synthetic checkpoint with plain reference decoders written from the
    formats' definitions (tests/test_hf_quant.py) into fp32 tensors under plain names."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from test_hf_quant import ref_fp8, ref_mlx, ref_pack

    cfg = json.loads((src / "config.json").read_text())
    q = cfg.pop("quantization_config", None) or {}
    mlx = cfg.pop("quantization", None)
    with safe_open(src / "model.safetensors", "pt") as f:
        t = {n: f.get_tensor(n) for n in f.keys()}
    out = {}
    for n, v in t.items():
        if n.endswith(".weight_packed"):
            base = n.removesuffix(".weight_packed")
            bits = q["config_groups"]["group_0"]["weights"]["num_bits"]
            out[f"{base}.weight"] = ref_pack(v, t[f"{base}.weight_scale"], int(t[f"{base}.weight_shape"][1]), bits)
        elif n.endswith(".weight") and f"{n}_scale_inv" in t:
            out[n] = ref_hold_8bit(ref_fp8(v, t[f"{n}_scale_inv"], 128))
        elif mlx and n.endswith(".weight") and n.removesuffix("weight") + "scales" in t:
            base = n.removesuffix(".weight")
            bits = (mlx.get(base) or mlx)["bits"]
            dense = ref_mlx(v, t[f"{base}.scales"], t[f"{base}.biases"], bits)
            if ".switch_mlp." in base:
                pre, proj = base.split(".switch_mlp.")
                if pre.endswith("block_sparse_moe"):
                    proj = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}[proj]
                for e in range(dense.shape[0]):
                    out[f"{pre}.experts.{e}.{proj}.weight"] = dense[e]
            elif base.endswith("embed_q"):
                a = base.removesuffix(".embed_q")
                uv = ref_mlx(t[f"{a}.unembed_out.weight"], t[f"{a}.unembed_out.scales"], t[f"{a}.unembed_out.biases"], bits)
                out[f"{a}.kv_b_proj.weight"] = torch.cat([dense.transpose(1, 2), uv], dim=1).reshape(-1, dense.shape[1])
            elif not base.endswith("unembed_out"):
                out[n] = dense
        elif not n.endswith(("_scale_inv", ".weight_scale", ".weight_shape", ".scales", ".biases")):
            out[n] = v.float()
    dst.mkdir()
    cfg["model_type"] = "deepseek_v3" if cfg["model_type"] == "kimi_k2" else cfg["model_type"]
    (dst / "config.json").write_text(json.dumps(cfg))
    save_file({n: v.contiguous() for n, v in out.items()}, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize("kind,fmt", [
    ("deepseek-v3", "fp8"), ("kimi-k2", "int4"), ("kimi-k2", "mlx4"), ("qwen3-moe", "mlx4"), ("mixtral", "mlx4"), ("kimi-k2", "bf16"),
])
def test_quantized_checkpoint_matches_reference_decoding(tmp_path, kind, fmt):
    path = make_checkpoint(kind, tmp_path / fmt, experts=8, layers=2, fmt=fmt, seed=4)
    ref = transformers.AutoModelForCausalLM.from_pretrained(dense_reference_dir(path, tmp_path / "dense"), dtype=torch.float32).eval()
    lm = load_model(str(path), with_tokenizer=False)
    torch.testing.assert_close(run_ours(lm.model, IDS), run_ref(ref, IDS), atol=1e-4, rtol=1e-4)


def test_int4_expert_shard_keeps_experts_packed(tmp_path):
    from shoal.quant.formats import QuantizedWeight

    path = make_checkpoint("kimi-k2", tmp_path / "int4", experts=8, layers=2, fmt="int4")
    m = load_shard(str(path), Part(rank=0, size=2, experts=(0, 1, 2), shared=(0, 16))).model
    held = [mod for mod in m.modules() if isinstance(mod, RoutedExperts)]
    assert held and all(isinstance(lin.qweight, QuantizedWeight) for h in held for lin in h.gate_up)
    assert np.all([lin.qweight.kind == "q4_affine" for h in held for lin in h.down])


@pytest.mark.parametrize("kind", ["deepseek-v3", "qwen3-moe"])
def test_a_bf16_moe_held_as_q8_where_asked(tmp_path, kind):
    """A bf16 MoE checkpoint placed with `weights="q8"`: its linear layers — attention (MLA's latent
    projections too), routed and shared experts — and the embedding and head held as 8-bit codes
    with a float32 scale per 32, the routers as stored. Logits equal transformers' on the same
    weights, each matrix rounded through the 8-bit codes; the planner prices it below the stored
    checkpoint (bf16 held as bf16)."""
    from shoal.placement.spec import ModelSpec
    from shoal.quant.formats import quantize_sym8
    from shoal.quant.kernels import dequantize
    from shoal.quant.linear import BF16Linear, QuantLinear

    path = make_checkpoint(kind, tmp_path / kind, experts=8, layers=2, fmt="bf16", seed=1)
    ours = load_shard(str(path), Part(), weights="q8").model
    q8 = [m for m in ours.modules() if isinstance(m, QuantLinear) and m.qweight.kind == "q8_sym"]
    left = [m for m in ours.modules() if isinstance(m, BF16Linear)]
    assert q8 and not left
    held = [m for m in ours.modules() if isinstance(m, RoutedExperts)]
    assert held and {m.qweight.kind for e in held for m in e.modules() if isinstance(m, QuantLinear)} == {"q8_sym"}
    ref = reference(path, tmp_path)
    with torch.no_grad():
        for name, t in ref.named_parameters():
            matrix = name.endswith(("proj.weight", "proj_with_mqa.weight", "embed_tokens.weight", "lm_head.weight",
                                    "experts.gate_up_proj", "experts.down_proj"))
            if matrix and t.shape[-1] % 32 == 0:
                rows = t.reshape(-1, t.shape[-1])
                t.copy_(torch.from_numpy(dequantize(quantize_sym8(rows.numpy(), 32))).reshape(t.shape))
    torch.testing.assert_close(run_ours(ours, IDS[:9]), run_ref(ref, IDS[:9]), atol=1e-4, rtol=1e-4)
    assert ModelSpec.from_checkpoint(path, weights="q8").weight_bytes < 0.7 * ModelSpec.from_checkpoint(path).weight_bytes
