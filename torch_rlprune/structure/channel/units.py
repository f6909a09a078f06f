"""One torch-pruning group as units and tensor slices: which root channels are coupled into one unit,
and which positions of which tensors each unit owns."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn
from torch_pruning import ops as tp_ops

from .graph import RNN_TYPES
from .groups import Reject, TensorSlice
from .members import member_tensors, tensor_size
from .recurrent import hidden_unit_tensors

__all__ = ["build_group"]

OPT = tp_ops.OPTYPE
_PASSIVE = {OPT.CONCAT, OPT.SPLIT, OPT.ELEMENTWISE, OPT.RESHAPE, OPT.UNBIND, OPT.EXPAND, OPT.SLICE}
_Positions = Dict[Tuple[int, str, int], dict]


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, a: int) -> int:
        p = self.parent
        while p[a] != a:
            p[a] = p[p[a]]
            a = p[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if ra < rb:
                self.parent[rb] = ra
            else:
                self.parent[ra] = rb


def build_group(DG, tp_group, roots_of, model, names, root_name: str, excluded_out: Callable[[str], bool],
                exact_norms: bool = True, output_nodes: Set[int] = frozenset()) -> dict:
    """Turn one torch-pruning group (all channels of its root) into slices, or raise Reject.

    Units are the classes of root channels torch-pruning couples: channels ``r`` and
    ``r + k * C / channel_groups`` (grouped convs, GroupNorm), and channels whose removal
    reaches the same position of some tensor (see :func:`.enumeration.enumerate_group`).
    """
    root_item = tp_group[0]
    found = _Collected(DG, roots_of, model, names, excluded_out, exact_norms, output_nodes, len(root_item.idxs))
    for item in tp_group:  # exclusions first, so that the reason names them
        m = item.dep.target.module
        if (isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and DG.is_out_channel_pruning_fn(item.dep.handler)
                and excluded_out(names.get(id(m), "\0"))):
            raise Reject(f"contains excluded layer '{names[id(m)]}' (its output channels are kept)")
    for item in tp_group:
        found.add(item)
    root_unit, num_units = found.units(root_item.dep.target.module)
    positions: _Positions = {}
    for member in found.members:
        _place_member(positions, member, root_unit, num_units)
    for mod_name, rnn in found.recurrent_out:  # root channel h (< hidden_size) stands for hidden unit h
        _place_hidden_units(positions, mod_name, rnn, root_unit)
    out = [_tensor_slice(entry) for entry in positions.values()]
    if not out:
        raise Reject("has no tensors to mask")
    return {"slices": out, "inexact": found.inexact, "layers": found.layers, "out_layers": found.out_layers,
            "num_channels": found.C, "ch_groups": found.ch_groups, "num_units": num_units, "root_unit": root_unit,
            "norms": found.norms}


class _Collected:
    """What the items of one torch-pruning group contribute, and the unit classes they imply."""

    def __init__(self, DG, roots_of, model, names, excluded_out: Callable[[str], bool], exact_norms: bool,
                 output_nodes: Set[int], C: int):
        self.DG, self.roots_of, self.model, self.names = DG, roots_of, model, names
        self.excluded_out, self.exact_norms, self.output_nodes = excluded_out, exact_norms, output_nodes
        self.C = C
        self.members = []      # (module name, module, tensor, dim, role, idxs, roots per idx, grouped)
        self.layers: List[Tuple[str, str]] = []
        self.inexact: List[str] = []
        self.out_layers: List[str] = []
        self.ch_groups = 1
        self.grouped_members = []
        self.uf = _UnionFind(C)
        self.joined: Set[Tuple[int, ...]] = set()
        self.norms: list = []
        self.recurrent_out: List[Tuple[str, nn.Module]] = []

    def add(self, item) -> None:
        dep, idxs = item.dep, list(item.idxs)
        node = dep.target
        if not idxs:
            return
        is_out = self.DG.is_out_channel_pruning_fn(dep.handler)
        if id(node) in self.output_nodes and (is_out or node.type in _PASSIVE):
            raise Reject(f"changes the model's output ('{self.names.get(id(node.module), node.name)}' produces it)")
        if node.type in _PASSIVE:
            return
        tensors, notes, grouped = member_tensors(self.DG, node, is_out, self.model, self.names, self.exact_norms,
                                                 self.norms)
        mname = self.names.get(id(node.module), None)
        self._note_output(node, is_out, mname)
        roots = self._roots(self.roots_of.get((id(node), dep.handler), {}), idxs, mname or node.name)
        self.inexact.extend(notes)
        if grouped is not None:
            self.ch_groups = max(self.ch_groups, grouped[1])
            self.grouped_members.append((mname, grouped, len(idxs)))
        for (tname_mod, tmod, tname, dim, role) in tensors:
            self.members.append((tname_mod, tmod, tname, dim, role, idxs, roots, grouped))
        layer = _layer_entry(node, is_out, mname, tensors)
        if layer is not None:
            self.layers.append(layer)

    def _note_output(self, node, is_out: bool, mname: Optional[str]) -> None:
        if is_out and isinstance(node.module, RNN_TYPES):
            self.recurrent_out.append((mname, node.module))
            if self.excluded_out(mname or "\0"):
                raise Reject(f"contains excluded layer '{mname}' (its hidden units are kept)")
            self.out_layers.append(mname)
        if node.type in (OPT.CONV, OPT.DEPTHWISE_CONV, OPT.LINEAR) and is_out and mname is not None:
            self.out_layers.append(mname)
            if self.excluded_out(mname):
                raise Reject(f"contains excluded layer '{mname}' (its output channels are kept)")

    def _roots(self, table: Dict[int, Set], idxs: Sequence[int], label: str) -> List[int]:
        """The root channel of each index; an index several root channels reach joins their units."""
        roots = []
        for i in idxs:
            rs = table.get(i)
            if not rs or any(r is None for r in rs):
                raise Reject(f"torch-pruning cannot map the indices of '{label}' back to the root layer")
            bad = [r for r in rs if not 0 <= r < self.C]
            if bad:
                raise Reject(f"torch-pruning maps '{label}' to root channel {bad[0]} "
                             f"outside the root's {self.C} channels")
            if len(rs) == 1:
                roots.append(next(iter(rs)))
                continue
            rs = tuple(sorted(rs))
            if rs not in self.joined:  # the same root set reaches many tensors
                self.joined.add(rs)
                for r in rs[1:]:
                    self.uf.union(rs[0], r)
            roots.append(rs[0])
        return roots

    def units(self, root: nn.Module) -> Tuple[torch.Tensor, int]:
        """The unit of every root channel, and how many units there are."""
        C, ch_groups, uf = self.C, self.ch_groups, self.uf
        if C % ch_groups:
            raise Reject(f"{C} channels cannot be split into {ch_groups} equal channel groups")
        per_group = C // ch_groups
        for mname, (kind, g), n_idx in self.grouped_members:
            if ch_groups % g:
                raise Reject(f"'{mname}' has {g} groups, incompatible with {ch_groups} channel groups in this group")
        for r in range(per_group):
            for k in range(1, ch_groups):
                uf.union(r, r + k * per_group)
        for _, rnn in self.recurrent_out:  # a hidden unit is one output feature per direction
            if rnn is not root:
                raise Reject(f"reaches the hidden units of '{self.names.get(id(rnn), '?')}' from another layer")
            H = rnn.hidden_size
            for r in range(H):
                for d in range(1, C // H):
                    uf.union(r, r + d * H)
        classes: Dict[int, int] = {}
        root_unit = torch.empty(C, dtype=torch.long)
        for r in range(C):
            root_unit[r] = classes.setdefault(uf.find(r), len(classes))
        if len(classes) < 2:
            raise Reject("torch-pruning couples all its channels into one unit (nothing can be removed)")
        return root_unit, len(classes)


def _layer_entry(node, is_out: bool, mname: Optional[str], tensors) -> Optional[Tuple[str, str]]:
    """``(layer name, role)`` for :attr:`ChannelGroup.layers`."""
    if mname is None:
        if node.type == OPT.PARAMETER and tensors:
            return (tensors[0][0] + "." + tensors[0][2] if tensors[0][0] else tensors[0][2], "param")
        return None
    if node.type == OPT.DEPTHWISE_CONV:
        return mname, "depthwise"
    if is_out and node.type in (OPT.CONV, OPT.LINEAR):
        return mname, "out"
    if isinstance(node.module, RNN_TYPES):
        return mname, "hidden" if is_out else "in"
    if node.type in (OPT.CONV, OPT.LINEAR):
        return mname, "in"
    return mname, "norm" if node.type in (OPT.BN, OPT.LN, OPT.GN, OPT.IN) else "param"


def _place_member(positions: _Positions, member: tuple, root_unit: torch.Tensor, num_units: int) -> None:
    """Give each position a member tensor's items reach to its unit, checking what torch-pruning can remove."""
    mod_name, mod, tname, dim, role, idxs, ridx, grouped = member
    shape = tensor_size(mod, tname)
    if shape is None:
        return
    size = shape[dim]
    idx_t = torch.tensor(idxs, dtype=torch.long)
    units = root_unit[torch.tensor(ridx, dtype=torch.long)]
    if grouped is not None and grouped[0] == "conv":
        idx_t, units = _grouped_conv_positions(mod_name, mod, role, idx_t, units, num_units, grouped[1])
    elif grouped is not None and grouped[0] == "groupnorm":
        g = grouped[1]
        if len(idxs) != mod.num_channels:
            raise Reject(f"GroupNorm '{mod_name}' shares its channels with other groups (concat)")
        _require_equal_per_group(units, idx_t // (mod.num_channels // g), num_units, g,
                                 f"GroupNorm '{mod_name}': units would remove unequal channels per norm group")
    if int(idx_t.min()) < 0 or int(idx_t.max()) >= size:
        raise Reject(f"torch-pruning index {int(idx_t.max())} is out of range for "
                     f"'{mod_name}.{tname}' (dim {dim} has {size})")
    entry = positions.setdefault((id(mod), tname, dim), {"module_name": mod_name, "module": mod, "tensor_name": tname,
                                                         "dim": dim, "size": size, "role": role, "map": {}})
    _assign(entry["map"], idx_t.tolist(), units.tolist(), f"'{mod_name}.{tname}'")


def _grouped_conv_positions(mod_name: str, mod: nn.Module, role: str, idx_t: torch.Tensor, units: torch.Tensor,
                            num_units: int, g: int) -> Tuple[torch.Tensor, torch.Tensor]:
    full = mod.in_channels if role == "in" else mod.out_channels
    if len(idx_t) != full:
        raise Reject(f"grouped conv '{mod_name}' ({g} groups) shares its "
                     f"{'input' if role == 'in' else 'output'} channels with other groups (concat)")
    if int(idx_t.max()) >= full or int(idx_t.min()) < 0:
        raise Reject(f"torch-pruning index {int(idx_t.max())} out of range for '{mod_name}' ({full} channels)")
    per = full // g
    if role != "in":
        _require_equal_per_group(units, idx_t // per, num_units, g,
                                 f"grouped conv '{mod_name}': units would remove unequal rows per conv group")
        return idx_t, units
    # every conv group must lose the same local columns: weight[:, local]
    table = {}
    for col, u in zip((idx_t % per).tolist(), units.tolist()):
        if table.setdefault(col, u) != u:
            raise Reject(f"grouped conv '{mod_name}': channel groups would lose different columns")
    loc = sorted(table)
    return torch.tensor(loc, dtype=torch.long), torch.tensor([table[col] for col in loc], dtype=torch.long)


def _require_equal_per_group(units: torch.Tensor, group_of: torch.Tensor, num_units: int, g: int,
                             message: str) -> None:
    counts = torch.zeros(num_units, g, dtype=torch.long)
    counts.index_put_((units, group_of), torch.ones_like(units), accumulate=True)
    if not bool((counts == counts[:, :1]).all()):
        raise Reject(message)


def _place_hidden_units(positions: _Positions, mod_name: str, rnn: nn.Module, root_unit: torch.Tensor) -> None:
    for tname, dim, pos, hidden in hidden_unit_tensors(rnn):
        entry = positions.setdefault((id(rnn), tname, dim), {"module_name": mod_name, "module": rnn,
                                                             "tensor_name": tname, "dim": dim,
                                                             "size": tensor_size(rnn, tname)[dim], "role": "hidden",
                                                             "map": {}})
        _assign(entry["map"], pos.tolist(), root_unit[hidden].tolist(), f"'{mod_name}.{tname}'")


def _assign(table: Dict[int, int], positions: Sequence[int], units: Sequence[int], label: str) -> None:
    for p, u in zip(positions, units):
        if table.setdefault(p, u) != u:
            raise Reject(f"{label} position {p} would belong to two units")


def _tensor_slice(entry: dict) -> TensorSlice:
    pos = sorted(entry["map"])
    return TensorSlice(entry["module_name"], entry["tensor_name"], entry["dim"], entry["size"],
                       torch.tensor(pos, dtype=torch.long),
                       torch.tensor([entry["map"][p] for p in pos], dtype=torch.long),
                       entry["role"], entry["module"])
