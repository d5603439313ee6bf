"""Bad folders and inputs get clear, specific errors (naming the file or tensor) and load nothing."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile

import pytest
import torch

from conftest import REF, needs_shared, ref_pipeline
import glmkit
from glmkit.chat_format import ChatFormatError
from glmkit.checkpoint import CheckpointError

pytestmark = needs_shared
SRC = REF / "chatglm2-6b"


def copy_ref(tmp_path, gen="chatglm2-6b"):
    dst = tmp_path / gen
    shutil.copytree(REF / gen, dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    return dst


def to_single_safetensors(folder):
    """Replace the .bin shards by one model.safetensors holding the same tensors (returns the dict)."""
    from safetensors.torch import save_file

    from glmkit.checkpoint import load_pickled_shard

    sd = {}
    for f in sorted(folder.glob("pytorch_model-*.bin")):
        sd.update(load_pickled_shard(f))
        f.unlink()
    (folder / "pytorch_model.bin.index.json").unlink()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    return sd


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        glmkit.load(tmp_path / "nope")


def test_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        glmkit.load(tmp_path)


def test_config_not_a_glm(tmp_path):
    d = copy_ref(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type 'llama'.*not a GLM-family"):
        glmkit.load(d)


def test_config_broken_json(tmp_path):
    d = copy_ref(tmp_path)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        glmkit.load(d)


def test_2021_glm_and_int4_configs_are_refused_clearly(tmp_path):
    d = copy_ref(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "quantization_bit": 4}))
    with pytest.raises(CheckpointError, match="quantization_bit=4"):
        glmkit.load(d)
    (d / "config.json").write_text(json.dumps({"model_type": "glm", "architectures": ["GLMModel"]}))
    with pytest.raises(CheckpointError, match="2021 THUDM/GLM"):
        glmkit.load(d)


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_missing_tensor_is_named(tmp_path, fmt):
    d = copy_ref(tmp_path)
    victim = "transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"
    if fmt == "safetensors":
        from safetensors.torch import save_file
        sd = to_single_safetensors(d)
        del sd[victim]
        save_file(sd, str(d / "model.safetensors"))
    else:
        idx = json.loads((d / "pytorch_model.bin.index.json").read_text())
        shard = d / idx["weight_map"][victim]
        sd = torch.load(shard, weights_only=True)
        del sd[victim]
        torch.save(sd, shard)
    with pytest.raises(CheckpointError, match=f"missing tensor {victim}"):
        glmkit.load(d)


def test_wrong_shape_names_tensor_and_both_shapes(tmp_path):
    d = copy_ref(tmp_path)
    from safetensors.torch import save_file
    sd = to_single_safetensors(d)
    name = "transformer.encoder.layers.0.self_attention.dense.weight"
    sd[name] = torch.zeros(32, 16, dtype=torch.float16)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"tensor {name} in model.safetensors has shape \(32, 16\), "
                                              rf"expected \(32, 32\)"):
        glmkit.load(d)


def test_truncated_bin_shard(tmp_path):
    d = copy_ref(tmp_path)
    shard = d / "pytorch_model-00001-of-00003.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="pytorch_model-00001-of-00003.bin is truncated or corrupt"):
        glmkit.load(d)


def test_truncated_safetensors(tmp_path):
    d = copy_ref(tmp_path)
    to_single_safetensors(d)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model.safetensors is truncated: tensor .* ends at byte"):
        glmkit.load(d)


def test_index_naming_a_missing_shard(tmp_path):
    d = copy_ref(tmp_path)
    (d / "pytorch_model-00002-of-00003.bin").unlink()
    with pytest.raises(CheckpointError, match="lists pytorch_model-00002-of-00003.bin, which is not in"):
        glmkit.load(d)


class Exploit:
    """Unpickling this calls os.system: what a malicious pytorch_model.bin would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    d = copy_ref(tmp_path)
    marker = tmp_path / "pwned"
    shard = d / "pytorch_model-00002-of-00003.bin"
    sd = torch.load(shard, weights_only=True)
    sd["exploit"] = Exploit(marker)
    torch.save(sd, shard)
    assert zipfile.is_zipfile(shard)
    with pytest.raises(CheckpointError, match="refusing to load .*pytorch_model-00002-of-00003.bin"):
        glmkit.load(d)
    assert not marker.exists()
    # the same payload as a plain (legacy) pickle is refused too
    with open(shard, "wb") as f:
        pickle.dump({"exploit": Exploit(marker)}, f)
    with pytest.raises(CheckpointError, match="pytorch_model-00002-of-00003.bin"):
        glmkit.load(d)
    assert not marker.exists()


def test_no_code_from_the_folder_is_run(tmp_path):
    """A tokenization_chatglm.py / modeling file in the folder is never imported."""
    d = copy_ref(tmp_path, "chatglm3-6b")
    marker = tmp_path / "imported"
    for name in ("tokenization_chatglm.py", "modeling_chatglm.py", "configuration_chatglm.py"):
        (d / name).write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    pipe = glmkit.load(d)
    assert pipe.config.family == "chatglm3" and not marker.exists()


def test_over_long_single_message_gets_a_clear_error():
    pipe = ref_pipeline("chatglm3-6b")          # context 256 positions
    with pytest.raises(ChatFormatError, match=r"needs a prompt of \d+ tokens, more than the \d+"):
        pipe.chat("很长的问题" * 200)
    # and the pipeline still works afterwards
    assert isinstance(pipe.chat("你好", max_new_tokens=3), str)


def test_unknown_sampling_option():
    pipe = ref_pipeline("chatglm3-6b")
    with pytest.raises(TypeError, match="unknown sampling option"):
        pipe.chat("你好", temprature=0.5)
