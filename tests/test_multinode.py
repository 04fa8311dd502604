"""Several Ray nodes on one machine (``ray.cluster_utils.Cluster``): rollout actors and
learners placed by custom resources, and a run that loses its learner's node mid-run."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import ray

from rlft_ray.config import build_config
from rlft_ray.run.driver import run_training
from rlft_ray.run.metrics import read_metrics
from rlft_ray.run.resources import ResourceError, check_fits

CARTPOLE = Path(__file__).resolve().parents[1] / "examples" / "cartpole_ppo.yaml"


def test_custom_resources_are_checked_before_anything_starts() -> None:
    res = build_config(
        CARTPOLE,
        {
            "resources.rollout_actor_resources": {"rollout_node": 1},
            "resources.learner_resources": {"learner_node": 1},
        },
    ).resources
    check_fits(res, {"CPU": 4, "rollout_node": 2, "learner_node": 1})
    with pytest.raises(
        ResourceError, match="needs 2 of custom resource 'rollout_node'.*cluster has 1"
    ):
        check_fits(res, {"CPU": 4, "rollout_node": 1, "learner_node": 1})
    with pytest.raises(ResourceError, match="custom resource 'learner_node'.*cluster has 0"):
        check_fits(res, {"CPU": 4, "rollout_node": 2})


@pytest.mark.slow  # a simulated 3-node cluster that loses a node: 40 s of the default suite
def test_actors_and_learners_spread_over_nodes_and_a_lost_learner_node_recovers(
    tmp_path: Path,
) -> None:
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    if ray.is_initialized():
        ray.shutdown()
    # head (driver only), one rollout node, two learner nodes (one spare)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = {
        "rollout": cluster.add_node(num_cpus=1, resources={"rollout_node": 1}),
        "learner_a": cluster.add_node(num_cpus=1, resources={"learner_node": 1}),
        "learner_b": cluster.add_node(num_cpus=1, resources={"learner_node": 1}),
    }
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        deadline = time.monotonic() + 60
        while True:  # the state API needs the head's dashboard, which starts last
            try:
                list_actors()
                break
            except Exception:
                assert time.monotonic() < deadline, "state API did not come up"
                time.sleep(0.5)
        name_of = {node.node_id: name for name, node in nodes.items()}
        cfg = build_config(
            CARTPOLE,
            {
                "total_env_steps": 8192,
                "checkpoint_every": 4,
                "report_interval_s": 0.0,
                "resources.num_rollout_actors": 1,
                "resources.cpus_per_rollout_actor": 0.5,
                "resources.cpus_per_learner": 0.5,
                "resources.rollout_actor_resources": {"rollout_node": 1},
                "resources.learner_resources": {"learner_node": 1},
                "resources.max_failures": 1,  # Ray Train restarts the worker group once
            },
        )
        out = tmp_path / "run"
        outcome: dict = {}

        def train() -> None:
            try:
                outcome["summary"] = run_training(cfg, out, progress=False)
            except BaseException as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=train, daemon=True)
        thread.start()
        placed: dict[str, set[str]] = {}
        deadline = time.monotonic() + 120
        while not (out / "checkpoint_last").exists():  # first checkpoint: iteration 4
            assert thread.is_alive() and time.monotonic() < deadline, outcome
            try:
                alive = list_actors(filters=[("state", "=", "ALIVE")])
            except Exception:  # the dashboard (state API) may still be starting
                alive = []
            for actor in alive:
                placed.setdefault(actor.class_name, set()).add(name_of.get(actor.node_id, "head"))
            time.sleep(0.3)
        assert placed["EnvRunner"] == {"rollout"}
        (learner_node,) = placed["RayTrainWorker"]
        assert learner_node in ("learner_a", "learner_b")

        cluster.remove_node(nodes[learner_node], allow_graceful=False)  # lose the learner's node
        thread.join(timeout=180)
        assert not thread.is_alive(), "run hung after losing a node"
        assert "error" not in outcome, outcome.get("error")
        summary = outcome["summary"]
        assert summary["env_steps"] == 8192 and summary["error"] is None
        # The worker group came back on the spare node from the last checkpoint; the
        # iterations it ran again replace their earlier rows, so metrics.jsonl stays one
        # row per iteration from 1 to the end.
        iterations = [int(r["counters/iteration"]) for r in read_metrics(out)]
        assert iterations == list(range(1, 33)), iterations
    finally:
        ray.shutdown()
        cluster.shutdown()
