"""Tensor-parallel inference (glmkit/parallel/): 2 gloo processes on CPU give the logits of 1 process.

Every case is loaded sharded over 2 spawned processes (each reading only its slices) and computes a full
forward, a KV-cache prefill + decode, and the engine's greedy tokens with rank 0 leading; the same model
loaded whole in this process is the reference (logits within 1e-5, tokens identical)."""
from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from glmkit.checkpoint import load_model
from glmkit.parallel.plan import ShardError, make_plan
from glmkit.quant import prepare_model

from _tp_util import compute, engine_greedy, make_glm_hf, make_random, make_sat130b, prompt_for, worker
from conftest import GLM, REF, needs_shared

G130 = GLM / "glm-130b-tiny"          # SAT's GLM130B class wrote it: whole (mp1) and split 2-way (mp2)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp")
    cases = []
    if REF.is_dir():
        cases += [("ref-chatglm-6b", str(REF / "chatglm-6b"), None), ("ref-chatglm3-6b", str(REF / "chatglm3-6b"), None)]
    # float ChatGLM-6B / ChatGLM3 are the reference checkpoints above; GLM-4's random one has 1 key/value group
    # (replicated on both ranks); INT4 quantized while loading, and ChatGLM3 saved quantized (split by blocks)
    glm4, chatglm = make_random("glm4", tmp / "glm4", seed=3), make_random("chatglm", tmp / "chatglm", seed=3)
    cases += [("glm4-float", str(glm4), None), ("glm4-int4", str(glm4), "int4"), ("chatglm-int4", str(chatglm), "int4"),
              ("chatglm3-int4-saved", str(make_random("chatglm3", tmp / "q", seed=4, quantize="int4")), None)]
    # GLM-130B from its SAT folders, each rank reading only its mp_rank shards: the fixture whole (each rank
    # keeps its half of the one shard) and 2-way (one shard each); a wider random one split 4 ways (two shards
    # joined per rank) in float, INT4 quantized while loading, and as GLM-130B's own INT4 shards
    if G130.is_dir():
        cases += [("glm130b-mp1", str(G130 / "mp1"), None), ("glm130b-mp2", str(G130 / "mp2"), None)]
    sat4 = make_sat130b(tmp / "sat4", 4, seed=6)
    cases += [("glm130b-mp4", str(sat4), None), ("glm130b-mp4-int4", str(sat4), "int4"),
              ("glm130b-sat-int4", str(make_sat130b(tmp / "sat4q", 4, seed=7, bits=4)), None)]
    mp.start_processes(worker, args=(2, _port(), cases, str(tmp)), nprocs=2, join=True, start_method="spawn")
    return cases, torch.load(tmp / "tp.pt")


def _reference(folder, q):
    model, _ = load_model(folder, dtype="float32", quantize=q)
    if model.config.quantization:
        prepare_model(model, own_threads=False)
    ids = prompt_for(model.config)
    res = compute(model, ids)
    res["greedy"] = engine_greedy(model, ids, 6)
    return res


CASES = ["ref-chatglm-6b", "ref-chatglm3-6b", "glm4-float", "glm4-int4", "chatglm-int4", "chatglm3-int4-saved",
         "glm130b-mp1", "glm130b-mp2", "glm130b-mp4", "glm130b-mp4-int4", "glm130b-sat-int4"]


@pytest.mark.parametrize("name", CASES)
def test_two_processes_give_the_logits_of_one(tp_results, name):
    cases, got = tp_results
    case = next((c for c in cases if c[0] == name), None)
    if case is None:
        pytest.skip(f"{G130 if name.startswith('glm130b') else REF} (reference checkpoints) is absent")
    want = _reference(case[1], case[2])
    tp = got[name]
    for key in ("full", "cached"):
        assert tp[key].shape == want[key].shape
        diff = (tp[key] - want[key]).abs().max().item()
        assert diff < 1e-5, f"{name} {key}: max |tp2 - tp1| = {diff:.3g}"
        assert want[key].abs().max().item() > 0.1          # logits that would show a wrong slice
    assert tp["greedy"] == want["greedy"]


@pytest.mark.parametrize("layout", ["chatglm-6b .bin", "chatglm3-6b .bin", "glm_hf q/k/v apart", "glmkit int4",
                                    "tied", "tied int4"])
def test_each_rank_loads_exactly_its_slices(tmp_path, layout):
    """For every layout: each rank's local tensors are the plan's slices of the whole model's tensors."""
    from glmkit.parallel.layers import locate
    from glmkit.parallel.load import _quant_shard, load_sharded
    if layout.endswith(".bin"):
        if not REF.is_dir():
            pytest.skip(f"{REF} (reference checkpoints) is absent")
        folder = REF / layout.split()[0]
    elif layout.startswith("glm_hf"):
        folder = make_glm_hf(tmp_path / "hf", seed=1)
    elif layout.startswith("tied"):          # one tensor for the embedding and the output head
        folder = make_random("glm4", tmp_path / "t", seed=5, tie_word_embeddings=True)
    else:
        folder = make_random("chatglm3", tmp_path / "q", seed=2, quantize="int4")
    q = "int4" if layout == "tied int4" else None
    full, _ = load_model(folder, dtype="float32", quantize=q)
    tensors = dict(full.named_parameters()) | dict(full.named_buffers())
    for rank in (0, 1):
        model, _ = load_sharded(folder, rank, 2, dtype="float32", quantize=q)
        assert model.config.num_heads == full.config.num_heads // 2
        if layout == "tied":
            assert model.output.inner.weight is model.tok_embeddings.inner.weight
        for name, want in tensors.items():
            shard, _ = model.tp.shard_of(name)
            mod, leaf = locate(model, name)
            if leaf in ("qweight", "scales"):
                shard = _quant_shard(shard, leaf, mod)
            if shard.dim is not None:
                want = torch.cat([want.narrow(shard.dim, a, b - a) for a, b in shard.ranges], shard.dim)
            assert torch.equal(getattr(mod, leaf), want), (layout, rank, name)


def test_split_rules_refuse_sizes_that_do_not_divide():
    from _tp_util import CONFIGS
    from glmkit.config import from_hf
    cfg = from_hf(dict(CONFIGS["chatglm3"]), family="chatglm3")
    with pytest.raises(ShardError, match=r"num_heads \(query heads\) = 4 is not divisible by --tp 3"):
        make_plan(cfg, 0, 3)
    with pytest.raises(ShardError, match="3 key/value groups .* cannot be split over --tp 2"):
        make_plan(cfg.replace(num_heads=6, num_kv_heads=3), 0, 2)
    with pytest.raises(ShardError, match="vocab_size = 255 is not divisible by --tp 2"):
        make_plan(cfg.replace(vocab_size=255), 0, 2)
    # GLM-130B's GeGLU holds [gate | up] halves as SwiGLU does: the rank's rows of each half
    up, _ = make_plan(cfg.replace(activation="geglu"), 1, 2).shard_of("layers.3.mlp.up.weight")
    assert up.ranges == ((64, 128), (192, 256))
    up, _ = make_plan(cfg.replace(activation="gelu_tanh"), 1, 2).shard_of("layers.3.mlp.up.weight")
    assert up.ranges == ((64, 128),)


@needs_shared
def test_quantized_slices_must_be_whole_groups():
    from glmkit.parallel.load import load_sharded
    # ChatGLM3's tiny reference: attention output 32 inputs wide, 16 per rank at TP 2: not a group of 32
    with pytest.raises(ShardError, match="layers.0.attn.out: a rank's 16 input columns are not whole "
                                         "quantization groups of 32"):
        load_sharded(REF / "chatglm3-6b", 0, 2, quantize="int4")


def _param_bytes(model) -> int:
    seen = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in seen.values())


@pytest.mark.parametrize("case", ["fixture mp1", "fixture mp2", "random mp4", "random mp4 sat-int4"])
def test_sat_ranks_read_only_their_shards_and_hold_only_their_slices(tmp_path, monkeypatch, case):
    """GLM-130B's SAT folder at TP 2: rank r opens only the mp_rank shards its slices are in (its half of a
    4-way split, the one shard of a 2-way one, the whole one of mp1), its tensors are the plan's slices of the
    whole model's, and together with the replicated norms it holds about half the model's bytes."""
    from glmkit.checkpoint import load_model
    from glmkit.parallel import sat_load
    from glmkit.parallel.layers import locate
    from glmkit.parallel.load import _quant_shard, load_sharded
    if case.startswith("fixture"):
        if not G130.is_dir():
            pytest.skip(f"{G130} is absent")
        folder = G130 / case.split()[1]
    else:
        folder = make_sat130b(tmp_path / "s", 4, seed=8, bits=4 if case.endswith("int4") else 0)
    degree = len(list((folder / (folder / "latest").read_text()).glob("mp_rank_*")))
    full, _ = load_model(folder, dtype="float32")
    tensors = dict(full.named_parameters()) | dict(full.named_buffers())
    whole = _param_bytes(full)
    opened = []
    real = sat_load._load_shard
    monkeypatch.setattr(sat_load, "_load_shard", lambda f: opened.append(f.name) or real(f))
    for rank in (0, 1):
        opened.clear()
        model, _ = load_sharded(folder, rank, 2, dtype="float32")
        k = max(1, degree // 2)
        first = rank * k if degree >= 2 else 0
        assert opened == [f"mp_rank_{s:02d}_model_states.pt" for s in range(first, first + k)]
        for name, want in tensors.items():
            shard, _ = model.tp.shard_of(name)
            mod, leaf = locate(model, name)
            if leaf in ("qweight", "scales"):
                shard = _quant_shard(shard, leaf, mod)
            if shard.dim is not None:
                want = torch.cat([want.narrow(shard.dim, a, b - a) for a, b in shard.ranges], shard.dim)
            assert torch.equal(getattr(mod, leaf), want), (case, rank, name)
        mine = _param_bytes(model)
        assert 0.45 * whole < mine < 0.55 * whole, (case, rank, mine, whole)


def test_sat_shards_per_rank():
    from glmkit.parallel.sat_load import rank_shards
    from glmkit.sat_checkpoint import SATError
    assert rank_shards(8, 1, 2) == ([4, 5, 6, 7], 1, 0)        # shards 4r..4r+3, joined
    assert rank_shards(8, 5, 8) == ([5], 1, 0)
    assert rank_shards(2, 3, 4) == ([1], 2, 1)                  # the second half of shard 1
    with pytest.raises(SATError, match="split 8 ways loads at a --tp that divides 8 or that 8 divides, not 3"):
        rank_shards(8, 0, 3)


def test_torchrun_generate_tp2_from_a_sat_folder_prints_the_single_process_text(tmp_path):
    """`torchrun --nproc_per_node 2 -m glmkit generate --tp 2 --model <SAT folder>`: the whole mp1 checkpoint,
    each rank keeping its half of the one shard, greedy text as a single `glmkit generate`."""
    import os
    import subprocess
    import sys

    from conftest import OFFICIAL, ROOT
    ice = OFFICIAL / "chatglm-6b" / "ice_text.model"
    if not G130.is_dir() or not ice.is_file():
        pytest.skip(f"{G130} or {ice} is absent")
    folder = tmp_path / "sat"
    folder.mkdir()
    for f in list((G130 / "mp1").iterdir()) + [ice]:
        (folder / f.name).symlink_to(f)
    args = ["generate", "--model", str(folder), "--prompt", "Who is the greatest artist?", "-t", "0",
            "--max-new-tokens", "6"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "glmkit"] + args + ["--tp", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    import glmkit
    one = "".join(glmkit.load(folder).start_generate(args[4], temperature=0, max_new_tokens=6))
    assert one.strip() and r.stdout == one + "\n"
