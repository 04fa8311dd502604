"""LM config sections, prompt-file validation and the checks that run before Ray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rlft_ray.config import ConfigError, build_config
from rlft_ray.learners.base import EvalOptions
from rlft_ray.learners.lm_learner import check_reward_fns, evaluate_lm, probe_lm
from rlft_ray.learners.registry import get_learner_cls
from rlft_ray.lm.loading import load_tokenizer
from rlft_ray.lm.prompts import (
    PromptDataError,
    ShardStream,
    TableShard,
    load_prompts,
    prompts_from_batch,
)
from rlft_ray.lm.tiny import build_tokenizer, make_tiny_model
from rlft_ray.run.resources import ResourceError, check_fits

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(
        tmp_path_factory.mktemp("m") / "tiny", n_layer=1, hidden=32, n_head=2, max_positions=64
    )


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- schema


@pytest.mark.parametrize(
    ("override", "key", "message"),
    [
        ("grpo.estimator=ppo", "grpo.estimator", "must be one of"),
        ("grpo.kl_coef=-0.1", "grpo.kl_coef", ">= 0"),
        ("grpo.kl_estimator=k4", "grpo.kl_estimator", "must be one of"),
        ("grpo.kl_in=both", "grpo.kl_in", "must be one of"),
        ("grpo.loss_agg=sum", "grpo.loss_agg", "must be one of"),
        ("grpo.micro_batch_size=0", "grpo.micro_batch_size", ">= 1"),
        ("grpo.optim.warmup_fraction=1.0", "grpo.optim.warmup_fraction", r"\[0, 1\)"),
        ("lm_ppo.gae_lambda=1.5", "lm_ppo.gae_lambda", r"\[0, 1\]"),
        ("lm_ppo.value_clip=0", "lm_ppo.value_clip", "> 0 or null"),
        ("lm.temperature=0", "lm.temperature", "> 0"),
        ("lm.top_p=1.5", "lm.top_p", r"\(0, 1\]"),
        ("lm.num_samples=0", "lm.num_samples", ">= 1"),
        ("lm.track_kl_every=0", "lm.track_kl_every", ">= 1"),
        ("lm.prompt_overflow=wrap", "lm.prompt_overflow", "must be one of"),
        ("lm.reward_fn=exact_match", "lm.reward_fn", "package.module:function"),
        ("lm.prompt_template=Reply with a number.", "lm.prompt_template", r"\{prompt\} exactly"),
        ("lm.dtype=int8", "lm.dtype", "float32"),
        ("lm.temprature=0.7", "lm.temprature", "did you mean 'lm.temperature'"),
        ("total_iterations=0", "total_iterations", ">= 1"),
        ("resources.gpus_per_rollout_actor=-1", "resources.gpus_per_rollout_actor", ">= 0"),
    ],
)
def test_bad_lm_values_name_the_key(override: str, key: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        build_config(EXAMPLES / "arithmetic_grpo.yaml", [override])
    assert info.value.key == key


def test_examples_and_aliases() -> None:
    cfg = build_config(EXAMPLES / "arithmetic_grpo.yaml", ["model=some/dir", "grpo.optim.lr=3e-4"])
    assert cfg.algo == "grpo" and cfg.lm.model == "some/dir" and cfg.grpo.optim.lr == 3e-4
    assert cfg.algo_config is cfg.grpo and cfg.total_iterations == 500
    ppo = build_config(EXAMPLES / "arithmetic_ppo.yaml")
    assert ppo.algo == "lm_ppo" and ppo.algo_config.vf_coef == 0.1
    # defaults come from the papers: GRPO beta 0.04 / k3 in the loss; PPO k1 in the reward
    assert build_config().grpo.kl_coef == 0.04 and build_config().grpo.kl_in == "loss"
    assert build_config().lm_ppo.kl_estimator == "k1" and build_config().lm_ppo.gamma == 1.0


# --------------------------------------------------------------------------- prompt files


def test_prompt_file_errors(tmp_path: Path) -> None:
    tok = build_tokenizer()
    lm = build_config().lm
    with pytest.raises(PromptDataError, match="prompt file not found"):
        load_prompts(tmp_path / "missing.jsonl", tok, lm)
    (tmp_path / "p.csv").write_text("prompt\n1+1=\n")
    with pytest.raises(PromptDataError, match="unsupported prompt file type"):
        load_prompts(tmp_path / "p.csv", tok, lm)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "1+1="}\n{oops\n')
    with pytest.raises(PromptDataError, match=r"bad.jsonl:2 is not valid JSON"):
        load_prompts(tmp_path / "bad.jsonl", tok, lm)
    _jsonl(tmp_path / "q.jsonl", [{"question": "1+1="}])
    with pytest.raises(PromptDataError, match=r"no 'prompt' column \(columns: question\)") as info:
        load_prompts(tmp_path / "q.jsonl", tok, lm)
    assert info.value.key == "lm.prompts"


def test_empty_prompts_fail_or_are_dropped_and_counted(tmp_path: Path) -> None:
    tok = build_tokenizer()
    path = _jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "1+1=", "answer": "2"},
            {"prompt": "  "},
            {"prompt": None},
            {"prompt": "2+2=", "answer": "4"},
        ],
    )
    cfg = build_config()
    with pytest.raises(
        PromptDataError, match=r"2 empty prompt\(s\) at row\(s\) 2, 3.*drop_empty_prompts"
    ):
        load_prompts(path, tok, cfg.lm)
    table, stats = load_prompts(
        path, tok, build_config(overrides=["lm.drop_empty_prompts=true"]).lm
    )
    assert (stats.total, stats.kept, stats.empty_dropped) == (4, 2, 2)
    assert [p.text for p in prompts_from_batch(table)] == ["1+1=", "2+2="]


def test_overlong_prompts_drop_truncate_or_error(tmp_path: Path) -> None:
    tok = build_tokenizer()
    path = _jsonl(
        tmp_path / "p.jsonl",
        [{"prompt": "1+1=", "answer": "2"}, {"prompt": "12345678+1=", "answer": "12345679"}],
    )
    table, stats = load_prompts(path, tok, build_config(overrides=["lm.max_prompt_tokens=6"]).lm)
    assert (stats.kept, stats.overlong_dropped, stats.truncated) == (1, 1, 0)
    table, stats = load_prompts(
        path,
        tok,
        build_config(overrides=["lm.max_prompt_tokens=6", "lm.prompt_overflow=truncate"]).lm,
    )
    prompts = prompts_from_batch(table)
    assert (stats.kept, stats.truncated) == (2, 1)
    assert prompts[1].text == "678+1=" and len(prompts[1].ids) == 6  # keeps the end
    with pytest.raises(
        PromptDataError, match=r"1 prompt\(s\) longer than lm.max_prompt_tokens=6 at row\(s\) 2"
    ):
        load_prompts(
            path,
            tok,
            build_config(overrides=["lm.max_prompt_tokens=6", "lm.prompt_overflow=error"]).lm,
        )
    assert "1 over-long truncated" in stats.describe()


def test_parquet_metadata_ground_truth_and_chat_template(tmp_path: Path) -> None:
    tok = build_tokenizer()
    path = tmp_path / "p.parquet"
    pd.DataFrame(
        {"prompt": ["1+1=", "2+3="], "ground_truth": ["2", "5"], "level": [1, 2]}
    ).to_parquet(path)
    table, stats = load_prompts(path, tok, build_config().lm)
    prompts = prompts_from_batch(table)
    assert stats.kept == 2
    assert prompts[1].metadata == {"ground_truth": "5", "level": 2, "answer": "5"}
    chat = build_config(overrides=["lm.chat_template=true", "lm.system_prompt=solve"]).lm
    prompts = prompts_from_batch(load_prompts(path, tok, chat)[0])
    assert prompts[0].text == "system: solve\nuser: 1+1=\nassistant: "
    assert tok.decode(prompts[0].ids) == prompts[0].text


def test_answers_stay_as_written_and_rows_without_one_are_refused(tmp_path: Path) -> None:
    from envs.arithmetic import exact_match

    tok = build_tokenizer()
    lm = build_config().lm
    # integers stay integers (pandas would make them floats next to a missing value) ...
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "9+10=", "answer": 19}\n\n{"prompt": "1+1=", "answer": 2}\n')
    prompts = prompts_from_batch(load_prompts(path, tok, lm)[0])
    assert [p.metadata["answer"] for p in prompts] == [19, 2]
    assert exact_match([p.text for p in prompts], ["19", "2"], [p.metadata for p in prompts]) == [
        1.0,
        1.0,
    ]
    # ... and a row without one (null or missing) is named by its line in the file
    path.write_text(
        '{"prompt": "9+10=", "answer": 19}\n\n{"prompt": "1+1=", "answer": null}\n{"prompt": "2+2="}\n'
    )
    with pytest.raises(PromptDataError, match=r"2 row\(s\) without 'answer' .* at line\(s\) 3, 4"):
        load_prompts(path, tok, lm)
    parquet = tmp_path / "p.parquet"
    pd.DataFrame({"prompt": ["1+1=", "2+2="], "answer": [2, None]}).to_parquet(parquet)
    with pytest.raises(PromptDataError, match=r"1 row\(s\) without 'answer' .* at line\(s\) 2"):
        load_prompts(parquet, tok, lm)
    pd.DataFrame({"prompt": ["1+1=", "2+2="], "answer": [2, 4]}).to_parquet(parquet)
    assert [
        p.metadata["answer"] for p in prompts_from_batch(load_prompts(parquet, tok, lm)[0])
    ] == [2, 4]


def test_conversational_prompts_go_through_the_chat_template(tmp_path: Path) -> None:
    tok = build_tokenizer()
    conversation = [{"role": "system", "content": "add"}, {"role": "user", "content": "1+1="}]
    path = _jsonl(tmp_path / "c.jsonl", [{"prompt": conversation, "answer": "2"}])
    (prompt,) = prompts_from_batch(load_prompts(path, tok, build_config().lm)[0])
    assert prompt.text == "system: add\nuser: 1+1=\nassistant: "  # not the list's repr
    bad = _jsonl(tmp_path / "b.jsonl", [{"prompt": [{"content": "1+1="}], "answer": "2"}])
    with pytest.raises(ConfigError, match="list of \\{role, content\\} messages"):
        load_prompts(bad, tok, build_config().lm)


def test_an_empty_prompt_file_says_so(tmp_path: Path) -> None:
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(PromptDataError, match=r"e.jsonl is empty: no prompts to read"):
        load_prompts(tmp_path / "e.jsonl", build_tokenizer(), build_config().lm)


# --------------------------------------------------------------------------- probe (before Ray)


def _cfg(model_dir: Path, tmp_path: Path, *overrides: str):
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(40)]
    prompts = _jsonl(tmp_path / "train.jsonl", rows)
    return build_config(
        EXAMPLES / "arithmetic_grpo.yaml",
        [f"lm.model={model_dir}", f"lm.prompts={prompts}", "lm.eval_prompts=null", *overrides],
    )


def test_probe_reads_and_counts_prompts(model_dir: Path, tmp_path: Path) -> None:
    probe = probe_lm(_cfg(model_dir, tmp_path))
    assert probe.info["data/kept"] == 40 and probe.info["env"] is None
    assert len(probe.datasets["prompts"]) == 40
    assert probe.spaces.action.n == len(build_tokenizer())
    assert Path(probe.cfg.lm.model).is_absolute() and Path(probe.cfg.lm.prompts).is_absolute()


def test_probe_with_a_built_in_verifier_and_a_prompt_template(
    model_dir: Path, tmp_path: Path
) -> None:
    """The pre-flight reward call scores the first prompt's answer with the built-in, and
    the prompts the learners get are wrapped by lm.prompt_template."""
    cfg = _cfg(
        model_dir,
        tmp_path,
        "lm.reward_fn=rlft_ray.rewards:final_number",
        "lm.eval_fn=rlft_ray.rewards:exact_match",
        "lm.prompt_template=Q: {prompt} A:",
    )
    probe = probe_lm(cfg)
    first = prompts_from_batch(probe.datasets["prompts"].head(2))
    assert [p.text for p in first] == ["Q: 0+1= A:", "Q: 1+1= A:"]


@pytest.mark.parametrize(
    ("overrides", "key", "message"),
    [
        (["lm.model=./no/such/model"], "lm.model", "model path does not exist: ./no/such/model"),
        (["lm.model=nonexistent-org/nonexistent-model"], "lm.model", "hub cannot be reached"),
        (["lm.model=null"], "lm.model", "needs a causal LM"),
        (["lm.prompts=null"], "lm.prompts", "needs a prompt file"),
        (["lm.prompts_per_iteration=15"], "lm.prompts_per_iteration", "cannot be split evenly"),
        (["lm.prompts_per_iteration=64"], "lm.prompts_per_iteration", "only 40 usable prompts"),
        (["lm.max_new_tokens=60"], "lm.max_new_tokens", "exceeds the model's 64 positions"),
        (["lm.reward_fn=envs.arithmetic:no_such_fn"], "lm.reward_fn", "no attribute"),
        (["lm.eval_fn=rlft_ray.rewards:boxd"], "lm.eval_fn", "did you mean 'boxed'"),
        (["lm.reward_fn=no_such_pkg.mod:fn"], "lm.reward_fn", "cannot import"),
        (["lm.eval_prompts=missing.jsonl"], "lm.eval_prompts", "not found"),
        (["grpo.estimator=rloo", "lm.num_samples=1"], "lm.num_samples", "rloo needs at least 2"),
    ],
)
def test_probe_errors_name_the_key(
    model_dir: Path, tmp_path: Path, overrides: list[str], key: str, message: str
) -> None:
    cfg = _cfg(model_dir, tmp_path, *overrides)
    with pytest.raises(ConfigError, match=message) as info:
        get_learner_cls(cfg.algo).probe(cfg)
    assert info.value.key == key


@pytest.mark.parametrize("key", ["lm.reward_fn", "lm.eval_fn"])
def test_a_reward_function_that_does_not_exist_fails_before_ray(key: str, tmp_path: Path) -> None:
    """The pre-flight check (run by every LM learner's probe before Ray starts) names the key
    and the closest built-in; no model or prompt file is needed to get there."""
    import ray

    cfg = build_config(overrides=[f"{key}=rlft_ray.rewards:final_numbr"])
    with pytest.raises(ConfigError) as info:
        check_reward_fns(cfg)
    assert info.value.key == key and str(info.value).startswith(f"{key}: ")
    assert "has no attribute 'final_numbr'" in str(info.value)
    assert "did you mean 'final_number'" in str(info.value)
    assert not ray.is_initialized()
    check_reward_fns(build_config(overrides=[f"{key}=rlft_ray.rewards:final_number"]))
    # rlft-ray eval checks it before it loads the model (there is none here)
    with pytest.raises(ConfigError) as info:
        evaluate_lm(tmp_path / "no-model", cfg, EvalOptions(dataset=str(tmp_path / "p.jsonl")))
    assert info.value.key == key


def test_tokenizer_without_pad_token_gets_eos(model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "tok")
    cfg = _cfg(model_dir, tmp_path, f"lm.tokenizer={tmp_path / 'tok'}")
    loaded, note = load_tokenizer(cfg)
    assert loaded.pad_token == loaded.eos_token and "using eos" in note
    assert probe_lm(cfg).info["tokenizer_pad"] == note


def test_gpu_requested_without_one() -> None:
    cfg = build_config(EXAMPLES / "arithmetic_grpo.yaml", ["resources.gpus_per_rollout_actor=0.5"])
    with pytest.raises(
        ResourceError, match=r"gpus_per_rollout_actor=0.5 needs 1 GPU\(s\).*cluster has 0"
    ):
        check_fits(cfg.resources, {"CPU": 8.0})
    cfg = build_config(EXAMPLES / "arithmetic_grpo.yaml", ["resources.use_gpu=true"])
    with pytest.raises(ResourceError, match=r"use_gpu=true needs 1 GPU"):
        check_fits(cfg.resources, {"CPU": 8.0})


def test_eval_needs_a_dataset(model_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg(model_dir, tmp_path)
    with pytest.raises(ConfigError, match="--dataset"):
        get_learner_cls("grpo").evaluate(model_dir, cfg, EvalOptions())
    result = get_learner_cls("grpo").evaluate(
        model_dir, cfg, EvalOptions(dataset=cfg.lm.prompts, limit=5)
    )
    assert result["num_prompts"] == 5 and 0.0 <= result["accuracy"] <= 1.0


def test_cli_makes_models_and_the_shipped_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForCausalLM

    from rlft_ray.cli import main

    args = ["--layers", "1", "--hidden", "32", "--heads", "4"]
    assert main(["make-tiny-model", str(tmp_path / "m"), "--arch", "qwen2", *args]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m").config.model_type == "qwen2"
    assert main(["make-tiny-model", str(tmp_path / "m")]) == 2
    assert "not empty" in capsys.readouterr().err
    # the prompt files in data/ are exactly what `rlft-ray make-arith-data data` writes
    assert main(["make-arith-data", str(tmp_path / "d")]) == 0
    shipped = Path(__file__).resolve().parent.parent / "data"
    for name in ("arith_train.jsonl", "arith_test.jsonl"):
        assert (tmp_path / "d" / name).read_text() == (shipped / name).read_text(), name


def test_in_memory_shards_give_ddp_ranks_one_global_batch() -> None:
    """Two ranks' batches at each step together are the batch one learner takes at that
    step (same shuffle, every epoch), and resuming a stream goes on where it stopped."""
    table = pd.DataFrame({"i": np.arange(20)})

    def steps(world: int, per_rank: int) -> list[list[int]]:
        streams = [
            ShardStream(TableShard(table, r, world), per_rank, seed=3, shuffle=True)
            for r in range(world)
        ]
        # 8 steps cross an epoch boundary (20 rows // 4 per global batch = 5 steps)
        return [sorted(int(x) for s in streams for x in s.next_rows()["i"]) for _ in range(8)]

    one, two = steps(1, 4), steps(2, 2)
    assert one == two
    assert sorted(x for b in one[:5] for x in b) == sorted(range(20))  # an epoch: each row once
    assert one[5] != one[0]  # epoch 2 is reshuffled
    # resume: a fresh stream loaded with the state after 3 steps gives steps 4 and 5
    s = ShardStream(TableShard(table, 1, 2), 2, seed=3, shuffle=True)
    for _ in range(3):
        s.next_rows()
    resumed = ShardStream(TableShard(table, 1, 2), 2, seed=3, shuffle=True)
    resumed.load_state(s.state())
    assert [list(resumed.next_rows()["i"]) for _ in range(2)] == [
        list(s.next_rows()["i"]) for _ in range(2)
    ]


def test_a_learning_rate_far_above_the_usual_for_the_model_size_warns(caplog) -> None:
    from rlft_ray.learners.lm_learner import parameter_count, warn_unusual_lr

    class Cfg:  # SmolLM2-135M's sizes
        hidden_size, num_hidden_layers, vocab_size = 576, 30, 49152

    assert parameter_count(Cfg()) == 49152 * 576 + 12 * 30 * 576 * 576  # ~147M
    full = build_config(overrides=["algo=grpo", "grpo.optim.lr=5e-4"])
    with caplog.at_level("WARNING"):
        warn_unusual_lr(full, parameter_count(Cfg()))
    assert "grpo.optim.lr=0.0005 is far above" in caplog.text and "1e-6 to 1e-5" in caplog.text
    caplog.clear()
    for cfg, params in (
        (build_config(overrides=["algo=grpo", "grpo.optim.lr=1e-5"]), 147e6),  # usual
        (full, 200_000),  # a tiny model: its own rules
        (build_config(overrides=["algo=grpo", "grpo.optim.lr=1e-4", "lm.lora.r=16"]), 147e6),
    ):
        with caplog.at_level("WARNING"):
            warn_unusual_lr(cfg, int(params))
    assert caplog.text == ""


def test_threads_follow_the_config_or_the_cpus_held() -> None:
    from rlft_ray.learners.lm_learner import lm_sampler_kwargs

    held = build_config(overrides=["algo=grpo", "resources.cpus_per_rollout_actor=1.5"])
    assert lm_sampler_kwargs(held, 0)["num_threads"] == 1  # floor of the CPUs held
    turns = build_config(
        overrides=[
            "algo=grpo",
            "resources.threads_per_rollout_actor=2",
            "resources.threads_per_learner=2",
        ]
    )
    assert lm_sampler_kwargs(turns, 0)["num_threads"] == 2
    with pytest.raises(ConfigError, match="resources.threads_per_learner"):
        build_config(overrides=["resources.threads_per_learner=0"])
