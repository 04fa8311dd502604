"""SimPO, ORPO and KTO: the losses against the papers' equations computed by hand, TRL's
implementations on the same batch (skipped without trl), and the learners without Ray
(data validation, reference-free pair learners, KTO's z0 and its learning)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rlft_ray.algorithms import kto_losses, kto_reference_point, orpo_losses, simpo_losses
from rlft_ray.config import ConfigError, build_config
from rlft_ray.learners.base import LearnerContext
from rlft_ray.learners.kto import KTOLearner
from rlft_ray.learners.pairwise import LABELLED, PAIRS
from rlft_ray.learners.ref_free import ORPOLearner, SimPOLearner
from rlft_ray.lm.labelled import labelled_tensors, load_labelled
from rlft_ray.lm.loading import load_model_and_tokenizer
from rlft_ray.lm.pairs import load_pairs
from rlft_ray.lm.prompts import PromptDataError

from lm_helpers import FrameShard

sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731


def test_simpo_loss_is_the_papers_equation_by_hand() -> None:
    # beta=2, gamma=0.5: z = 2 (-0.5) - 2 (-1.25) - 0.5 = 1.0 ; -log sigma(1) = 0.31326
    c, r = torch.tensor([-0.5, -2.0]), torch.tensor([-1.25, -1.0])
    losses, rc, rr = simpo_losses(c, r, beta=2.0, gamma=0.5)
    assert losses[0].item() == pytest.approx(-math.log(sig(1.0)), abs=1e-6)
    assert losses[1].item() == pytest.approx(-math.log(sig(2 * -2.0 - 2 * -1.0 - 0.5)), abs=1e-6)
    assert rc.tolist() == [-1.0, -4.0] and rr.tolist() == [-2.5, -2.0]
    smooth, _, _ = simpo_losses(c, r, 2.0, 0.5, label_smoothing=0.1)
    assert smooth[0].item() == pytest.approx(-0.9 * math.log(sig(1)) - 0.1 * math.log(sig(-1)))
    with pytest.raises(ValueError, match="gamma"):
        simpo_losses(c, r, 2.0, -1.0)


def test_orpo_loss_is_nll_plus_the_odds_ratio_term_by_hand() -> None:
    # P_w = 0.5, P_l = 0.25: odds 1 and 1/3, log OR = log 3; l = nll + 0.1 * -log sigma(log 3)
    c, r = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    nll = torch.tensor([0.7])
    losses, or_losses, log_odds = orpo_losses(c, r, nll, lambda_or=0.1)
    assert log_odds.item() == pytest.approx(math.log(3), abs=1e-6)
    assert or_losses.item() == pytest.approx(-math.log(0.75), abs=1e-6)  # sigma(log 3) = 3/4
    assert losses.item() == pytest.approx(0.7 + 0.1 * -math.log(0.75), abs=1e-6)
    # near-certain completions stay finite (log1mexp at both ends)
    tiny = orpo_losses(torch.tensor([-1e-9]), torch.tensor([-80.0]), nll, 0.1)[0]
    assert torch.isfinite(tiny).all()


def test_kto_loss_and_reference_point_by_hand() -> None:
    z0 = kto_reference_point(torch.tensor([-3.0, -2.0]), torch.tensor([-3.5, -3.0]))
    assert z0.item() == pytest.approx(0.75)  # mean(0.5, 1.0)
    assert kto_reference_point(torch.tensor([-3.0]), torch.tensor([-1.0])).item() == 0.0  # clamped
    pol, ref = torch.tensor([-1.0, -4.0]), torch.tensor([-2.0, -3.0])
    losses, rewards = kto_losses(pol, ref, torch.tensor([True, False]), 0.75, 0.1, 1.0, 2.0)
    # desirable: 1 - sigma(0.1 (1 - 0.75)); undesirable: 2 (1 - sigma(0.1 (0.75 - (-1))))
    assert losses[0].item() == pytest.approx(1 - sig(0.025), abs=1e-6)
    assert losses[1].item() == pytest.approx(2 * (1 - sig(0.175)), abs=1e-6)
    assert rewards.tolist() == pytest.approx([0.1, -0.1])


# -- TRL on the same batch (slow: importing trl takes ~13 s; benchmarks/lm_preference_algos.py
# runs the same checks) -----------------------------------------------------------------------


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return -torch.rand(16, generator=g) * 3, -torch.rand(16, generator=g) * 3


@pytest.mark.slow
def test_simpo_matches_trls_cpo_simpo_loss() -> None:
    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    c, r = _batch()
    stub = SimpleNamespace(
        alpha=0.0,
        beta=2.0,
        simpo_gamma=0.5,
        loss_type="simpo",
        label_smoothing=0.0,
        accelerator=SimpleNamespace(device=torch.device("cpu")),
    )
    theirs, their_c, _ = cpo.CPOTrainer.cpo_loss(stub, c, r)
    ours, our_c, _ = simpo_losses(c, r, beta=2.0, gamma=0.5)
    torch.testing.assert_close(ours, theirs, rtol=1e-2, atol=0)
    torch.testing.assert_close(our_c, their_c)


@pytest.mark.slow
def test_orpo_matches_trls_odds_ratio_loss() -> None:
    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    c, r = _batch()
    stub = SimpleNamespace(beta=0.1, accelerator=SimpleNamespace(device=torch.device("cpu")))
    theirs, *_ = orpo.ORPOTrainer.odds_ratio_loss(stub, c, r)  # beta * log sigma(log OR)
    nll = torch.full_like(c, 0.3)
    ours, _, _ = orpo_losses(c, r, nll, 0.1)
    # TRL's total is nll - mean(their term): per pair, ours = nll - theirs
    torch.testing.assert_close(ours, nll - theirs, rtol=1e-2, atol=0)


@pytest.mark.slow
def test_kto_matches_trls_kto_trainer_on_the_same_log_probs() -> None:
    """TRL's ``KTOTrainer._compute_loss`` on stub models that return fixed log-probs."""
    trl_kto = pytest.importorskip("trl.trainer.kto_trainer")
    g = torch.Generator().manual_seed(1)
    b, t = 6, 4
    tok_logps = -torch.rand(b, t, generator=g)
    ref_tok = -torch.rand(b, t, generator=g)
    kl_tok, kl_ref_tok = -torch.rand(b, t, generator=g), -torch.rand(b, t, generator=g)
    labels = torch.tensor([True, False, True, True, False, False])

    class Model(torch.nn.Module):
        is_gradient_checkpointing = False

        def __init__(self, logps, kl):
            super().__init__()
            self.logps, self.kl = logps, kl

        def forward(self, input_ids, **kw):
            lp = self.kl if input_ids is kl_ids else self.logps
            return SimpleNamespace(
                log_probs=lp,
                entropy=torch.zeros_like(lp),
                mean_logits=torch.zeros_like(lp),
                aux_loss=None,
            )

    ids, kl_ids = torch.zeros(b, t + 1, dtype=torch.long), torch.ones(b, t + 1, dtype=torch.long)
    ones = torch.ones(b, t + 1, dtype=torch.long)
    batch = {
        "input_ids": ids,
        "attention_mask": ones,
        "completion_mask": ones,
        "KL_input_ids": kl_ids,
        "KL_attention_mask": ones,
        "KL_completion_mask": ones,
        "label": labels,
    }
    acc = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x)
    from collections import defaultdict

    stub = SimpleNamespace(
        model=Model(tok_logps, kl_tok),
        ref_model=Model(ref_tok, kl_ref_tok),
        accelerator=acc,
        calculate_KL=True,
        aux_loss_enabled=False,
        precompute_ref_logps=False,
        loss_type="kto",
        beta=0.1,
        desirable_weight=1.0,
        undesirable_weight=1.33,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    stub._compute_kl_logps = lambda model, bt: trl_kto.KTOTrainer._compute_kl_logps(stub, model, bt)
    theirs = trl_kto.KTOTrainer._compute_loss(stub, stub.model, batch, return_outputs=False)
    z0 = kto_reference_point(kl_tok.sum(-1), kl_ref_tok.sum(-1))
    losses, _ = kto_losses(tok_logps.sum(-1), ref_tok.sum(-1), labels, z0, 0.1, 1.0, 1.33)
    assert stub._metrics["train"]["kl"][0] == pytest.approx(z0.item(), rel=1e-2)
    assert losses.mean().item() == pytest.approx(float(theirs), rel=1e-2)


# -- data and learners -----------------------------------------------------------------------

ROWS = [
    (a, b) for a, b in [(1, 2), (12, 30), (5, 37), (40, 40), (9, 9), (3, 30), (22, 7), (14, 14)]
]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("p") / "pairs.jsonl"
    rows = [
        {"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 10)} for a, b in ROWS
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    return path


@pytest.fixture(scope="module")
def kto_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("k") / "kto.jsonl"
    rows = []
    for a, b in ROWS * 4:
        rows.append({"prompt": f"{a}+{b}=", "completion": str(a + b), "label": True})
        rows.append({"prompt": f"{a}+{b}=", "completion": str(a + b + 10), "label": False})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(model_dir: Path, *overrides: str):
    return build_config(
        overrides=[
            f"lm.model={model_dir}",
            "lm.max_prompt_tokens=16",
            "lm.max_completion_tokens=8",
            *overrides,
        ]
    )


def _pair_learner(cls, model_dir: Path, pairs: Path, *overrides: str):
    cfg = _cfg(model_dir, f"lm.pairs={pairs}", *overrides)
    table, _ = load_pairs(pairs, load_model_and_tokenizer(model_dir)[1], cfg.lm)
    return cls(cfg, None, LearnerContext(0, 1, datasets={PAIRS: FrameShard(table)}))


@pytest.mark.parametrize(
    ("cls", "algo", "key"),
    [(SimPOLearner, "simpo", "loss/simpo"), (ORPOLearner, "orpo", "loss/orpo")],
)
def test_reference_free_learners_hold_one_model_and_learn_the_preferences(
    model_dir: Path, pairs_file: Path, cls, algo: str, key: str
) -> None:
    torch.manual_seed(0)
    extra = ["orpo.lambda_or=1.0"] if algo == "orpo" else []
    learner = _pair_learner(
        cls,
        model_dir,
        pairs_file,
        f"algo={algo}",
        f"{algo}.optim.lr=3e-3",
        f"{algo}.batch_size=8",
        f"{algo}.micro_batch_size=4",
        *extra,
    )
    assert learner.core.reference is None  # reference-free: nothing kept or precomputed
    first = learner.update(learner.next_batch(0), progress=0.0)
    for step in range(1, 15):
        last = learner.update(learner.next_batch(step), progress=0.5)
    assert np.isfinite(last[key]) and first["optim/grad_accum_steps"] == 2
    assert last[key] < first[key] and last["rewards/margins"] > first["rewards/margins"]
    assert last["rewards/accuracies"] > 0.5


def test_unpaired_files_are_validated_with_the_line_named(model_dir: Path, tmp_path: Path) -> None:
    tok = load_model_and_tokenizer(model_dir)[1]
    lm = _cfg(model_dir).lm
    cases = [
        ({"prompt": "1+1=", "completion": "2"}, "missing field"),
        ({"prompt": "1+1=", "completion": "2", "label": "yes"}, "'label' must be true or false"),
        ({"prompt": "1+1=", "completion": " ", "label": True}, "empty 'completion'"),
    ]
    for row, text in cases:
        path = tmp_path / "bad.jsonl"
        path.write_text(
            json.dumps({"prompt": "2+2=", "completion": "4", "label": True})
            + "\n"
            + json.dumps(row)
            + "\n"
        )
        with pytest.raises(PromptDataError, match=text) as err:
            load_labelled(path, tok, lm, "kto.data", "label")
        assert "bad.jsonl:2" in str(err.value) and "kto.data" in str(err.value)
    # an ILQL set may hold a model's immediate EOS: one EOS token, a trajectory like any other
    path.write_text(json.dumps({"prompt": "1+1=", "completion": "", "reward": 0.0}) + "\n")
    table, _ = load_labelled(path, tok, lm, "ilql.data", "reward")
    assert list(table["completion_ids"][0]) == [tok.eos_token_id]
    path.write_text(
        json.dumps({"prompt": "1+1=", "completion": "2", "reward": float("nan")}) + "\n"
    )
    with pytest.raises(PromptDataError, match="finite number"):
        load_labelled(path, tok, lm, "ilql.data", "reward")


def test_kto_mismatched_pairs_rotate_the_completions(model_dir: Path, kto_file: Path) -> None:
    tok = load_model_and_tokenizer(model_dir)[1]
    table, stats = load_labelled(kto_file, tok, _cfg(model_dir).lm, "kto.data", "label")
    assert stats.kept == 64 and table["value"].tolist()[:2] == [1.0, 0.0]
    t = labelled_tensors(table.iloc[:3], int(tok.pad_token_id), torch.device("cpu"), mismatch=True)
    torch.testing.assert_close(t["rejected_ids"][1], t["chosen_ids"][0])
    torch.testing.assert_close(t["rejected_ids"][0], t["chosen_ids"][2])


def _kto(model_dir: Path, kto_file: Path, *overrides: str) -> KTOLearner:
    cfg = _cfg(model_dir, "algo=kto", f"kto.data={kto_file}", *overrides)
    table, _ = load_labelled(
        kto_file, load_model_and_tokenizer(model_dir)[1], cfg.lm, "kto.data", "label"
    )
    return KTOLearner(cfg, None, LearnerContext(0, 1, datasets={LABELLED: FrameShard(table)}))


def test_kto_learner_starts_at_z0_zero_and_separates_the_labels(
    model_dir: Path, kto_file: Path
) -> None:
    torch.manual_seed(0)
    learner = _kto(
        model_dir, kto_file, "kto.optim.lr=3e-3", "kto.batch_size=16", "kto.micro_batch_size=8"
    )
    first = learner.update(learner.next_batch(0), progress=0.0)
    assert first["kl"] == 0.0 and first["loss/kto"] == pytest.approx(0.5, abs=1e-5)  # 1 - sigma(0)
    for step in range(1, 15):
        last = learner.update(learner.next_batch(step), progress=0.5)
    assert last["loss/kto"] < first["loss/kto"] and last["rewards/margins"] > 0
    assert last["rewards/chosen"] > 0 > last["rewards/rejected"]


def test_kto_config_is_checked_before_ray(model_dir: Path, kto_file: Path) -> None:
    with pytest.raises(ConfigError, match="kto.data"):
        KTOLearner.probe(_cfg(model_dir, "algo=kto", "lm.eval_prompts=null"))
    with pytest.raises(ConfigError, match="batch_size"):
        build_config(overrides=["algo=kto", "kto.batch_size=1"])
    probe = KTOLearner.probe(
        _cfg(model_dir, "algo=kto", f"kto.data={kto_file}", "kto.batch_size=16")
    )
    assert probe.cfg.total_iterations == 4 and probe.info["data/kept"] == 64


def test_kto_rows_from_pairs_and_from_sampled_rewards(tmp_path: Path, capsys) -> None:
    from rlft_ray.apps.make_prefs import unpaired_rows
    from rlft_ray.cli import main

    pairs = [
        {"prompt": "1+2=", "chosen": "3", "rejected": "4"},
        {"prompt": "1+2=", "chosen": "3", "rejected": "5"},
        {"prompt": "2+2=", "chosen": "4", "rejected": "3"},
    ]
    assert unpaired_rows(pairs) == [
        {"prompt": "1+2=", "completion": "3", "label": True},
        {"prompt": "1+2=", "completion": "4", "label": False},
        {"prompt": "1+2=", "completion": "5", "label": False},
        {"prompt": "2+2=", "completion": "4", "label": True},
        {"prompt": "2+2=", "completion": "3", "label": False},
    ]
    samples = tmp_path / "accepted.jsonl"
    rows = [("1+2=", "3", 1.0), ("1+2=", "4", 0.0), ("1+2=", " ", 0.0), ("2+2=", "4", 0.5)]
    samples.write_text(
        "".join(json.dumps({"prompt": p, "completion": c, "reward": r}) + "\n" for p, c, r in rows)
    )
    out = tmp_path / "kto.jsonl"
    assert main(["label-samples", str(samples), str(out), "--threshold", "0.5"]) == 0
    written = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["label"] for r in written] == [True, False, True]
    assert "wrote 3 rows (2 desirable, reward >= 0.5)" in capsys.readouterr().out
    samples.write_text(json.dumps({"prompt": "1+2=", "completion": "3"}) + "\n")
    assert main(["label-samples", str(samples), str(out)]) != 0
    assert "accepted.jsonl:1: missing field(s) ['reward']" in capsys.readouterr().err


def test_kto_sft_term_is_the_desirable_completions_mean_token_nll(
    model_dir: Path, kto_file: Path
) -> None:
    from rlft_ray.learners.kto import completion_logps
    from rlft_ray.lm.pairs import rows_of

    learner = _kto(model_dir, kto_file, "kto.sft_coef=1.0", "kto.batch_size=8", "kto.shuffle=false")
    batch = learner.next_batch(0)
    t = labelled_tensors(batch.rows, int(learner.core.tokenizer.pad_token_id), torch.device("cpu"))
    with torch.no_grad():
        logps = completion_logps(learner.core.policy, rows_of(t, torch.arange(8)))
    nll = -logps / t["chosen_mask"].sum(-1) * (t["value"] > 0.5)
    metrics = learner.update(batch, progress=0.0)
    assert metrics["loss/sft"] == pytest.approx(float(nll.mean()), rel=1e-4)
