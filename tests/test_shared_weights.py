"""Weights through shared memory (a local run's publish path): round trips, slot reuse,
torn reads detected, fallbacks to the object store, no file left behind."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlft_ray.config import build_config
from rlft_ray.learners.base import LearnerContext, Spaces
from rlft_ray.learners.registry import get_learner_cls
from rlft_ray.rollout.env_runner import EnvRunner, probe_spaces
from rlft_ray.rollout.generation import GenerationActor
from rlft_ray.rollout.shared_weights import (
    PREFIX,
    SLOTS,
    SharedSlot,
    SharedWeights,
    StaleWeightsError,
    received_weights,
)

pytestmark = pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs /dev/shm")


def _weights(shift: float = 0.0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(3, 5, generator=gen) + shift,
        "half": (torch.randn(7, generator=gen) + shift).to(torch.bfloat16),
        "steps": torch.arange(4) + int(shift),
        "empty": torch.zeros(0),
    }


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a
    )


def test_a_slot_round_trips_every_dtype_through_a_pickled_reference(tmp_path: Path) -> None:
    shared = SharedWeights(tmp_path)
    slot = shared.write(_weights(), version=1)
    assert isinstance(slot, SharedSlot) and len(pickle.dumps(slot)) < 1000  # rides in the call
    # a tensor per 64-byte line (14 bytes of bf16 take one), header + 3 slots of 3 lines
    assert os.path.getsize(slot.path) == 64 + SLOTS * 3 * 64
    assert _equal(received_weights(pickle.loads(pickle.dumps(slot))), _weights())
    # a copy: the next write to that slot does not change what was read
    read = slot.read()
    shared.write(_weights(1.0), version=1 + SLOTS)
    assert _equal(read, _weights())
    shared.close()


def test_versions_rotate_over_the_slots_and_an_overwritten_slot_fails_to_read(
    tmp_path: Path,
) -> None:
    shared = SharedWeights(tmp_path)
    slots = [shared.write(_weights(float(v)), version=v) for v in range(SLOTS)]
    for v, slot in enumerate(slots):  # each version in its own slot
        assert _equal(slot.read(), _weights(float(v)))
    shared.write(_weights(9.0), version=SLOTS)  # reuses version 0's slot
    with pytest.raises(StaleWeightsError, match="holds version 3, not 0"):
        slots[0].read()
    assert _equal(slots[1].read(), _weights(1.0))
    shared.close()


def test_a_borrowed_slot_is_read_in_place_and_a_write_during_the_load_fails(
    tmp_path: Path,
) -> None:
    shared = SharedWeights(tmp_path)
    slot = shared.write(_weights(1.0), version=1)
    with slot.borrowed() as views:  # views into the file: no copy
        assert _equal(views, _weights(1.0))
        shared.write(_weights(2.0), version=1)  # the same version rewritten: still fine
        assert _equal(views, _weights(2.0))
    overwritten = "overwritten while version 1 was loaded"
    with pytest.raises(StaleWeightsError, match=overwritten), slot.borrowed():
        shared.write(_weights(1.0), version=1 + SLOTS)  # another version in its slot
    with pytest.raises(StaleWeightsError, match="holds version 4, not 1"), slot.borrowed():
        pass
    shared.close()


def test_a_synchronous_run_keeps_one_copy_and_a_copy_overwritten_midway_is_caught(
    tmp_path: Path,
) -> None:
    shared = SharedWeights(tmp_path, slots=1)
    first = shared.write(_weights(), version=1)
    assert os.path.getsize(first.path) == 64 + 1 * 3 * 64  # one slot: one copy of the model
    with first.borrowed() as views:  # nothing written meanwhile: the load is whole
        assert _equal({k: v.clone() for k, v in views.items()}, _weights())
    overwritten = "overwritten while version 1 was loaded"
    with pytest.raises(StaleWeightsError, match=overwritten), first.borrowed():
        shared.write(_weights(1.0), version=2)  # the next version lands in the same slot
    assert _equal(shared.write(_weights(2.0), version=3).read(), _weights(2.0))
    shared.close()


def test_close_removes_the_file_and_a_dead_learners_file_is_cleaned_up(tmp_path: Path) -> None:
    shared = SharedWeights(tmp_path)
    path = Path(shared.write(_weights(), 0).path)
    shared.close()
    assert not path.exists() and shared.path is None
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    orphan = tmp_path / f"{PREFIX}{dead}_deadbeef"
    orphan.write_bytes(b"x")
    mine = tmp_path / f"{PREFIX}{os.getpid()}_cafecafe"  # a live process's: kept
    mine.write_bytes(b"x")
    SharedWeights(tmp_path).write(_weights(), 0)
    assert not orphan.exists() and mine.exists()


def test_weights_that_do_not_fit_are_not_shared(tmp_path: Path) -> None:
    assert SharedWeights(tmp_path, max_bytes=512).write(_weights(), 0) is None  # needs 640
    assert SharedWeights(tmp_path / "missing").write(_weights(), 0) is None
    assert list(tmp_path.iterdir()) == []  # nothing half-made


def test_runners_and_generation_actors_load_a_shared_slot(tmp_path: Path, model_dir: Path) -> None:
    cfg = build_config(None, ["seed=2"])
    cls = get_learner_cls(cfg.algo)
    learner = cls(cfg, Spaces(*probe_spaces(cfg.env)), LearnerContext())
    with torch.no_grad():
        for p in learner.policy.parameters():
            p.add_(1.0)
    runner = EnvRunner(**cls.sampler_kwargs(cfg, 0))
    shared = SharedWeights(tmp_path)
    assert runner.set_weights(shared.write(learner.policy_state(), 4), 4) == 4
    assert _equal(runner.policy.state_dict(), learner.policy.state_dict())

    lm = build_config(None, ["algo=grpo", f"lm.model={model_dir}"]).lm
    actor, other = GenerationActor(lm, seed=0), GenerationActor(lm, seed=1)
    state = {k: v + 0.5 for k, v in actor.model.state_dict().items()}
    assert actor.set_weights(SharedWeights(tmp_path).write(state, 2), 2) == 2
    other.set_weights(state, 2)  # the object store's path: the same weights
    assert _equal(actor.model.state_dict(), other.model.state_dict())
    with pytest.raises(KeyError, match="missing"):
        actor.set_weights(SharedWeights(tmp_path).write({"x": torch.zeros(2)}, 3), 3)


def test_the_learner_writes_without_mapping_the_file(tmp_path: Path) -> None:
    shared = SharedWeights(tmp_path, slots=1)
    path = shared.write(_weights(), version=1).path
    # the weights' pages count in the readers' memory only, not also in the learner's
    assert path not in Path("/proc/self/maps").read_text()
    assert _equal(SharedSlot(path, shared.layout, shared.slot_bytes, 1, 1).read(), _weights())
    shared.close()


def test_a_one_slot_file_is_the_generation_actors_weights(tmp_path: Path, model_dir: Path) -> None:
    lm = build_config(None, ["algo=grpo", f"lm.model={model_dir}"]).lm
    actor = GenerationActor(lm, seed=0)
    state = {k: v + 0.5 for k, v in actor.model.state_dict().items()}
    synchronous = SharedWeights(tmp_path, slots=1)
    slot = synchronous.write(state, 1)
    assert actor.set_weights(slot, 1) == 1
    assert _equal(actor.model.state_dict(), state)
    with slot.borrowed() as views:  # not a copy: the parameters are the file's pages
        name = next(iter(views))
        assert actor.model.state_dict()[name].data_ptr() == views[name].data_ptr()
    # the next synchronous publish is what the actor holds, tied head included
    newer = {k: v + 1.0 for k, v in state.items()}
    assert actor.set_weights(synchronous.write(newer, 2), 2) == 2
    assert _equal(actor.model.state_dict(), newer)
    head = actor.model.get_output_embeddings().weight
    assert torch.equal(head, actor.model.get_input_embeddings().weight)
    # overlapped sampling's slots are copied: the learner writes while actors sample
    overlapped = SharedWeights(tmp_path, slots=SLOTS)
    assert actor.set_weights(overlapped.write(state, 3), 3) == 3
    assert _equal(actor.model.state_dict(), state)
    with overlapped.write(state, 3).borrowed() as views:
        assert actor.model.state_dict()[name].data_ptr() != views[name].data_ptr()
    # ... into storage of the actor's own: the one-slot file still holds what was published
    assert _equal(SharedSlot(slot.path, slot.layout, slot.slot_bytes, 2, 1).read(), newer)
    synchronous.close()
    overlapped.close()
