"""RLlib (new API stack) RLModule checkpoints in and out of our gym networks.

RLlib's default MLP modules are plain stacks of ``Linear`` + activation, as ours
(:mod:`rlft_ray.learners.nets`) are, so their weights map one to one:

* PPO / APPO / IMPALA (``DefaultPPOTorchRLModule``): ``encoder.actor_encoder`` + ``pi``
  -> :class:`~rlft_ray.learners.nets.ActorCritic` ``actor``; ``encoder.critic_encoder`` +
  ``vf`` -> ``critic``; ``pi.log_std`` (``free_log_std``) -> ``log_std`` for Box actions.
* DQN (``DefaultDQNTorchRLModule``): ``encoder`` + ``af`` -> :class:`~.nets.QNetwork`
  ``q``. A dueling head folds exactly into the last layer: with ``h`` the encoder's
  output, ``Q = V(h) + A(h) - mean_a A(h)`` is linear in ``h``, so
  ``W_q = W_a + w_v - mean_rows(W_a)`` and ``b_q = b_a + b_v - mean(b_a)``.
* SAC with Discrete actions: ``pi_encoder`` + ``pi`` -> ``actor`` (the critic keeps its
  fresh initialisation: a Q-function is not a state value).

What does not map (another activation than tanh, shared value layers, extra head
layers, a state-dependent std, a distributional or noisy DQN) fails naming the setting.

Reading is data only: the pickled files of an RLlib checkpoint are read with
:class:`DataUnpickler`, which rebuilds numpy arrays and plain containers and turns every
other class or function the file names into an inert stand-in, so no code from the
file runs. RLlib itself is needed only to write (:func:`export_rllib_module`).
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rlft_ray.core.errors import CheckpointError

#: The globals :class:`DataUnpickler` resolves for real: numpy arrays and ordered dicts.
SAFE_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    (mod, name)
    for core in ("numpy.core", "numpy._core")
    for mod, name in (
        (f"{core}.multiarray", "_reconstruct"),
        (f"{core}.multiarray", "scalar"),
        (f"{core}.numeric", "_frombuffer"),
    )
) | {("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict")}

#: Where a checkpoint keeps its single-agent module, relative to the path given: an
#: RLModule directory, a MultiRLModule's, an Algorithm's, an ``algo: rllib`` run's.
MODULE_DIRS: tuple[str, ...] = (
    "",
    "default_policy",
    "learner_group/learner/rl_module/default_policy",
    "rllib/learner_group/learner/rl_module/default_policy",
)


class Stub:
    """What :class:`DataUnpickler` makes of a class or function it does not trust: it keeps
    the arguments and state it is given and runs nothing."""

    qualname = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class DataUnpickler(pickle.Unpickler):
    """A pickle reader that runs no code from the file: :data:`SAFE_GLOBALS` resolve,
    any other global becomes a :class:`Stub` subclass named after it."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in SAFE_GLOBALS:
            return super().find_class(module, name)
        return type(name, (Stub,), {"qualname": f"{module}.{name}"})


def read_pickle_data(path: Path) -> Any:
    """The data in a pickle file (see :class:`DataUnpickler`)."""
    with open(path, "rb") as f:
        return DataUnpickler(f).load()


def module_dir(path: str | Path) -> Path | None:
    """The single-agent RLModule directory inside ``path`` (None: not an RLlib checkpoint)."""
    for rel in MODULE_DIRS:
        d = Path(path) / rel
        if (d / "module_state.pkl").is_file() and (d / "class_and_ctor_args.pkl").is_file():
            return d
    return None


def is_rllib_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is (or holds) an RLlib checkpoint of a single-agent RLModule."""
    return module_dir(path) is not None


def read_rllib_module(path: str | Path) -> tuple[str, dict[str, Any], dict[str, np.ndarray]]:
    """The module class name, its ``model_config`` and its weights (``name -> [out, in]``).

    Raises:
        CheckpointError: ``path`` holds no single-agent RLModule (a multi-agent one
            names its module ids).
    """
    d = module_dir(path)
    if d is None:
        ids = sorted(p.name for p in Path(path).glob("**/rl_module/*") if p.is_dir())
        hint = f" (multi-agent modules {ids}: not a single-agent policy)" if ids else ""
        raise CheckpointError(f"{path} holds no RLlib RLModule checkpoint{hint}")
    state = read_pickle_data(d / "module_state.pkl")
    ctor = read_pickle_data(d / "class_and_ctor_args.pkl")
    cls = ctor.get("class") if isinstance(ctor, dict) else None
    name = getattr(cls, "qualname", "") or getattr(cls, "__name__", "")
    kwargs = (ctor.get("ctor_args_and_kwargs") or ((), {}))[1] if isinstance(ctor, dict) else {}
    model_config = kwargs.get("model_config") or {}
    if isinstance(model_config, Stub):  # a DefaultModelConfig dataclass: its fields
        model_config = dict(model_config.state or {})
    weights = {k: np.asarray(v) for k, v in dict(state).items() if isinstance(v, np.ndarray)}
    return name.rsplit(".", 1)[-1], dict(model_config), weights


def _layers(weights: dict[str, np.ndarray], prefix: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """The ``(weight, bias)`` pairs of the MLP under ``prefix`` (``{prefix}.net.mlp.{i}``)."""
    pattern = re.compile(rf"^{re.escape(prefix)}\.net\.mlp\.(\d+)\.weight$")
    idx = sorted(int(m.group(1)) for k in weights if (m := pattern.match(k)))
    return [
        (weights[f"{prefix}.net.mlp.{i}.weight"], weights[f"{prefix}.net.mlp.{i}.bias"])
        for i in idx
    ]


def _check_model_config(model_config: dict[str, Any], where: str) -> None:
    """Refuse the settings our tanh MLPs cannot reproduce, naming them."""
    problems = []
    act = model_config.get("fcnet_activation", "tanh")
    if act != "tanh":
        problems.append(f"fcnet_activation={act!r} (our networks use tanh)")
    if model_config.get("head_fcnet_hiddens"):
        problems.append(
            f"head_fcnet_hiddens={list(model_config['head_fcnet_hiddens'])} (our heads are one linear layer)"
        )
    if model_config.get("vf_share_layers"):
        problems.append("vf_share_layers=True (our critic has its own MLP)")
    if problems:
        raise CheckpointError(f"{where}: does not map onto our network: " + "; ".join(problems))


def _sequential(layers: list[tuple[np.ndarray, np.ndarray]], name: str) -> dict[str, torch.Tensor]:
    """``{name}.{2i}.weight/bias`` of a ``Linear, Tanh, Linear, ...`` ``nn.Sequential``."""
    out = {}
    for i, (w, b) in enumerate(layers):
        out[f"{name}.{2 * i}.weight"] = torch.as_tensor(np.array(w, dtype=np.float32))
        out[f"{name}.{2 * i}.bias"] = torch.as_tensor(np.array(b, dtype=np.float32))
    return out


def dueling_fold(
    af: tuple[np.ndarray, np.ndarray], vf: tuple[np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """One linear layer equal to a dueling head: ``Q = V + A - mean_a A`` (Wang et al. 2016).

    Args:
        af: Advantage head ``W_a [A, H]``, ``b_a [A]``.
        vf: Value head ``w_v [1, H]``, ``b_v [1]``.

    Returns:
        ``W_q [A, H] = W_a + w_v - mean_rows(W_a)``, ``b_q [A] = b_a + b_v - mean(b_a)``.
    """
    (w_a, b_a), (w_v, b_v) = af, vf
    return w_a + w_v - w_a.mean(0, keepdims=True), b_a + b_v - b_a.mean()


def rllib_state_for(policy: nn.Module, path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of ``policy`` (our ActorCritic or QNetwork) from the RLlib module at
    ``path``; every tensor of ``policy`` is set (SAC: the critic keeps ``policy``'s own).

    Raises:
        CheckpointError: Naming the setting or the layer shapes that do not map.
    """
    from rlft_ray.learners.nets import ActorCritic, QNetwork

    cls_name, model_config, w = read_rllib_module(path)
    where = f"init_from {path} (RLlib {cls_name or 'RLModule'})"
    _check_model_config(model_config, where)
    own = policy.state_dict()
    if isinstance(policy, QNetwork):
        if "af.net.mlp.0.weight" not in w:
            raise CheckpointError(f"{where}: not a DQN module; algo: dqn starts from an RLlib DQN")
        if int(model_config.get("num_atoms", 1)) > 1 or any(
            "noisy" in k or "sigma" in k for k in w
        ):
            raise CheckpointError(
                f"{where}: a distributional or noisy DQN does not map onto a Q-network"
            )
        head = _layers(w, "af")
        if "vf.net.mlp.0.weight" in w:  # dueling: fold V and the mean advantage into Q
            head = [dueling_fold(head[-1], _layers(w, "vf")[-1])]
        state = _sequential(_layers(w, "encoder") + head, "q")
        state["epsilon"] = own["epsilon"]
    elif isinstance(policy, ActorCritic):
        if "encoder.actor_encoder.net.mlp.0.weight" in w:
            if "encoder.critic_encoder.net.mlp.0.weight" not in w:
                raise CheckpointError(f"{where}: no critic encoder (vf_share_layers=True?) to map")
            state = _sequential(_layers(w, "encoder.actor_encoder") + _layers(w, "pi"), "actor")
            state |= _sequential(_layers(w, "encoder.critic_encoder") + _layers(w, "vf"), "critic")
            if "log_std" in own:
                if "pi.log_std" not in w:
                    raise CheckpointError(
                        f"{where}: its Box-action std depends on the state (free_log_std=False); "
                        "our actor-critic has a state-independent log_std (train with free_log_std=True)"
                    )
                state["log_std"] = torch.as_tensor(np.array(w["pi.log_std"], dtype=np.float32))
        elif "pi_encoder.net.mlp.0.weight" in w:
            if "log_std" in own:
                raise CheckpointError(
                    f"{where}: SAC's tanh-squashed Gaussian with a state-dependent std does not map "
                    "onto our actor-critic; fine-tune it with algo: rllib (rllib.algorithm: SAC)"
                )
            state = _sequential(_layers(w, "pi_encoder") + _layers(w, "pi"), "actor")
            state |= {k: v for k, v in own.items() if k.startswith("critic.")}
        else:
            raise CheckpointError(
                f"{where}: not a PPO/APPO/IMPALA or SAC module (keys {sorted(w)[:4]})"
            )
    else:
        raise CheckpointError(f"{where}: this run's {type(policy).__name__} takes no RLlib weights")
    _check_shapes(state, own, where)
    return state


def _check_shapes(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], where: str) -> None:
    hidden = [tuple(v.shape) for k, v in state.items() if k.endswith(".weight")]
    problems = [
        f"{k} {tuple(state[k].shape) if k in state else 'missing'} there, {tuple(v.shape)} here"
        for k, v in own.items()
        if k not in state or tuple(state[k].shape) != tuple(v.shape)
    ]
    if problems:
        raise CheckpointError(
            f"{where}: layer shapes do not fit this run's network (RLlib fcnet_hiddens vs "
            f"hidden_sizes?): {problems[:3]}; its layers are {hidden}"
        )


def load_rllib_into(policy: nn.Module, path: str | Path) -> None:
    """Load the RLlib module at ``path`` into ``policy`` (see :func:`rllib_state_for`)."""
    policy.load_state_dict(rllib_state_for(policy, path))


def export_rllib_module(policy: nn.Module, obs_space: Any, action_space: Any, out: Path) -> str:
    """Write ``policy`` as an RLlib RLModule checkpoint in ``out`` (needs RLlib); returns
    the module class name. ``RLModule.from_checkpoint(out)`` loads it and acts as ``policy``.

    ActorCritic -> ``DefaultPPOTorchRLModule`` (``free_log_std`` for Box actions);
    QNetwork -> ``DefaultDQNTorchRLModule`` (no dueling head).
    """
    from rlft_ray.learners.nets import ActorCritic, QNetwork

    hidden = [m.out_features for m in policy.modules() if isinstance(m, nn.Linear)]
    if isinstance(policy, ActorCritic):
        from ray.rllib.algorithms.ppo import PPOConfig as Config

        hidden = hidden[: len(hidden) // 2 - 1]
        extra = {"vf_share_layers": False, "free_log_std": not policy.discrete}
    elif isinstance(policy, QNetwork):
        from ray.rllib.algorithms.dqn import DQNConfig as Config

        hidden = hidden[:-1]
        extra = {"dueling": False, "num_atoms": 1, "epsilon": [(0, float(policy.epsilon))]}
    else:
        raise CheckpointError(f"{type(policy).__name__} has no RLlib counterpart")
    spec = Config().get_default_rl_module_spec()
    spec.observation_space, spec.action_space = obs_space, action_space
    spec.model_config = {
        **Config().model_config,
        "fcnet_hiddens": hidden,
        "fcnet_activation": "tanh",
        "head_fcnet_hiddens": [],
        **extra,
    }
    module = spec.build()
    state = module.state_dict()
    mapped = rllib_keys(policy)
    missing = sorted(set(mapped) - set(state))
    if missing:  # pragma: no cover - RLlib renamed its layers
        raise CheckpointError(f"RLlib's {type(module).__name__} has no {missing[:3]}")
    state.update({k: v.reshape(state[k].shape) for k, v in mapped.items()})
    module.load_state_dict(state)
    module.save_to_path(str(out))
    return type(module).__name__


def rllib_keys(policy: nn.Module) -> dict[str, torch.Tensor]:
    """Our ``policy``'s weights under RLlib's default module's names (export direction)."""
    from rlft_ray.learners.nets import ActorCritic

    own = {k: v.detach().clone() for k, v in policy.state_dict().items()}

    def mlp(src: str, encoder: str, head: str) -> dict[str, torch.Tensor]:
        idx = sorted({int(k.split(".")[1]) for k in own if k.startswith(src + ".")})
        out = {}
        for j, i in enumerate(idx):
            dest = head if j == len(idx) - 1 else encoder
            n = 0 if j == len(idx) - 1 else 2 * j
            for part in ("weight", "bias"):
                out[f"{dest}.net.mlp.{n}.{part}"] = own[f"{src}.{i}.{part}"]
        return out

    if isinstance(policy, ActorCritic):
        out = mlp("actor", "encoder.actor_encoder", "pi") | mlp(
            "critic", "encoder.critic_encoder", "vf"
        )
        if "log_std" in own:
            out["pi.log_std"] = own["log_std"]
        return out
    return mlp("q", "encoder", "af")
