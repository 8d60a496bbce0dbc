"""`mmdit convert`: diffusers <-> mmdit round trips and the verify command."""

import json
import subprocess
import sys

import pytest
import torch
from diffusers import QwenImageTransformer2DModel
from safetensors.torch import load_file

from mmdit.config.loader import load_config
from mmdit.model.checkpoint import load_full_state_dict_from, read_index
from mmdit.launch.convert import from_diffusers, to_diffusers
from mmdit.model.diffusers_io import read_diffusers, write_diffusers

TINY = load_config([]).model


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory):
    """A Qwen-Image-like repo: the transformer in transformer/, random non-default weights."""
    root = tmp_path_factory.mktemp("qwen_image")
    torch.manual_seed(0)
    config = {k: v for k, v in TINY.diffusers_config().items() if not k.startswith("_")}
    model = QwenImageTransformer2DModel(**config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(root / "transformer")
    return root


def test_round_trip_is_bit_exact(diffusers_dir, tmp_path):
    from_diffusers(str(diffusers_dir), str(tmp_path / "mmdit"), tp=2)
    index = read_index(tmp_path / "mmdit")
    assert index["tp"] == 2 and len(index["files"]) == 2
    to_diffusers(str(tmp_path / "mmdit"), str(tmp_path / "back"))
    original = load_file(diffusers_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    back = load_file(tmp_path / "back" / "diffusion_pytorch_model.safetensors")
    assert original.keys() == back.keys()
    assert all(torch.equal(original[k], back[k]) for k in original)
    reloaded = QwenImageTransformer2DModel.from_pretrained(tmp_path / "back")
    assert torch.equal(reloaded.state_dict()["proj_out.weight"], original["proj_out.weight"])


def test_sharded_diffusers_weights(diffusers_dir, tmp_path):
    args, state = read_diffusers(diffusers_dir)
    write_diffusers(state, args, tmp_path / "sharded", max_shard_bytes=200_000)
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    _, again = read_diffusers(tmp_path / "sharded")
    assert all(torch.equal(state[k], again[k]) for k in state)
    from_diffusers(str(tmp_path / "sharded"), str(tmp_path / "mmdit"), tp=1)
    full = load_full_state_dict_from(tmp_path / "mmdit")
    assert all(torch.equal(state[k], full[k]) for k in state)


@pytest.mark.slow
def test_verify_cli_at_tp2(diffusers_dir):
    result = subprocess.run([sys.executable, "-m", "mmdit.launch.cli", "convert", "verify", str(diffusers_dir),
                             "--tp", "2"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["tp"] == 2
    for case in ("t2i", "edit"):
        assert report[case]["max_abs_diff"] <= 1e-5 and report[case]["max_abs_ref"] > 0.1


def test_not_a_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="QwenImageTransformer2DModel"):
        from_diffusers(str(tmp_path), str(tmp_path / "out"))
