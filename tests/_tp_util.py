"""Helpers for the tensor-parallel tests and benchmark: tiny random models of every generation (official
config.json keys through config.from_hf, saved in glmkit's layout) and a torch.multiprocessing worker that
loads a model sharded over `world` gloo processes and records, on rank 0, what the group computed."""
from __future__ import annotations

import os
from pathlib import Path

import torch

# official config.json dicts (from_hf reads them): sizes whose row-parallel slices are whole INT4 groups at TP 2
CONFIGS = {
    "chatglm": dict(model_type="chatglm", vocab_size=256, hidden_size=64, num_layers=2, num_attention_heads=4,
                    inner_hidden_size=256, max_sequence_length=128, position_encoding_2d=True, bos_token_id=250,
                    eos_token_id=251, mask_token_id=252, gmask_token_id=253, pad_token_id=0,
                    torch_dtype="float32"),
    "chatglm3": dict(model_type="chatglm", padded_vocab_size=256, hidden_size=64, num_layers=2,
                     num_attention_heads=4, kv_channels=16, multi_query_attention=True, multi_query_group_num=2,
                     ffn_hidden_size=128, seq_length=128, add_qkv_bias=True, add_bias_linear=False,
                     rmsnorm=True, eos_token_id=2, pad_token_id=0, torch_dtype="float32"),
    "glm4": dict(model_type="chatglm", padded_vocab_size=256, hidden_size=64, num_layers=2, num_attention_heads=4,
                 kv_channels=16, multi_query_attention=True, multi_query_group_num=1, ffn_hidden_size=128,
                 seq_length=128, add_qkv_bias=True, add_bias_linear=False, rmsnorm=True, rope_ratio=5,
                 eos_token_id=[2], pad_token_id=0, torch_dtype="float32"),
}


def make_random(family: str, out: Path, seed: int = 0, quantize=None, **overrides) -> Path:
    """A random tiny model of `family` saved in glmkit's layout (quantized with `quantize` when given;
    overrides: config.json keys)."""
    from glmkit.checkpoint import save_model
    from glmkit.config import from_hf
    from glmkit.model import GLM
    from glmkit.quant import quantize_model

    cfg = from_hf({**CONFIGS[family], **overrides}, family=family)
    model = GLM(cfg).init_weights(std=0.08, seed=seed)
    with torch.no_grad():                     # biases and norms away from their init values: they must travel too
        g = torch.Generator().manual_seed(seed + 1)
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    if quantize:
        quantize_model(model, quantize)
    return save_model(model, out)


def prompt_for(cfg) -> list[int]:
    """A prompt that exercises the generation's positions: ChatGLM-6B (and GLM-130B where its vocabulary
    holds them) gets [gMASK] <sop>."""
    ids = [5, 17, 33, 8, 91, 64, 12, 40]
    if cfg.rope_2d or (cfg.family == "glm130b" and cfg.gmask_token_id < cfg.vocab_size):
        ids = ids + [cfg.gmask_token_id, cfg.sop_token_id]
    return ids


def compute(model, ids: list[int], engine_tokens: int = 0):
    """Full-forward logits, KV-cache logits (prompt then one token at a time), and, when engine_tokens, the
    engine's greedy tokens. Every rank of a group calls this together."""
    from glmkit.engine.cache import KVCache
    out = {}
    x = torch.tensor([ids])
    with torch.inference_mode():
        out["full"] = model(x)[0].clone()
        cache = KVCache.for_model(model, 2, 64, dtype=torch.float32)
        n = len(ids) - 3
        pos = torch.arange(n)[None]
        steps = [model(x[:, :n], cache, cache_pos=pos, kv_len=n, row0=1)[0, -1]]
        for p in range(n, len(ids)):
            steps.append(model(x[:, p:p + 1], cache, cache_pos=torch.tensor([[p]]), kv_len=p + 1, row0=1)[0, -1])
        out["cached"] = torch.stack(steps)
    return out


def engine_greedy(model, ids: list[int], n: int) -> list[int]:
    from glmkit.engine import Engine
    from glmkit.sampling import SamplingParams
    eng = Engine(model, 64, slots=1, cache_mb=0, prefill_chunk=4)
    return list(eng.generate(ids, SamplingParams(temperature=0.0, max_new_tokens=n)))


def worker(rank: int, world: int, port: int, cases: list, out_dir: str):
    """One rank of a gloo group: for each (name, folder, quantize) case load the rank's shards, compute()
    together, then the engine's greedy tokens with rank 0 leading; rank 0 saves {name: results}."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from glmkit.parallel import dist
    from glmkit.parallel.load import load_sharded
    from glmkit.parallel.runtime import follow, lead, stop
    from glmkit.quant import prepare_model
    dist.init_distributed("cpu")
    results = {}
    for name, folder, q in cases:
        model, _ = load_sharded(folder, rank, world, dtype="float32", quantize=q)
        if model.config.quantization:
            prepare_model(model, own_threads=False)
        ids = prompt_for(model.config)
        res = compute(model, ids)
        if rank == 0:
            lead(model)
            res["greedy"] = engine_greedy(model, ids, 6)
            stop(model)
            results[name] = res
        else:
            follow(model)
    if rank == 0:
        torch.save(results, Path(out_dir) / "tp.pt")
    import torch.distributed as tdist
    tdist.barrier()
    tdist.destroy_process_group()


GLM_HF = dict(model_type="glm", architectures=["GlmForCausalLM"], vocab_size=256, hidden_size=64,
              intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=128, partial_rotary_factor=0.5, attention_bias=True, rms_norm_eps=1e-5,
              rope_theta=10000.0, pad_token_id=0, eos_token_id=[1], torch_dtype="float32")


def make_glm_hf(out: Path, seed: int = 0) -> Path:
    """A random tiny GLM-4 in transformers' GlmForCausalLM layout (q/k/v kept apart), by KEY_MAPS['glm_hf']."""
    import json

    from safetensors.torch import save_file

    from glmkit.checkpoint import KEY_MAPS
    from glmkit.config import from_hf
    from glmkit.model import GLM
    cfg = from_hf(dict(GLM_HF))
    model = GLM(cfg).init_weights(std=0.08, seed=seed)
    H, G, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    table, sd = KEY_MAPS["glm_hf"], {}
    for name, p in model.state_dict().items():
        parts = name.split(".")
        key = ".".join(["layers", "{i}"] + parts[2:]) if parts[0] == "layers" else name
        src = table[key]
        if isinstance(src, list):
            for s, t in zip(src, p.split([H * D, G * D, G * D])):
                sd[s.replace("{i}", parts[1])] = t.contiguous()
        else:
            sd[src.replace("{i}", parts[1]) if parts[0] == "layers" else src] = p.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(GLM_HF))
    return out


# a GLM-130B-style model (SAT arguments) wide enough that every rank's row-parallel columns are whole INT4
# blocks of 32 at TP 2 from a 4-way split (the ../shared fixture's ranks have 16 and 40 columns)
SAT130B = {"num-layers": 2, "hidden-size": 64, "inner-hidden-size": 128, "vocab-size": 512,
           "num-attention-heads": 4, "max-sequence-length": 256, "layernorm-order": "post"}


def make_sat130b(out: Path, shards: int, seed: int = 0, bits: int = 0) -> Path:
    """A random GLM-130B-style model in the released SAT layout, split `shards` ways by convert_tp.py's rules
    (sat_checkpoint.split_tp); bits 4 | 8: GLM-130B's own quantized shards (sat_checkpoint.quantize_sat)."""
    import json

    from glmkit.checkpoint import KEY_MAPS
    from glmkit.config import from_sat_args
    from glmkit.model import GLM
    from glmkit.sat_checkpoint import QUANTIZED, quantize_sat, short_name, split_tp

    model = GLM(from_sat_args(SAT130B)).init_weights(std=0.08, seed=seed)
    table, sd = KEY_MAPS["sat"], {}
    g = torch.Generator().manual_seed(seed + 1)
    for ours, p in model.named_parameters():
        parts = ours.split(".")
        key = (table[".".join(["layers", "{i}"] + parts[2:])].replace("{i}", parts[1]) if parts[0] == "layers"
               else table.get(ours))
        if key is None:                              # the tied output
            continue
        t = p.detach().clone()
        if ours.endswith("bias") or "norm" in ours:  # away from their init values: they must travel too
            t += torch.randn(t.shape, generator=g) * 0.1
        sd[key] = t
    out.mkdir(parents=True, exist_ok=True)
    (out / "3").mkdir(exist_ok=True)
    for r, part in enumerate(split_tp(sd, shards)):
        if bits:
            for k in list(part):
                if short_name(k) in QUANTIZED:
                    part[k], part[k + "_scale"] = quantize_sat(part[k], bits)
        torch.save({"module": part}, out / "3" / f"mp_rank_{r:02d}_model_states.pt")
    args = {**SAT130B, "model-parallel-size": shards, **({"quantization-bit-width": bits} if bits else {})}
    (out / "model_args.json").write_text(json.dumps(args))
    (out / "latest").write_text("3")
    return out
