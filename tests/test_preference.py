"""Preference learning without Ray: pair files, the concatenated forward, the DPO and
reward-model learners (gradient accumulation and DDP equal one big batch), online DPO's
pairs, the reference cache key and the reward-hacking metrics."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rlft_ray.config import LMConfig, build_config
from rlft_ray.learners.base import LearnerContext
from rlft_ray.learners.dpo import DPOLearner
from rlft_ray.learners.lm_learner import heldout_lm_metrics
from rlft_ray.learners.online_dpo import best_worst_pairs
from rlft_ray.learners.pairwise import PAIRS
from rlft_ray.learners.reward_model import RewardModelLearner, pair_scores, pairwise_accuracy
from rlft_ray.lm.loading import load_model_and_tokenizer
from rlft_ray.lm.pairs import load_pairs, pair_batch, pair_tensors
from rlft_ray.lm.policy import PolicyWithValueHead, pair_logps, response_forward
from rlft_ray.lm.prompts import PromptDataError
from rlft_ray.lm.tiny import make_tiny_model
from rlft_ray.rollout.reference import reference_hash
from rlft_ray.rollout.scoring import RewardModelScorer

from lm_helpers import FrameShard, first_step_grads, free_port, make_batch

PAIRS_ROWS = [
    {"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 10)}
    for a, b in [(1, 2), (12, 30), (5, 37), (40, 40), (9, 9), (3, 30), (22, 7), (14, 14)]
]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("p") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PAIRS_ROWS * 4))
    return path


def _cfg(model_dir: Path, pairs: Path, *overrides: str):
    return build_config(
        overrides=[
            f"lm.model={model_dir}",
            f"lm.pairs={pairs}",
            "lm.max_prompt_tokens=16",
            "lm.max_completion_tokens=8",
            *overrides,
        ]
    )


def _learner(cls, model_dir: Path, pairs: Path, *overrides: str, rank: int = 0, world: int = 1):
    cfg = _cfg(model_dir, pairs, *overrides)
    tok = load_model_and_tokenizer(model_dir)[1]
    table, _ = load_pairs(pairs, tok, cfg.lm)
    shard = FrameShard(table.iloc[rank::world].reset_index(drop=True))
    return cls(cfg, None, LearnerContext(rank, world, datasets={PAIRS: shard}))


def test_pair_files_are_validated_with_the_line_named(model_dir: Path, tmp_path: Path) -> None:
    lm = _cfg(model_dir, tmp_path / "x").lm
    tok = load_model_and_tokenizer(model_dir)[1]
    rows = [
        json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "3"}),
        "",  # a blank line still counts in the line numbers
        json.dumps({"prompt": "1+2=", "chosen": "3"}),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(rows) + "\n")
    with pytest.raises(PromptDataError, match=r"bad.jsonl:3: missing field\(s\) \['rejected'\]"):
        load_pairs(bad, tok, lm)
    same = tmp_path / "same.jsonl"
    same.write_text(rows[0] + "\n" + json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "2"}))
    with pytest.raises(PromptDataError, match=r"same.jsonl:2: 'chosen' equals 'rejected'"):
        load_pairs(same, tok, lm)
    table, stats = load_pairs(
        same, tok, lm.__class__(**{**lm.__dict__, "drop_invalid_pairs": True})
    )
    assert (stats.kept, stats.invalid_dropped) == (1, 1)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"prompt": " ", "chosen": "2", "rejected": "3"}) + "\n")
    with pytest.raises(PromptDataError, match=r"empty.jsonl:1: empty 'prompt'"):
        load_pairs(empty, tok, lm)
    (tmp_path / "none.jsonl").write_text("")
    with pytest.raises(PromptDataError, match="holds no pairs"):
        load_pairs(tmp_path / "none.jsonl", tok, lm)
    long = tmp_path / "long.jsonl"
    long.write_text(
        rows[0] + "\n" + json.dumps({"prompt": "1+1=", "chosen": "9" * 20, "rejected": "3"})
    )
    _, stats = load_pairs(long, tok, lm)
    assert (stats.kept, stats.overlong_dropped) == (1, 1)
    cut = lm.__class__(**{**lm.__dict__, "pair_overflow": "truncate"})
    table, stats = load_pairs(long, tok, cut)
    assert stats.truncated == 1 and len(table["chosen_ids"][1]) == 8
    with pytest.raises(PromptDataError, match="longer than lm.max_prompt_tokens"):
        load_pairs(long, tok, lm.__class__(**{**lm.__dict__, "pair_overflow": "error"}))


def test_fit_to_limits_is_the_one_overflow_rule_of_pairs_and_labelled_rows(
    model_dir: Path, tmp_path: Path
) -> None:
    from rlft_ray.lm.labelled import load_labelled
    from rlft_ray.lm.pairs import fit_to_limits

    lm = _cfg(model_dir, tmp_path / "x", "lm.max_prompt_tokens=3", "lm.max_completion_tokens=2").lm

    def policy(name: str) -> LMConfig:
        return lm.__class__(**{**lm.__dict__, "pair_overflow": name})

    # fits: unchanged, not truncated (every policy)
    assert fit_to_limits([1, 2, 3], [[4, 5], [6]], policy("error"), "f:1", "k") == (
        [1, 2, 3],
        [[4, 5], [6]],
        False,
    )
    # one completion over the limit makes the whole row over-long
    assert fit_to_limits([1, 2], [[4], [5, 6, 7]], policy("drop"), "f:2", "k") is None
    # truncate: the prompt's last 3 tokens, each completion's first 2
    assert fit_to_limits([1, 2, 3, 4], [[5, 6, 7], [8]], policy("truncate"), "f:3", "k") == (
        [2, 3, 4],
        [[5, 6], [8]],
        True,
    )
    with pytest.raises(PromptDataError, match=r"f:4: longer than lm.max_prompt_tokens=3"):
        fit_to_limits([1, 2, 3, 4], [[5]], policy("error"), "f:4", "k")

    # a labelled (ILQL / KTO) file follows the same rule and counts it
    tok = load_model_and_tokenizer(model_dir)[1]
    rows = tmp_path / "labelled.jsonl"
    rows.write_text(
        json.dumps({"prompt": "1+", "completion": "2", "reward": 1.0})
        + "\n"
        + json.dumps({"prompt": "1+", "completion": "2345", "reward": 0.0})
        + "\n"
    )
    _, stats = load_labelled(rows, tok, policy("drop"), "ilql.data", "reward")
    assert (stats.kept, stats.overlong_dropped, stats.truncated) == (1, 1, 0)
    table, stats = load_labelled(rows, tok, policy("truncate"), "ilql.data", "reward")
    assert stats.truncated == 1 and len(table["completion_ids"][1]) == 2
    with pytest.raises(PromptDataError, match=r"labelled.jsonl:2: longer than"):
        load_labelled(rows, tok, policy("error"), "ilql.data", "reward")


def test_conversational_pairs_go_through_the_chat_template(model_dir: Path, tmp_path: Path) -> None:
    lm = _cfg(model_dir, tmp_path / "x", "lm.max_prompt_tokens=64").lm
    tok = load_model_and_tokenizer(model_dir)[1]
    path = tmp_path / "chat.jsonl"
    row = {
        "prompt": [{"role": "user", "content": "1+1="}],
        "chosen": [{"role": "assistant", "content": "2"}],
        "rejected": [{"role": "assistant", "content": "3"}],
    }
    path.write_text(json.dumps(row) + "\n")
    table, _ = load_pairs(path, tok, lm)
    assert tok.decode(table["prompt_ids"][0]) == "user: 1+1=\nassistant: "
    assert table["chosen_ids"][0] == [
        *tok("2", add_special_tokens=False)["input_ids"],
        tok.eos_token_id,
    ]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_shared_prompt_forward_equals_separate_ones(
    model_dir: Path, pairs_file: Path, tmp_path: Path, arch: str
) -> None:
    if arch != "gpt2":  # rotary positions and grouped KV heads through the shared cache
        model_dir = make_tiny_model(tmp_path / arch, arch=arch, n_layer=2, hidden=32, n_head=4)
    model, tok = load_model_and_tokenizer(model_dir)
    net = PolicyWithValueHead(model.eval())
    table, _ = load_pairs(pairs_file, tok, _cfg(model_dir, pairs_file).lm)
    t = pair_tensors(pair_batch(table.iloc[:5], tok.pad_token_id), torch.device("cpu"))
    chosen, rejected, _ = pair_logps(net, t)
    for key, got in (("chosen", chosen), ("rejected", rejected)):
        out = response_forward(
            net, t["prompt_ids"], t["prompt_mask"], t[f"{key}_ids"], t[f"{key}_mask"]
        )
        want = (out.logprobs * t[f"{key}_mask"]).sum(-1)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # and the gradients through the shared prompt's keys and values are the same too
    grads = []
    for shared in (True, False):
        net.zero_grad()
        if shared:
            chosen, rejected, _ = pair_logps(net, t)
        else:
            chosen, rejected = (
                (response_forward(net, t["prompt_ids"], t["prompt_mask"], ids, m).logprobs * m).sum(
                    -1
                )
                for ids, m in (
                    (t["chosen_ids"], t["chosen_mask"]),
                    (t["rejected_ids"], t["rejected_mask"]),
                )
            )
        (chosen - 0.5 * rejected).sum().backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 5
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], atol=1e-5, rtol=1e-4, msg=name)
    # a model whose cache cannot be shared gets one forward over prompt + completion
    ids = torch.stack([t["chosen_ids"], t["rejected_ids"]], 1).flatten(0, 1)
    mask = torch.stack([t["chosen_mask"], t["rejected_mask"]], 1).flatten(0, 1)
    with torch.no_grad():
        index = torch.arange(len(t["prompt_ids"])).repeat_interleave(2)
        shared = net._shared_prompt_hidden(t["prompt_ids"], t["prompt_mask"], ids, mask, index)
        joint = net._joint_hidden(t["prompt_ids"], t["prompt_mask"], ids, mask, index)
    real = mask.bool()
    torch.testing.assert_close(shared[real], joint[real], atol=1e-5, rtol=1e-5)
    # one-token completions are predicted by the prompt alone (no completion pass)
    with torch.no_grad():
        one = net._shared_prompt_hidden(
            t["prompt_ids"], t["prompt_mask"], ids[:, :1], mask[:, :1], index
        )
        alone = response_forward(
            net,
            t["prompt_ids"].repeat_interleave(2, 0),
            t["prompt_mask"].repeat_interleave(2, 0),
            ids[:, :1],
            mask[:, :1],
        ).logprobs
    assert one.shape[:2] == (ids.shape[0], 1)
    one = model.get_output_embeddings()(one)  # the prompt's last position's logits
    torch.testing.assert_close(
        torch.log_softmax(one, -1).gather(-1, ids[:, :1, None])[..., 0], alone, atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("lora", [False, True])
def test_dpo_learns_the_preferences_and_reports_trl_metrics(
    model_dir: Path, pairs_file: Path, lora: bool
) -> None:
    torch.manual_seed(0)  # LoRA's A matrices
    learner = _learner(
        DPOLearner,
        model_dir,
        pairs_file,
        "algo=dpo",
        "dpo.precompute_ref=false",  # with LoRA the reference is the policy, adapters off
        "dpo.optim.lr=5e-2" if lora else "dpo.optim.lr=3e-3",
        "dpo.batch_size=8",
        "dpo.micro_batch_size=4",
        *(["lm.lora.r=4", "lm.lora.alpha=8"] if lora else []),
    )
    first = learner.update(learner.next_batch(0), progress=0.0)
    for step in range(1, 12):
        last = learner.update(learner.next_batch(step), progress=0.5)
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "loss/dpo",
    ):
        assert np.isfinite(last[key]), key
    assert first["loss/dpo"] == pytest.approx(np.log(2), abs=1e-4)  # policy == reference at start
    drop = 0.02 if lora else 0.05  # 4-rank adapters on a 1-layer model move slower
    assert last["loss/dpo"] < first["loss/dpo"] - drop and last["rewards/margins"] > 0
    assert last["rewards/accuracies"] > 0.5 and first["optim/grad_accum_steps"] == 2


def _dpo(model_dir: Path, pairs: Path, *extra: str, rank: int = 0, world: int = 1):
    return _learner(
        DPOLearner,
        model_dir,
        pairs,
        "algo=dpo",
        "dpo.precompute_ref=false",
        "dpo.batch_size=8",
        *extra,
        rank=rank,
        world=world,
    )


def test_micro_batches_give_the_gradient_of_one_batch(model_dir: Path, pairs_file: Path) -> None:
    for extra in ([], ["dpo.loss=ipo"], ["dpo.sft_coef=0.5", "dpo.label_smoothing=0.1"]):
        whole, parts = (
            _dpo(model_dir, pairs_file, f"dpo.micro_batch_size={m}", *extra) for m in (8, 3)
        )
        grads_whole = first_step_grads(whole, whole.next_batch(0))
        grads_parts = first_step_grads(parts, parts.next_batch(0))
        assert len(grads_whole) > 5
        for k, g in grads_whole.items():
            torch.testing.assert_close(grads_parts[k], g, atol=2e-6, rtol=1e-4, msg=f"{extra}: {k}")


def _untied_copy(model_dir: Path, out: Path) -> Path:
    """``model_dir``'s LM with its own output layer (untied from the input embeddings)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tied = AutoModelForCausalLM.from_pretrained(model_dir)
    config = tied.config
    config.tie_word_embeddings = False
    untied = type(tied)(config)
    untied.load_state_dict(tied.state_dict(), strict=False)
    with torch.no_grad():
        untied.transformer.wte.weight.copy_(tied.transformer.wte.weight)
        untied.lm_head.weight.copy_(1.5 * tied.transformer.wte.weight)  # differs from E
    untied.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def untied_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _untied_copy(model_dir, tmp_path_factory.mktemp("untied") / "lm")


def _ddp_worker(rank: int, port: int, model_dir: str, pairs: str, out: str, untied: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        for name, cls, extra in DDP_CASES:
            torch.manual_seed(0)
            model = Path(untied if "untied" in name else model_dir)
            learner = _learner(cls, model, Path(pairs), *extra, rank=rank, world=2)
            torch.save(
                first_step_grads(learner, learner.next_batch(0)), Path(out) / f"{name}-{rank}.pt"
            )
            del learner
            gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


DDP_CASES = [
    (
        "dpo",
        DPOLearner,
        [
            "algo=dpo",
            "dpo.precompute_ref=false",
            "dpo.batch_size=8",
            "dpo.micro_batch_size=2",
            "dpo.shuffle=false",
        ],
    ),
    (
        "rm",
        RewardModelLearner,
        [
            "algo=reward_model",
            "reward_model.batch_size=8",
            "reward_model.micro_batch_size=3",
            "reward_model.shuffle=false",
        ],
    ),
    *(
        (
            f"rm_sft_{kind}",
            RewardModelLearner,
            [
                "algo=reward_model",
                "reward_model.sft_coef=0.5",
                "reward_model.batch_size=8",
                "reward_model.micro_batch_size=3",
                "reward_model.shuffle=false",
            ],
        )
        for kind in ("tied", "untied")
    ),
]


def test_two_ddp_ranks_match_one_on_the_same_global_batch(
    model_dir: Path, pairs_file: Path, untied_dir: Path, tmp_path: Path
) -> None:
    mp.spawn(
        _ddp_worker,
        args=(free_port(), str(model_dir), str(pairs_file), str(tmp_path), str(untied_dir)),
        nprocs=2,
    )
    tok = load_model_and_tokenizer(model_dir)[1]
    table, _ = load_pairs(pairs_file, tok, _cfg(model_dir, pairs_file).lm)
    # rank r read rows r, r+2, ... of the table, 4 each: the global batch is rows 0..7
    for name, cls, extra in DDP_CASES:
        torch.manual_seed(0)
        alone = _learner(cls, untied_dir if "untied" in name else model_dir, pairs_file, *extra)
        rows = pd.concat([table.iloc[0::2].iloc[:4], table.iloc[1::2].iloc[:4]])
        grads = first_step_grads(alone, pair_batch(rows, tok.pad_token_id))
        ranks = [torch.load(tmp_path / f"{name}-{r}.pt") for r in range(2)]
        for k, g in grads.items():
            for r in range(2):
                torch.testing.assert_close(
                    ranks[r][k], g, atol=2e-6, rtol=1e-4, msg=f"{name} rank {r}: {k}"
                )


def test_reward_model_learns_and_serves_the_same_scores(
    model_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    learner = _learner(
        RewardModelLearner,
        model_dir,
        pairs_file,
        "algo=reward_model",
        "reward_model.optim.lr=3e-3",
        "reward_model.batch_size=8",
    )
    tok = learner.tokenizer
    table, _ = load_pairs(pairs_file, tok, learner.cfg.lm)
    before, _ = pairwise_accuracy(learner.model, table, tok.pad_token_id)
    metrics = [learner.update(learner.next_batch(i), i / 30) for i in range(30)]
    after, margin = pairwise_accuracy(learner.model, table, tok.pad_token_id)
    assert metrics[-1]["loss/rm"] < metrics[0]["loss/rm"] - 0.3 and after >= 0.85 > before
    assert margin > 0
    # saved as a save_pretrained directory, a scorer gives the learner's scores for the same text
    learner.model.save_pretrained(tmp_path / "rm" / "policy")
    learner.save_extras(tmp_path / "rm")
    scorer = RewardModelScorer(str(tmp_path / "rm"))
    row = PAIRS_ROWS[1]
    got = scorer.score([row["prompt"], row["prompt"]], [row["chosen"], row["rejected"]])
    t = pair_tensors(pair_batch(table.iloc[1:2], tok.pad_token_id), torch.device("cpu"))
    with torch.no_grad():
        chosen, rejected = pair_scores(learner.model, t)
    assert got == pytest.approx([float(chosen), float(rejected)], abs=1e-4)


@pytest.mark.parametrize("tied", [True, False])
def test_reward_model_sft_term_is_the_chosen_nll_through_the_lm_head(
    model_dir: Path, untied_dir: Path, pairs_file: Path, tmp_path: Path, tied: bool
) -> None:
    from transformers import AutoModelForCausalLM

    model = model_dir if tied else untied_dir
    extra = ["reward_model.batch_size=8", "reward_model.micro_batch_size=3"]
    torch.manual_seed(0)  # the same scalar head for both learners
    learner = _learner(
        RewardModelLearner,
        model,
        pairs_file,
        "algo=reward_model",
        "reward_model.sft_coef=0.5",
        *extra,
    )
    batch = learner.next_batch(0)
    t = pair_tensors(batch, torch.device("cpu"))
    # by hand: the causal LM's mean token NLL of each chosen completion after its prompt
    causal = AutoModelForCausalLM.from_pretrained(model).eval()
    ids = torch.cat([t["prompt_ids"], t["chosen_ids"]], 1)
    mask = torch.cat([t["prompt_mask"], t["chosen_mask"]], 1).long()
    with torch.no_grad():
        logits = causal(
            input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)
        ).logits
    p, m = t["prompt_ids"].shape[1], t["chosen_mask"].float()
    logp = torch.log_softmax(logits[:, p - 1 : -1], -1)
    logp = logp.gather(-1, t["chosen_ids"].unsqueeze(-1)).squeeze(-1)
    expected = float((-(logp * m).sum(-1) / m.sum(-1)).mean())
    metrics = learner.update(batch, 0.5)  # past the warm-up: the step moves the weights
    assert metrics["loss/sft"] == pytest.approx(expected, rel=1e-4)
    # the BT loss alone gives the same loss/rm and no loss/sft
    torch.manual_seed(0)
    plain = _learner(RewardModelLearner, model, pairs_file, "algo=reward_model", *extra)
    plain_metrics = plain.update(plain.next_batch(0), 0.5)
    assert "loss/sft" not in plain_metrics
    assert plain_metrics["loss/rm"] == pytest.approx(metrics["loss/rm"], rel=1e-5)
    # an untied head is trained and checkpointed beside the scorer; a tied one is the embeddings
    assert ("lm_head" in learner.modules()) is not tied
    if not tied:
        head = dict(learner.lm_head.named_parameters())["weight"]
        torch.testing.assert_close(
            head.detach(), causal.lm_head.weight, atol=0.05, rtol=0.05
        )  # loaded from the causal LM, moved by one step
        assert not torch.equal(head.detach(), causal.lm_head.weight)


def test_reward_model_grm_regularizer_is_the_papers_loss(model_dir: Path, pairs_file: Path) -> None:
    """regularizer=grm: (1 - a) BT + a (-log sigma(beta sum_t log pi(y_w))) through the LM
    head (Yang et al. 2024), checked on the first step's gradient, computed by hand."""
    from rlft_ray.learners.reward_model import pair_forward

    alpha, beta = 0.25, 0.5
    extra = [
        "algo=reward_model",
        "reward_model.regularizer=grm",
        f"reward_model.grm_alpha={alpha}",
        f"reward_model.grm_beta={beta}",
        "reward_model.batch_size=8",
        "reward_model.micro_batch_size=3",
        "reward_model.optim.max_grad_norm=1e9",
    ]
    torch.manual_seed(0)
    learner = _learner(RewardModelLearner, model_dir, pairs_file, *extra)
    batch = learner.next_batch(0)
    t = pair_tensors(batch, torch.device("cpu"))
    chosen, rejected, hidden = pair_forward(learner.model, t, hidden=True)
    bt = -torch.nn.functional.logsigmoid(chosen - rejected)
    p, mask = t["prompt_ids"].shape[1], t["chosen_mask"].float()
    logp = torch.log_softmax(learner.lm_head(hidden[:, p - 1 : -1]), -1)
    logp = logp.gather(-1, t["chosen_ids"].unsqueeze(-1)).squeeze(-1)
    reg = -torch.nn.functional.logsigmoid(beta * (logp * mask).sum(-1))  # summed, not mean
    loss = ((1 - alpha) * bt + alpha * reg).mean()
    params = dict(learner.model.named_parameters())
    expected = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    grads = first_step_grads(learner, batch)
    for k, g in expected.items():
        torch.testing.assert_close(grads[k], g, atol=1e-6, rtol=1e-4, msg=k)
    torch.manual_seed(0)
    metrics = _learner(RewardModelLearner, model_dir, pairs_file, *extra).update(batch, 0.5)
    assert metrics["loss/grm_reg"] == pytest.approx(float(reg.mean()), rel=1e-4)
    assert "loss/sft" not in metrics


def test_reward_model_regularizer_config(model_dir: Path, pairs_file: Path) -> None:
    from rlft_ray.config import ConfigError

    def rm(*overrides: str):
        return _cfg(model_dir, pairs_file, "algo=reward_model", *overrides).reward_model

    assert rm().regularizer_used == "none"
    assert rm("reward_model.sft_coef=0.5").regularizer_used == "sft"  # as before: the SFT term
    grm = rm("reward_model.regularizer=grm")
    assert (grm.regularizer_used, grm.grm_alpha, grm.grm_beta) == ("grm", 0.01, 0.1)
    with pytest.raises(ConfigError, match="sft_coef"):
        rm("reward_model.regularizer=grm", "reward_model.sft_coef=0.5")
    with pytest.raises(ConfigError, match="sft_coef"):
        rm("reward_model.regularizer=sft")
    with pytest.raises(ConfigError, match="grm_alpha"):
        rm("reward_model.regularizer=grm", "reward_model.grm_alpha=1.0")


@pytest.mark.parametrize(
    ("pad_is_eos", "score_at", "reads"),
    [
        (False, None, "eos"),  # what Hugging Face pools: the rightmost non-pad token
        (False, "last_content_token", "last_content_token"),
        (True, None, "last_content_token"),  # pad == eos: HF pools the token before EOS
        (True, "eos", "eos"),
    ],
)
def test_reward_score_is_read_at_score_at_in_training_and_scoring(
    model_dir: Path,
    pairs_file: Path,
    tmp_path: Path,
    pad_is_eos: bool,
    score_at: str | None,
    reads: str,
) -> None:
    import shutil

    from transformers import AutoTokenizer

    from rlft_ray.learners.reward_model import pair_forward

    model = model_dir
    if pad_is_eos:  # a tokenizer whose pad token is its EOS (ensure_pad_token's choice)
        model = tmp_path / "pad_eos"
        shutil.copytree(model_dir, model)
        tok = AutoTokenizer.from_pretrained(model)
        tok.pad_token = tok.eos_token
        tok.save_pretrained(model)
    extra = ["algo=reward_model"] + ([f"reward_model.score_at={score_at}"] if score_at else [])
    torch.manual_seed(0)
    learner = _learner(RewardModelLearner, model, pairs_file, *extra)
    tok = learner.tokenizer
    assert (tok.pad_token_id == tok.eos_token_id) is pad_is_eos
    table = load_pairs(pairs_file, tok, learner.cfg.lm)[0].iloc[:4]
    t = pair_tensors(pair_batch(table, tok.pad_token_id), torch.device("cpu"))
    with torch.no_grad():
        chosen, rejected, _ = pair_forward(learner.model, t)
        # by hand: the scalar head on the last hidden state at the configured token
        ids = torch.cat([t["prompt_ids"], t["chosen_ids"]], 1)
        mask = torch.cat([t["prompt_mask"], t["chosen_mask"]], 1).long()
        out = learner.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
            output_hidden_states=True,
        )
        eos_at = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)  # every chosen ends with EOS
        assert (ids[torch.arange(4), eos_at] == tok.eos_token_id).all()
        at = eos_at - 1 if reads == "last_content_token" else eos_at
        expected = learner.model.score(out.hidden_states[-1][torch.arange(4), at])[:, 0]
    torch.testing.assert_close(chosen, expected)
    if score_at is None:  # the default reads what the model read before score_at existed
        torch.testing.assert_close(chosen, out.logits[:, 0])
    # the saved model carries its read-out: the scorer reads the same position
    learner.model.save_pretrained(tmp_path / "rm" / "policy")
    learner.save_extras(tmp_path / "rm")
    scorer = RewardModelScorer(str(tmp_path / "rm"))
    rows = PAIRS_ROWS[:4]
    got = scorer.score(
        [r["prompt"] for r in rows] * 2, [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    )
    assert got == pytest.approx([*chosen.tolist(), *rejected.tolist()], abs=1e-5)


def test_online_dpo_pairs_the_best_and_worst_and_skips_flat_groups(model_dir: Path) -> None:
    batch = make_batch(model_dir, n_prompts=3)  # groups of 4, the first all 1.0
    batch.rewards[4:8] = [0.0, 0.5, 1.0, 0.5]
    batch.rewards[8:12] = [0.2, 0.2, 0.1, 0.9]
    pairs = best_worst_pairs(batch)
    assert len(pairs) == 2 and pairs.skipped_groups == 1
    assert np.array_equal(pairs.chosen_ids, batch.response_ids[[6, 11]])
    assert np.array_equal(pairs.rejected_ids, batch.response_ids[[4, 10]])


def test_online_dpo_refreshes_the_reference_every_k_updates(model_dir: Path) -> None:
    """With asynchronous sampling the batches' policy versions run 0, 0, 1, 2, ...: the
    refresh must follow the learner's own count of updates, not the batch's version."""
    from rlft_ray.learners.lm_rank import PROMPTS
    from rlft_ray.learners.online_dpo import OnlineDPOLearner
    from rlft_ray.lm.prompts import prepare_prompts

    cfg = build_config(
        overrides=["algo=online_dpo", f"lm.model={model_dir}", "online_dpo.ref_refresh_every=2"]
    )
    tok = load_model_and_tokenizer(model_dir)[1]
    table, _ = prepare_prompts(pd.DataFrame({"prompt": ["1+2=", "3+4="]}), tok, cfg.lm, "t")

    def make_learner() -> OnlineDPOLearner:
        ctx = LearnerContext(datasets={PROMPTS: FrameShard(table)})
        return OnlineDPOLearner(cfg, None, ctx)

    learner = make_learner()
    refreshed: list[int] = []
    updates = 0
    reset = learner.core.reset_reference

    def spy() -> None:
        refreshed.append(updates)  # how many updates were done when the reference moved
        reset()

    learner.core.reset_reference = spy
    batch = make_batch(model_dir, n_prompts=2)
    for version in [0, 0, 1, 2, 3]:
        batch.policy_version = version
        metrics = learner.update(batch, 0.5)
        assert metrics["optim/ref_refreshed"] == float(updates in (2, 4))
        updates += 1
    assert refreshed == [2, 4]
    # the count is rank state: a resumed learner refreshes after 6 updates, not 2 after resume
    state = learner.rank_state()
    resumed = make_learner()
    resumed.load_rank_state(state)
    moves: list[int] = []
    resumed.core.reset_reference = lambda: moves.append(1)
    assert resumed.update(batch, 0.5)["optim/ref_refreshed"] == 0.0  # update 6 of the run
    assert resumed.update(batch, 0.5)["optim/ref_refreshed"] == 1.0 and moves == [1]


def test_precomputed_reference_runs_in_the_learners_compute_precision(
    model_dir: Path, pairs_file: Path
) -> None:
    """A GPU learner computes log pi under bf16 autocast: the precomputed reference must
    too (else at step 0, policy == reference, the implicit rewards are fp32-vs-bf16 noise,
    not 0). CPU learners (no autocast) keep fp32; the cache key tells the two apart."""
    from rlft_ray.lm.policy import PolicyWithValueHead
    from rlft_ray.rollout.reference import ReferenceScorer

    lm = _cfg(model_dir, pairs_file).lm
    tok = load_model_and_tokenizer(model_dir)[1]
    table = load_pairs(pairs_file, tok, lm)[0].iloc[:8]
    t = pair_tensors(pair_batch(table, tok.pad_token_id), torch.device("cpu"))
    net = PolicyWithValueHead(load_model_and_tokenizer(model_dir)[0].float().eval())
    with torch.no_grad():
        fp32 = pair_logps(net, t)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = pair_logps(net, t)[0]
    assert not torch.allclose(fp32, bf16, atol=1e-4)  # the precisions do differ
    plain = ReferenceScorer(str(model_dir), lm)(table)
    half = ReferenceScorer(str(model_dir), lm, bf16=True)(table)
    np.testing.assert_allclose(plain["ref_chosen"], fp32.numpy(), atol=1e-5)
    np.testing.assert_allclose(half["ref_chosen"], bf16.numpy(), atol=1e-5)
    assert reference_hash(str(model_dir), lm, bf16=True) != reference_hash(str(model_dir), lm)


def test_reference_cache_key_follows_model_and_data(
    model_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    lm = _cfg(model_dir, pairs_file).lm
    key = reference_hash(str(model_dir), lm)
    assert reference_hash(str(model_dir), lm) == key
    other = tmp_path / "pairs.jsonl"
    other.write_text(pairs_file.read_text() + json.dumps(PAIRS_ROWS[0]) + "\n")
    assert (
        reference_hash(str(model_dir), lm.__class__(**{**lm.__dict__, "pairs": str(other)})) != key
    )
    assert (
        reference_hash(str(model_dir), lm.__class__(**{**lm.__dict__, "max_completion_tokens": 9}))
        != key
    )
    moved = make_tiny_model(
        tmp_path / "m2", n_layer=1, hidden=32, n_head=2, max_positions=64, seed=3
    )
    assert reference_hash(str(moved), lm) != key


def test_reward_hacking_metrics_compare_the_learned_reward_with_correctness() -> None:
    results = [
        {"accuracy": np.array([1.0, 0.0, 1.0]), "reward_model": np.array([2.0, 1.0, 0.5])},
        {"accuracy": np.array([0.0]), "reward_model": np.array([3.0])},
    ]
    out = heldout_lm_metrics(results)
    assert out["eval/accuracy"] == 0.5 and out["eval/reward_model_mean"] == pytest.approx(1.625)
    # correct scores {2.0, 0.5} vs wrong {1.0, 3.0}: 2.0 > 1.0 only -> 1 of 4 comparisons
    assert out["eval/reward_model_auc"] == pytest.approx(0.25)


def test_a_reward_model_that_returns_nan_names_the_sample() -> None:
    from rlft_ray.rewards import RewardError
    from rlft_ray.rollout.scoring import ScorerClient

    class Broken:
        def score(self, prompts: list[str], completions: list[str]) -> list[float]:
            return [0.5, float("nan")]

    with pytest.raises(
        RewardError, match=r"reward model returned nan for sample 1 \(prompt '2\+2='\)"
    ):
        ScorerClient([Broken()])(["1+1=", "2+2="], ["2", "4"])


@pytest.mark.parametrize(
    ("override", "key", "text"),
    [
        ("dpo.beta=0", "dpo.beta", "must be > 0"),
        ("dpo.loss=kto", "dpo.loss", "must be one of"),
        ("dpo.label_smoothing=0.6", "dpo.label_smoothing", "[0, 0.5)"),
        ("dpo.loss=ipo dpo.label_smoothing=0.1", "dpo.label_smoothing", "for loss=sigmoid"),
        ("online_dpo.ref_refresh_every=0", "online_dpo.ref_refresh_every", ">= 1"),
        ("reward_model.margin=-1", "reward_model.margin", ">= 0"),
        ("lm.pair_overflow=wrap", "lm.pair_overflow", "must be one of"),
    ],
)
def test_bad_preference_settings_name_the_key(override: str, key: str, text: str) -> None:
    from rlft_ray.config import ConfigError

    with pytest.raises(ConfigError) as info:
        build_config(overrides=override.split())
    assert info.value.key == key and text in str(info.value)


def test_pair_runs_check_their_inputs_before_ray(model_dir: Path, pairs_file: Path) -> None:
    from rlft_ray.config import ConfigError

    with pytest.raises(ConfigError, match="lm.pairs: algo=dpo needs a preference pair file"):
        DPOLearner.probe(_cfg(model_dir, pairs_file, "algo=dpo", "lm.pairs=null"))
    with pytest.raises(ConfigError, match="dpo.batch_size: is 64 but only 32 usable pairs"):
        DPOLearner.probe(_cfg(model_dir, pairs_file, "algo=dpo", "dpo.batch_size=64"))
    with pytest.raises(
        ConfigError, match="eval_every: the reward model's evaluation needs lm.eval_pairs"
    ):
        RewardModelLearner.probe(_cfg(model_dir, pairs_file, "algo=reward_model", "eval_every=5"))
    probe = DPOLearner.probe(
        _cfg(model_dir, pairs_file, "algo=dpo", "dpo.num_epochs=3", "dpo.batch_size=8")
    )
    assert probe.cfg.total_iterations == 12 and probe.info["pairs/kept"] == 32  # 3 x 32 / 8


def test_ranked_pairs_put_best_against_worst_first_and_skip_duplicates() -> None:
    from types import SimpleNamespace

    from rlft_ray.apps.make_prefs import _ranked_pairs

    # one group of 5: "12" twice (correct), "13" and "" wrong, "22" wrong
    batch = SimpleNamespace(
        group_size=5,
        prompts=["5+7="] * 5,
        completions=["13", "12", "12", " ", "22"],
        rewards=np.array([0.0, 1.0, 1.0, 0.0, 0.0]),
    )
    rows = _ranked_pairs(batch, 0, limit=8)
    # distinct non-empty texts: "13", "12", "22"; one correct, so two pairs, worst (last) first
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("12", "22"), ("12", "13")]
    assert _ranked_pairs(batch, 0, limit=1) == rows[:1]
    flat = SimpleNamespace(**{**vars(batch), "rewards": np.ones(5)})
    assert _ranked_pairs(flat, 0, limit=8) == []


def test_make_arith_prefs_writes_the_named_files(
    model_dir: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    import envs.arithmetic
    from rlft_ray.cli import main

    from lm_helpers import spread_reward

    assert main(["make-arith-data", str(tmp_path), "--train", "12", "--test", "4"]) == 0
    argv = ["make-arith-prefs", str(tmp_path), "--from", str(model_dir), "--samples", "4"]
    # a random model never answers right: with the verifier every prompt is flat, no pair
    assert main([*argv, "--name", "flat"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "flat_train.jsonl").read_text() == ""
    assert "(12 prompts had no reward spread)" in out
    # a reward with a spread over its samples (in place of the verifier): pairs are written
    monkeypatch.setattr(envs.arithmetic, "exact_match", spread_reward)
    assert main([*argv, "--pairs-per-prompt", "3", "--name", "rm_prefs"]) == 0
    out = capsys.readouterr().out
    for split, n_prompts in (("train", 12), ("test", 4)):
        path = tmp_path / f"rm_prefs_{split}.jsonl"
        pairs = [json.loads(line) for line in path.read_text().splitlines()]
        assert f"wrote {len(pairs)} pairs from {n_prompts} prompts to {path}" in out
        prompts = [json.loads(x)["prompt"] for x in (tmp_path / f"arith_{split}.jsonl").open()]
        assert 0 < len(pairs) <= 3 * n_prompts
        for p in pairs:
            assert set(p) == {"prompt", "chosen", "rejected", "score_chosen", "score_rejected"}
            assert p["prompt"] in prompts and p["chosen"] != p["rejected"]
            assert p["chosen"].strip() and p["rejected"].strip()
            # the scores are the reward's, and the chosen one scored higher
            assert [p["score_chosen"], p["score_rejected"]] == spread_reward(
                [p["prompt"]] * 2, [p["chosen"], p["rejected"]], [{}, {}]
            )
            assert p["score_chosen"] > p["score_rejected"]
        # at most 3 per prompt, the best against the worst first
        by_prompt: dict[str, list[dict]] = {}
        for p in pairs:
            by_prompt.setdefault(p["prompt"], []).append(p)
        for group in by_prompt.values():
            assert len(group) <= 3
            assert group[0]["score_chosen"] == max(g["score_chosen"] for g in group)
            assert group[0]["score_rejected"] == min(g["score_rejected"] for g in group)
    assert not (tmp_path / "arith_prefs_train.jsonl").exists()


def test_scoring_encodes_each_prompt_as_the_reward_model_was_trained(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tokenizer that adds BOS, a chat template that writes it and ``lm.chat_template``
    off: a conversational prompt is templated (no special tokens added), a plain one gets
    the tokenizer's BOS. The scorer must encode each the way the pair file was encoded."""
    import shutil

    from tokenizers.processors import TemplateProcessing
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import rlft_ray.rollout.scoring as scoring
    from rlft_ray.lm.prompts import prepare_prompts, prompts_from_batch
    from rlft_ray.lm.tiny import CHAT_TEMPLATE
    from rlft_ray.rollout.generation import GenerationActor

    policy_dir, rm_dir = tmp_path / "policy", tmp_path / "rm"
    shutil.copytree(model_dir, policy_dir)
    tok = AutoTokenizer.from_pretrained(policy_dir)
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", bos)]
    )
    tok.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE
    tok.save_pretrained(policy_dir)
    rm = AutoModelForSequenceClassification.from_pretrained(policy_dir, num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)
    tok = AutoTokenizer.from_pretrained(rm_dir)
    assert tok("1")["input_ids"][0] == bos  # the saved tokenizer adds BOS

    conversation = [{"role": "user", "content": "1+2="}]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"prompt": p, "chosen": "3", "rejected": "4"}) + "\n"
            for p in (conversation, "1+2=")
        )
    )
    cfg = _cfg(
        policy_dir,
        pairs,
        "lm.chat_template=false",
        "lm.max_new_tokens=2",
        "lm.max_prompt_tokens=32",
    )
    table, _ = load_pairs(pairs, tok, cfg.lm)
    trained = [[*p, *c] for p, c in zip(table["prompt_ids"], table["chosen_ids"])]
    assert trained[0][:2] == [bos, tok.convert_tokens_to_ids("u")]  # one BOS, the template's
    assert trained[1][:2] == [bos, tok.convert_tokens_to_ids("1")]  # the tokenizer's BOS

    prepared, _ = prepare_prompts(
        pd.DataFrame({"prompt": [conversation, "1+2="]}), tok, cfg.lm, "test"
    )
    scorer = RewardModelScorer(str(rm_dir), add_special_tokens=not cfg.lm.chat_template)
    actor = GenerationActor(cfg.lm, seed=0, scorers=[scorer])
    batch = actor.generate(prompts_from_batch(prepared), greedy=True)
    batch.completions = ["3", "3"]
    seen: list[list[int]] = []

    def spy(model, seqs, pad_id):
        seen.extend(list(map(int, s)) for s in seqs)
        return [0.0] * len(seqs)

    monkeypatch.setattr(scoring, "score_sequences", spy)
    actor.score(batch)
    assert seen == trained
