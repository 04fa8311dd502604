"""SimPO / ORPO / KTO and ILQL end to end on local embedded Ray (slow): the shipped
examples train from the CLI config path, evaluate held out on the generation actor, and
an ILQL checkpoint decodes value-guided from its saved heads in `rlft-ray eval`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlft_ray.config import build_config
from rlft_ray.run.driver import run_training
from rlft_ray.run.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES, DATA = ROOT / "examples", ROOT / "data"

pytestmark = [pytest.mark.usefixtures("local_ray"), pytest.mark.slow]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    rows = [json.loads(line) for line in (DATA / "arith_train.jsonl").read_text().splitlines()][:64]
    folder = tmp_path_factory.mktemp("data")
    out = {name: folder / f"{name}.jsonl" for name in ("pairs", "kto", "rewards")}
    with open(out["pairs"], "w") as p, open(out["kto"], "w") as k, open(out["rewards"], "w") as r:
        for row in rows:
            wrong = "?" * len(row["answer"])
            p.write(
                json.dumps({"prompt": row["prompt"], "chosen": row["answer"], "rejected": wrong})
                + "\n"
            )
            for completion, good in ((row["answer"], True), (wrong, False)):
                k.write(
                    json.dumps({"prompt": row["prompt"], "completion": completion, "label": good})
                    + "\n"
                )
                r.write(
                    json.dumps(
                        {"prompt": row["prompt"], "completion": completion, "reward": float(good)}
                    )
                    + "\n"
                )
    return out


def _common(model_dir: Path) -> list[str]:
    return [
        f"lm.model={model_dir}",
        f"lm.eval_prompts={DATA / 'arith_test.jsonl'}",
        "eval_every=4",
        "checkpoint_every=4",
    ]


@pytest.mark.parametrize(
    ("algo", "data_key", "loss"),
    [("simpo", "pairs", "loss/simpo"), ("orpo", "pairs", "loss/orpo"), ("kto", "kto", "loss/kto")],
)
def test_preference_examples_train_and_evaluate(
    model_dir: Path, files: dict[str, Path], tmp_path: Path, algo: str, data_key: str, loss: str
) -> None:
    data = f"lm.pairs={files['pairs']}" if data_key == "pairs" else f"kto.data={files['kto']}"
    cfg = build_config(
        EXAMPLES / f"arithmetic_{algo}.yaml",
        [
            *_common(model_dir),
            data,
            f"{algo}.batch_size=16",
            f"{algo}.micro_batch_size=8",
            f"{algo}.num_epochs=2",
        ],
    )
    summary = run_training(cfg, tmp_path / algo, progress=False)
    rows = read_metrics(tmp_path / algo)
    steps = 2 * (128 if algo == "kto" else 64) // 16  # 2 epochs; KTO: 2 rows per pair
    assert summary["error"] is None and summary["iterations"] == steps == len(rows)
    assert rows[-1][loss] < rows[0][loss]
    assert [r["counters/iteration"] for r in rows if "eval/accuracy" in r] == list(
        range(4, steps + 1, 4)
    )


def test_ilql_trains_and_decodes_value_guided_from_its_checkpoint(
    model_dir: Path, files: dict[str, Path], tmp_path: Path, capsys
) -> None:
    from rlft_ray.cli import main

    cfg = build_config(
        EXAMPLES / "arithmetic_ilql.yaml",
        [
            *_common(model_dir),
            f"ilql.data={files['rewards']}",
            "ilql.num_epochs=1",
            "ilql.batch_size=16",
            "ilql.micro_batch_size=8",
        ],
    )
    summary = run_training(cfg, tmp_path / "ilql", progress=False)
    rows = read_metrics(tmp_path / "ilql")
    assert summary["error"] is None and summary["iterations"] == 8 == len(rows)
    assert rows[-1]["loss/q"] < rows[0]["loss/q"]
    assert [r["counters/iteration"] for r in rows if "eval/accuracy" in r] == [4, 8]
    ckpt = Path(summary["checkpoint_last"])
    assert (ckpt / "policy" / "ilql_heads.safetensors").is_file()
    assert (ckpt / "ilql_heads.safetensors").is_file()
    assert main(["eval", str(ckpt), "lm.decode_beta=4", "--limit", "8"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_prompts"] == 8 and 0.0 <= result["accuracy"] <= 1.0
