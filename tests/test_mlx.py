"""The MLX backend (`--device mlx`, engine/mlx_backend.py) on `mlx[cpu]`: logits equal transformers'
on tiny Llama, Qwen3, Qwen3-MoE and DeepSeek-V3 checkpoints (a whole prompt; a chunked prefill and
one-token decodes through mlx-lm's caches; two sequences in one flat batch); a pipeline of a numba
stage and an MLX stage in one process equals transformers; an MLX 4-bit checkpoint over two MLX
stages equals mlx-lm's own loader; a kept prompt prefix fills new MLX caches; the bundled GGUF's
greedy output equals transformers'; an MLX rank and a numba rank (or two MLX ranks) in one tensor
group equal transformers; two loopback nodes, one `--device mlx` and one `--device cpu`, give the
single-process text as a pipeline and as a tensor group."""

from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("mlx.core", reason="mlx is not installed (pip install 'mlx-lm[cpu]' on Linux, mlx-lm on macOS)")
pytest.importorskip("mlx_lm", reason="mlx-lm is not installed")
transformers = pytest.importorskip("transformers")

from shoal.engine.device import Device, parse_device  # noqa: E402
from shoal.engine.loader import load_model  # noqa: E402
from shoal.engine.mlx_backend import MLXShard  # noqa: E402
from shoal.models.base import BatchLayout  # noqa: E402
from shoal.runner.contract import RunnerConfig  # noqa: E402
from test_devices import _ref, _run, check_bundled_greedy, check_moe_family, check_numba_stage_then  # noqa: E402

MLX = Device("mlx")


def test_device_name():
    assert parse_device("MLX") == MLX and not MLX.is_torch and MLX.is_mlx and MLX.kind == "mlx"
    cfg = RunnerConfig(instance_id="i", model="m", rank=0, shards=[], num_layers=1, context=8, master_port=None,
                       secret="0" * 64, threads=1, device="mlx")
    assert cfg.device == "mlx"


def test_no_mlx_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlx.core", None)  # as if mlx were not installed
    with pytest.raises(ValueError, match="--device mlx: MLX is not usable here"):
        parse_device("mlx")


@pytest.mark.parametrize("kind", ["llama", "llama31", "qwen3"])
def test_dense_families_match_transformers(tmp_path, kind):
    from test_models import IDS, make_checkpoint

    path, ref = make_checkpoint(tmp_path, kind)
    lm = load_model(str(path), with_tokenizer=False, device=MLX)
    assert isinstance(lm.model, MLXShard)
    expected = _ref(ref, IDS)
    torch.testing.assert_close(_run(lm.model, IDS), expected, atol=1e-4, rtol=1e-4)
    chunks = [(0, 4), (4, 7)] + [(i, i + 1) for i in range(7, len(IDS))]
    torch.testing.assert_close(_run(lm.model, IDS, chunks), expected, atol=1e-4, rtol=1e-4)
    # A flat batch of two sequences: one decoding a token, one bringing a prefill chunk.
    a, b = lm.model.make_cache(), lm.model.make_cache()
    with torch.inference_mode():
        lm.model(torch.tensor(IDS[:5]), BatchLayout([5], torch.arange(5), [a]))
        logits = lm.model(torch.tensor(IDS[5:6] + IDS[:4]), BatchLayout([1, 4], torch.tensor([5, 0, 1, 2, 3]), [a, b]))
    torch.testing.assert_close(logits, expected[[5, 3]], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["deepseek-v3", "qwen3-moe"])
def test_moe_families_match_transformers(moe_ckpts, tmp_path, kind):
    check_moe_family(moe_ckpts, tmp_path, kind, MLX)


def test_a_numba_stage_and_an_mlx_stage_make_one_model(tmp_path):
    _, last = check_numba_stage_then(tmp_path, MLX)
    assert len(last.model.make_cache()) == 1 and not last.model.part.has_embedding


@pytest.mark.parametrize("kind", ["deepseek-v3", "qwen3-moe"])
def test_mlx_4bit_stages_equal_mlx_lms_own_loader(tmp_path, kind):
    """An MLX-community 4-bit checkpoint (bf16 scales, stacked experts) split over two MLX stages:
    each holds only its layers' tensors, packed, and together they equal mlx-lm's `load_model` of
    the whole file bit for bit (the hidden states cross in float32, which holds bf16 exactly)."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model as mlx_lm_load
    from test_moe import IDS

    from shoal.synthetic import make_checkpoint

    path = make_checkpoint(kind, tmp_path / kind, experts=8, layers=3, fmt="mlx4", seed=1)
    whole, _ = mlx_lm_load(path)
    want = torch.from_numpy(np.array(whole(mx.array([IDS]))[0].astype(mx.float32)))
    first = load_model(str(path), 0, 2, with_tokenizer=False, device=MLX).model
    last = load_model(str(path), 2, 3, with_tokenizer=False, device=MLX).model
    held = [k for k, _ in tree_flatten(first.model.parameters())]
    assert all(k.startswith(("model.embed_tokens.", "model.layers.0.", "model.layers.1.")) for k in held), held
    assert any(k.endswith(".scales") for k in held)
    n = len(IDS)
    with torch.inference_mode():
        h = first(torch.tensor(IDS), BatchLayout([n], torch.arange(n), [first.make_cache()]))
        got = last(h, BatchLayout([n], torch.arange(n), [last.make_cache()]), torch.arange(n))
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.skipif(pytest.importorskip("api_helpers").MODEL_PATH is None, reason="bundled model not installed")
def test_bundled_model_greedy_equals_transformers():
    """The Q4_1 GGUF read by `mx.load` (packed 4-bit, MLX's affine quantization), greedy for 24
    tokens through the batched generator, token for token with transformers loading the same file."""
    check_bundled_greedy(MLX)


def test_a_kept_prefix_fills_new_mlx_caches(tmp_path):
    """engine/prefix.CopyKeeper keeps and loads mlx-lm's caches: a sequence started from a kept
    prefix goes on as the sequence it was kept from."""
    from test_models import IDS, make_checkpoint

    from shoal.engine.prefix import CopyKeeper

    path, ref = make_checkpoint(tmp_path, "llama")
    model = load_model(str(path), with_tokenizer=False, device=MLX).model
    keeper, first = CopyKeeper(), model.make_cache()
    assert keeper.can_keep(first)
    with torch.inference_mode():
        model(torch.tensor(IDS), BatchLayout([len(IDS)], torch.arange(len(IDS)), [first]))
        kept = keeper.keep(first, 6)
        model(torch.tensor([1]), BatchLayout([1], torch.tensor([len(IDS)]), [first]))  # the original goes on: the copy must not change
        second = model.make_cache()
        keeper.load(second, kept, 6)
        logits = model(torch.tensor(IDS[6:]), BatchLayout([len(IDS) - 6], torch.arange(6, len(IDS)), [second]), torch.arange(len(IDS) - 6))
    torch.testing.assert_close(logits, _ref(ref, IDS)[6:], atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(pytest.importorskip("api_helpers").MODEL_PATH is None, reason="bundled model not installed")
@pytest.mark.parametrize("strategy", ["pipeline", "tensor", "tensor over mlx-ring"])
def test_an_mlx_node_and_a_cpu_node_serve_one_model(tmp_path_factory, cached_profile, strategy):
    """Two `shoal node`s on loopback, a with the numba engine (the entry), b with `--device mlx`:
    the bundled model placed over both (two stages, or one tensor group summing over the runners'
    encrypted links) gives the single-process greedy text, and a second turn reuses the first's
    prompt through both ranks' caches with the same text as one process. "tensor over mlx-ring": both
    nodes on MLX, their group summing over MLX's ring with every partial sealed (runner/mlx_group.py)."""
    from conftest import NodeLauncher
    from test_instances import QUESTION, chat_ids, decode, single_process_tokens, stream_chat, two_node_instance

    nl = NodeLauncher(tmp_path_factory.mktemp(strategy.replace(" ", "_")), cached_profile)
    ring = strategy == "tensor over mlx-ring"
    try:
        a, b, inst = two_node_instance(nl, ["--device", "mlx"], ("--device", "mlx") if ring else (),
                                       strategy.split()[0], **({"collective": "mlx-ring"} if ring else {}))
        assert [s["tp_size"] for s in inst["shards"]] == ([1, 1] if strategy == "pipeline" else [2, 2])
        if ring:
            profiles = {n["name"]: n["profile"] for n in a.cluster()["nodes"]}
            assert all("mlx-ring" in profiles[n]["collectives"] for n in "ab")  # each node says what it offers
            assert inst["collective"] == "mlx-ring"
            logs = [p.read_text() for n in "ab" for p in (nl.root / n / "runners").glob("*.log")]
            assert len(logs) == 2 and all("sums over its group on mlx-ring" in text for text in logs), logs
        first, _ = stream_chat(a, QUESTION, 12)
        assert first == decode(single_process_tokens(chat_ids(QUESTION), 12))
        turn2 = [*QUESTION, {"role": "assistant", "content": first}, {"role": "user", "content": "And of Italy?"}]
        second, usage = stream_chat(b, turn2, 12)
        assert usage.prompt_tokens_details.cached_tokens >= len(chat_ids(QUESTION)) - 1
        assert second == decode(single_process_tokens(chat_ids(turn2), 12))
    finally:
        nl.close()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "llama-q4"])
def test_mlx_ranks_join_a_tensor_group(tmp_path, kind):
    """A tensor group of an MLX rank and a numba rank, and one of two MLX ranks, cut unevenly (KV
    heads 1+1, MLP columns 64+32 — whole quantization groups —, vocabulary 60+37) and summing over
    one group: a prompt and then one-token decodes through each rank's caches give transformers'
    logits within 1e-4. The MLX rank holds only its slices."""
    from test_models import IDS, make_checkpoint
    from test_moe import HandAllReduce, run_ranks
    from test_native_decode import _quantized_checkpoint

    from shoal.engine.loader import load_shard
    from shoal.models.base import Part

    path, ref = _quantized_checkpoint(tmp_path, "llama", 4) if kind == "llama-q4" else make_checkpoint(tmp_path, kind)
    expected = _ref(ref, IDS)
    parts = [Part(rank=0, size=2, kv_heads=(0, 1), ffn=(0, 64), vocab=(0, 60)),
             Part(rank=1, size=2, kv_heads=(1, 2), ffn=(64, 96), vocab=(60, 97))]
    chunks = [(0, len(IDS) - 3)] + [(i, i + 1) for i in range(len(IDS) - 3, len(IDS))]
    def run(r: int, m) -> torch.Tensor:
        caches, rows = [m.make_cache()], []
        with torch.inference_mode():
            for a, b in chunks:
                layout = BatchLayout([b - a], torch.arange(a, b), caches)
                rows.append(m.logits(m.run_layers(m.embed(torch.tensor(IDS[a:b])), layout)))
        return torch.cat(rows)

    for devices in ((MLX, None), (MLX, MLX)):
        group = HandAllReduce(2)
        shards = [load_shard(str(path), p, device=d).model.shard(group.member(p.rank)) for p, d in zip(parts, devices)]
        mlx_rank = shards[0]
        assert isinstance(mlx_rank, MLXShard)
        attn = mlx_rank.layers[0].self_attn
        assert (attn.n_heads, attn.n_kv_heads) == (2, 1) and mlx_rank.embed_tokens.weight.shape[0] == 60
        torch.testing.assert_close(torch.cat(run_ranks(shards, run), dim=1), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind,ranks", [("kimi-k2", 2), ("deepseek-v3", 3), ("qwen3-moe", 2), ("mixtral", 3)])
def test_an_mlx_rank_joins_an_expert_group(moe_ckpts, kind, ranks):
    """Expert parallel with rank 0 on MLX and the others on the numba engine: each rank holds only
    its routed experts (mlx-lm's stacked experts cut to them) and its columns of the shared experts;
    a pick of an expert held elsewhere adds nothing on this rank. Greedy tokens and logits equal the
    whole model's, with one all-reduce an MoE layer a step."""
    from test_moe import IDS, HandAllReduce, greedy, run_ranks, shard_step

    from shoal.engine.loader import load_shard
    from shoal.engine.mlx_backend import HeldExperts
    from shoal.models.moe import split_experts

    path = moe_ckpts[kind]
    whole = load_model(str(path), with_tokenizer=False).model
    args = whole.args
    mla = kind in ("kimi-k2", "deepseek-v3")
    n_experts = args.n_routed_experts if mla else args.n_experts
    slices = split_experts(n_experts, [1.0, 2.0, 1.5][:ranks], args.shared_size if mla else 0, align=8)
    group = HandAllReduce(ranks)
    shards = [load_shard(str(path), s, device=MLX if s.rank == 0 else None).model.shard(group.member(s.rank)) for s in slices]
    held = [m for m in shards[0].model.modules() if isinstance(m, HeldExperts)]
    assert held and all(h.switch.gate_proj.weight.shape[0] == len(slices[0].experts) for h in held)
    want_tokens, want_logits = greedy(shard_step(whole, whole.make_cache()), IDS[:9], 8)
    got = run_ranks(shards, lambda r, m: greedy(shard_step(m, m.make_cache()), IDS[:9], 8))
    for tokens, logits in got:
        assert tokens == want_tokens
        torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=1e-4)
    assert group.calls == 8 * sum(args.is_moe(i) for i in range(args.num_hidden_layers))


def test_mlx_does_not_run_ranks_of_a_group_it_cannot_cut(moe_ckpts):
    from shoal.engine.loader import load_shard
    from shoal.models.base import Part

    with pytest.raises(ValueError, match="holds KV heads .a tensor group. or some routed experts"):
        load_shard(str(moe_ckpts["qwen3-moe"]), Part(rank=0, size=2), device=MLX)


@pytest.mark.parametrize("kind", ["qwen3-moe", "mixtral", "deepseek-v3", "kimi-k2"])
def test_an_mlx_rank_joins_a_tensor_group_inside_an_moe(moe_ckpts, kind):
    """Tensor parallel inside an MoE group as exo runs it on Macs, with rank 0 on MLX and rank 1 on
    the numba engine, cut unevenly: heads (GQA KV heads with their query heads; MLA heads with their
    per-head latent projections), every routed expert's columns, the shared experts' and dense MLPs'
    columns. Greedy tokens and logits equal the whole model's, with two all-reduces a layer a step."""
    from test_moe import HandAllReduce, check_tensor_moe_ranks, tensor_moe_parts

    from shoal.engine.loader import load_shard

    path = moe_ckpts[kind]
    whole = load_model(str(path), with_tokenizer=False).model
    parts, ids = tensor_moe_parts(whole, kind)
    group = HandAllReduce(2)
    shards = [load_shard(str(path), p, device=d).model.shard(group.member(p.rank)) for p, d in zip(parts, (MLX, None))]
    assert isinstance(shards[0], MLXShard) and not isinstance(shards[1], MLXShard)
    check_tensor_moe_ranks(whole, shards, ids, group)


def test_sealed_partials_open_only_as_sent():
    """runner/mlx_group.py: a partial sealed for MLX's transport opens only under the group's key,
    at the place and all-reduce it was sealed for, unaltered."""
    from shoal.runner.mlx_group import SealedFrameError, group_cipher, open_sealed, seal
    from shoal.runner.wire import WireError

    cipher = group_cipher(b"s" * 32, [0, 1])
    data = torch.arange(8, dtype=torch.float32).numpy().tobytes()
    frame = seal(cipher, 1, 7, data)
    assert open_sealed(cipher, 1, 7, frame) == data and data not in frame
    for other in (group_cipher(b"s" * 32, [2, 3]), group_cipher(b"t" * 32, [0, 1])):  # another group, another placement
        with pytest.raises(SealedFrameError):
            open_sealed(other, 1, 7, frame)
    altered = bytearray(frame)
    altered[20] ^= 1
    for place, count, bad in ((1, 7, bytes(altered)), (0, 7, frame), (1, 8, frame), (1, 7, frame[:10])):
        with pytest.raises(SealedFrameError):
            open_sealed(cipher, place, count, bad)
    assert issubclass(SealedFrameError, WireError)  # it fails the instance as a broken link does
