"""`rlft-ray export`: an LM checkpoint as a plain save_pretrained directory."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from rlft_ray.cli import main
from rlft_ray.config import build_config

GRPO = Path(__file__).resolve().parents[1] / "examples" / "arithmetic_grpo.yaml"


def test_export_writes_a_plain_model_directory(model_dir: Path, tmp_path: Path) -> None:
    """`rlft-ray export`: weights equal, tokenizer and the model's own generation config
    there (not the run's sampling caps), normal permissions, no training state; a gym
    checkpoint and a non-empty target are refused."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from rlft_ray.config import save_config

    ckpt = tmp_path / "checkpoint_best"
    shutil.copytree(model_dir, ckpt / "policy")
    (ckpt / "value_head.safetensors").write_bytes(b"not exported")
    (ckpt / "state.json").write_text(json.dumps({"counters": {"iteration": 12}, "algo": "grpo"}))
    save_config(
        build_config(GRPO, ["lm.temperature=0.7", "lm.max_new_tokens=9"]), ckpt / "config.yaml"
    )
    assert main(["export", str(ckpt), str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    assert "value_head.safetensors" not in {p.name for p in out.iterdir()}
    exported = AutoModelForCausalLM.from_pretrained(out)
    original = AutoModelForCausalLM.from_pretrained(model_dir)
    for (k, a), b in zip(exported.state_dict().items(), original.state_dict().values()):
        assert torch.equal(a, b), k
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("1+1=")["input_ids"] == AutoTokenizer.from_pretrained(model_dir)("1+1=")["input_ids"]
    gen = GenerationConfig.from_pretrained(out)
    own = GenerationConfig.from_pretrained(model_dir)
    assert (gen.temperature, gen.max_new_tokens, gen.do_sample) == (
        own.temperature,
        own.max_new_tokens,
        own.do_sample,
    )
    assert gen.max_new_tokens != 9  # the run's cap does not travel
    readme = (out / "README.md").read_text()
    assert "iteration 12" in readme and "max_new_tokens=9" in readme and "temperature=0.7" in readme
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (out / "config.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert main(["export", str(ckpt), str(out)]) == 2  # not empty
    gym = tmp_path / "gym"
    gym.mkdir()
    (gym / "policy.safetensors").write_bytes(b"")
    assert main(["export", str(gym), str(tmp_path / "g")]) == 2
    assert not (tmp_path / "g").exists()
