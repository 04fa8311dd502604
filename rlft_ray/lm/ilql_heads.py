"""ILQL's heads on a causal LM and value-guided decoding (Snell et al. 2022).

:class:`ILQLHeads` holds twin Q heads (``[H] -> [V]``), their Polyak-averaged targets
and a V head (``[H] -> 1``), two-layer MLPs on the LM's last hidden state as in trlX.
They are saved as ``ilql_heads.safetensors`` (sizes in its metadata: no pickle) next to
the LM's ``save_pretrained`` files, where :func:`load_heads` finds them.
:func:`ilql_generate` decodes token by token with the KV cache from
``log_softmax(logits) + beta (min(Q-hat1, Q-hat2) - V)``
(:func:`~rlft_ray.algorithms.ilql.value_guided_logits`), the same hidden states the
learner trains the heads on.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from rlft_ray.algorithms import polyak_update, value_guided_logits
from rlft_ray.core.fileio import atomic_write
from rlft_ray.lm.policy import backbone_and_head, cache_kwarg, output_cache, position_ids

#: File name of the heads inside a model directory (a checkpoint's ``policy/``).
HEADS_FILE = "ilql_heads.safetensors"
#: Prefix of the heads' tensors among published weights (the generation actors split them off).
HEADS_PREFIX = "ilql_heads."


def _mlp(hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, out))


class ILQLHeads(nn.Module):
    """Twin Q heads, their targets and V on ``[*, H]`` hidden states.

    Args:
        hidden_size: H, the LM's hidden size. vocab_size: V, the LM head's outputs.
    """

    def __init__(self, hidden_size: int, vocab_size: int) -> None:
        super().__init__()
        self.hidden_size, self.vocab_size = hidden_size, vocab_size
        self.q1, self.q2 = _mlp(hidden_size, vocab_size), _mlp(hidden_size, vocab_size)
        self.v = _mlp(hidden_size, 1)
        self.target_q1 = copy.deepcopy(self.q1).requires_grad_(False)
        self.target_q2 = copy.deepcopy(self.q2).requires_grad_(False)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(Q1 [*, V], Q2 [*, V], V [*])`` of hidden states ``[*, H]`` (float32)."""
        h = hidden.float()
        return self.q1(h), self.q2(h), self.v(h).squeeze(-1)

    @torch.no_grad()
    def target_q(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[*, V]`` min(Q-hat1, Q-hat2), the targets' conservative Q."""
        h = hidden.float()
        return torch.minimum(self.target_q1(h), self.target_q2(h))

    def sync_targets(self, rate: float) -> None:
        """Q-hat <- rate Q + (1 - rate) Q-hat (Polyak averaging)."""
        polyak_update(self.target_q1, self.q1, rate)
        polyak_update(self.target_q2, self.q2, rate)


def save_heads(heads: ILQLHeads, directory: str | Path) -> Path:
    """Write ``heads`` to ``directory/ilql_heads.safetensors`` atomically; returns the path."""
    path = Path(directory) / HEADS_FILE
    tensors = {k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}
    meta = {"hidden_size": str(heads.hidden_size), "vocab_size": str(heads.vocab_size)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return path


def load_heads(directory: str | Path, device: torch.device | str = "cpu") -> ILQLHeads:
    """The heads saved in ``directory`` (sizes from the file's metadata).

    Raises:
        FileNotFoundError: ``directory`` holds no ``ilql_heads.safetensors``.
    """
    path = Path(directory) / HEADS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: lm.decode=ilql needs the heads of an ILQL run "
            "(its checkpoint's policy/ directory holds them)"
        )
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    heads = ILQLHeads(int(meta["hidden_size"]), int(meta["vocab_size"]))
    heads.load_state_dict(state)
    return heads.to(device).eval()


@torch.no_grad()
def ilql_generate(
    model: nn.Module,
    heads: ILQLHeads,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int,
    eos_ids: list[int],
    pad_id: int,
    beta: float,
    temperature: float = 1.0,
    greedy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Value-guided decoding: sample (or argmax) from ``log_softmax(logits) + beta (Q-hat - V)``.

    Args:
        model: A causal LM. heads: Its ILQL heads.
        prompt_ids: ``[N, P]`` left-padded prompts. prompt_mask: ``[N, P]``.
        max_new_tokens: Longest completion. eos_ids: Tokens that end one. pad_id: Written
            after a row ends.
        beta: Value guidance. temperature: Divides the guided logits when sampling.
        greedy: Argmax instead of sampling.

    Returns:
        ``(tokens [N, T], logprobs [N, T])``: T <= ``max_new_tokens`` (all rows ended);
        the log-probs are of the guided, temperature-scaled distribution (0 when greedy
        and after a row's EOS).
    """
    backbone, head = backbone_and_head(model)
    mask = prompt_mask.long()
    out = backbone(
        input_ids=prompt_ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=True
    )
    eos = torch.as_tensor(eos_ids, device=prompt_ids.device)
    done = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)
    tokens, logps = [], []
    for _ in range(max_new_tokens):
        hidden = out.last_hidden_state[:, -1]
        _, _, v = heads(hidden)
        guided = value_guided_logits(head(hidden), heads.target_q(hidden), v, beta)
        if greedy:
            tok, lp = guided.argmax(-1), torch.zeros(len(done), device=guided.device)
        else:
            log_p = torch.log_softmax(guided / temperature, -1)
            tok = torch.multinomial(log_p.exp(), 1).squeeze(-1)
            lp = log_p.gather(-1, tok[:, None]).squeeze(-1)
        tok = tok.masked_fill(done, pad_id)
        tokens.append(tok)
        logps.append(lp.masked_fill(done, 0.0))
        done = done | torch.isin(tok, eos)
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        out = backbone(
            input_ids=tok[:, None],
            attention_mask=mask,
            position_ids=mask.sum(-1, keepdim=True) - 1,
            **{cache_kwarg(backbone): output_cache(out)},
            use_cache=True,
        )
    if not tokens:
        empty = prompt_ids.new_zeros((prompt_ids.shape[0], 0))
        return empty, empty.float()
    return torch.stack(tokens, 1), torch.stack(logps, 1).float()
