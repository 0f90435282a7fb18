"""The student sharded over a learner group with FSDP2 (`resources.learner_workers` > 1).

Each rank is one process of a `torch.distributed` group: gloo on CPU, NCCL on CUDA. What the
student is made of, and who holds it:

- every decoder layer is its own FSDP2 unit (`fully_shard`), gathered for its forward and
  backward, then freed;
- the root unit is `Whole`, which holds the rest: the embeddings, the final norm and the
  (usually tied) LM head. Its forward runs a closure on the Hugging Face model, so that the
  learner's chunked LM head (`opd.learner.forward`), which runs outside the decoder, still
  sees the gathered head; it stays gathered until the backward's reduce-scatter;
- gradients are reduce-scattered as sums, not means: every loss term is already normalised
  by the whole batch's count, so N ranks take the update one rank takes;
- each rank keeps 1/N of the fp32 master weights, gradients and AdamW moments (dim-0 shards);
- the divergence anchor, a frozen copy of the starting student, is sharded the same way;
- with `student.dtype=bfloat16` (CPU or CUDA) the gathered weights are bf16 for compute,
  the master weights fp32 and the gradient reduction fp32.

The collective helpers here (`full_tensor`, `clip_global_norm`, `agree`) work unsharded too,
so the learner's code is the same for N = 1 and N > 1.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Callable, Iterable, Optional

import torch


class Whole(torch.nn.Module):
    """A module whose forward runs `fn(model)`: the FSDP2 root of a sharded student (and,
    unsharded, a plain pass-through), so that everything the step computes from the root's
    parameters happens while they are gathered."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[[torch.nn.Module], Any]) -> Any:
        return fn(self.model)


def init_group(rank: int, world: int, init_method: str, timeout_s: float, device: str) -> None:
    """Join the learner group's process group at `init_method` (`rendezvous`). A collective
    that a peer never joins fails after `timeout_s` instead of hanging. On one machine (a
    file rendezvous) gloo's sockets stay on loopback."""
    import torch.distributed as dist

    if init_method.startswith("file://"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(0)  # each rank's actor sees its own GPU
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def rendezvous(local: bool) -> str:
    """Where the ranks meet, as rank 0 sees it. `local` (the Ray that opd started on this
    machine): a file in a new temporary directory, so that nothing listens for it. On a
    cluster: this node's address (as Ray knows it) and a port free there; torch's TCP store
    listens on it on every interface of that node, for as long as the group is formed."""
    import socket
    import tempfile

    if local:
        return f"file://{tempfile.mkdtemp(prefix='opd-learners-')}/store"
    import ray

    ip = ray.util.get_node_ip_address()
    with socket.socket() as s:
        s.bind((ip, 0))
        return f"tcp://{ip}:{s.getsockname()[1]}"


def decoder_layers(model: torch.nn.Module) -> Iterable[torch.nn.Module]:
    """The decoder layers of a Hugging Face causal LM (`model.model.layers`)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"resources.learner_workers > 1 shards a decoder's layers (model.model.layers), "
                         f"which {type(model).__name__} does not have")
    return layers


def shard(model: torch.nn.Module, device: str, bf16: bool, frozen: bool = False) -> Whole:
    """`model` wrapped in FSDP2 over the default process group: one unit per decoder layer,
    then the root (`Whole`); gradients summed across ranks. `bf16`: bf16 compute,
    fp32 master weights and reduction. `frozen`: the anchor, which is only read."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    import torch.distributed as dist

    mesh = init_device_mesh(device, (dist.get_world_size(),))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if bf16 else MixedPrecisionPolicy())
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    root = fully_shard(Whole(model), mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    if not frozen:
        for unit in root.modules():
            if hasattr(unit, "set_gradient_divide_factor"):  # every FSDP unit: sum, do not average
                unit.set_force_sum_reduction_for_comms(True)
                unit.set_gradient_divide_factor(1.0)
    return root


def reshard(whole: Optional[torch.nn.Module]) -> None:
    """Free the root's gathered parameters (after a forward without backward: the anchor, an
    evaluation); nothing unsharded."""
    if whole is not None and hasattr(whole, "reshard"):
        whole.reshard()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every rank if sharded (a collective: every rank calls
    it, in the same order), else `t`."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's dim-0 slice of `t` if sharded, else `t`."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `param` is: this rank's shard of it if `param` is sharded (no
    communication: every rank holds `full`), else `full` on the param's device."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor) and full.dim() > 0:
        return distribute_tensor(full.to(param.device_mesh.device_type), param.device_mesh, param.placements,
                                 src_data_rank=None)
    return full.to(param.device) if full.dim() > 0 else full


def clip_global_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """Clip the gradients to `max_norm` by their norm over every rank's shards; that norm."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    total = full_tensor(torch.nn.utils.get_total_norm(grads, 2.0))
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)


def agree(ok: bool) -> bool:
    """True if `ok` on every rank (a collective when grouped): every rank then steps, or
    none does."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return ok
    flag = torch.tensor([1.0 if ok else 0.0])
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def gather_objects(obj: Any) -> list:
    """Every rank's `obj`, in rank order ([obj] unsharded)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Optional[Any]] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def local_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds of the parameters, their gradients and the optimizer's state."""
    from torch.distributed.tensor import DTensor

    def size(t: Optional[torch.Tensor]) -> int:
        if t is None:
            return 0
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    params = list(model.parameters())
    return {"param_bytes": sum(size(p) for p in params), "grad_bytes": sum(size(p.grad) for p in params),
            "optimizer_bytes": sum(size(v) for p in params for v in opt.state.get(p, {}).values()
                                   if isinstance(v, torch.Tensor))}
