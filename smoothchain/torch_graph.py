"""Read a PyTorch module with skip connections into a :class:`~smoothchain.graph.Graph` (issue 13).

``torch.fx`` traces the module symbolically: registered modules (those of
:mod:`smoothchain.torch_chain`'s registry) stay whole, and the trace records how their outputs
are combined.  Each traced operation becomes

* its components (a registered module, or a functional activation such as ``F.relu`` read as
  its module), grouped into layers as in a chain: a bi-affine component opens a layer node, the
  non-linear components after it join it while nothing else reads the values in between;
  a non-linear component after a merge or a branch point is a layer without weights;
* a merge: ``a + b`` / ``torch.add`` / ``+=`` (:class:`Sum` with c = (1, 1)), ``a - b``
  ((1, -1)), ``c * a`` and ``a / c`` with a number c (a one-input sum), ``a * b``
  (:class:`Product`), ``torch.cat`` (:class:`Concat`);
* nothing, for a reshape (``flatten``, ``view``, ``reshape``, ``nn.Flatten``), which keeps the
  entries and their norm.

Shapes come from running the traced module on the meta device (no memory, no computation).
Anything else -- data-dependent control flow the tracer cannot follow, an unregistered module,
an operation without a rule -- is a :class:`~smoothchain.chain.ChainError` naming the node and
the fix.  See docs/graphs.md.
"""

from __future__ import annotations

import copy
import numbers
import operator
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import fx, nn

from .chain import ChainError
from .components import Component, build_layers
from .graph import Concat, Graph, Merge, Node, Product, Sum
from .torch_chain import _lookup, _meta_forward, _norms_at_weights, _unsupported, _weight_norm, convert

__all__ = ["ModuleGraph", "graph_from_module", "prefix_module", "chain_of_blocks"]

#: functional activations read as the module they compute
_FUNCTIONAL = {
    torch.relu: nn.ReLU, torch.nn.functional.relu: nn.ReLU, torch.tanh: nn.Tanh,
    torch.nn.functional.tanh: nn.Tanh, torch.sigmoid: nn.Sigmoid, torch.nn.functional.sigmoid: nn.Sigmoid,
    torch.nn.functional.softplus: nn.Softplus,
}
_METHOD_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
_RESHAPES_F = {torch.flatten, torch.reshape}
_RESHAPE_METHODS = {"flatten", "view", "reshape", "contiguous"}
_ADD = {operator.add, operator.iadd, torch.add}
_SUB = {operator.sub, operator.isub, torch.sub}
_MUL = {operator.mul, operator.imul, torch.mul}
_DIV = {operator.truediv, operator.itruediv, torch.div}
_CAT = {torch.cat, torch.concat}


@dataclass(frozen=True)
class ModuleGraph:
    """The graph of a module and, per graph node: the fx node(s) it came from (``sources``), the
    fx node holding its value (``outputs``) and the names of its weights v_n in the module's
    ``named_parameters`` (``params``; empty for merges and layers without weights); ``module``
    is the traced ``fx.GraphModule`` (:func:`prefix_module` cuts it at a node)."""

    graph: Graph
    sources: tuple[str, ...]
    outputs: tuple[str, ...] = ()
    params: tuple[tuple[str, ...], ...] = ()
    module: Any = None


def prefix_module(gm: fx.GraphModule, output: str) -> fx.GraphModule:
    """The traced module cut at fx node ``output``: what computes z_n (its parameters keep their
    names; what does not lead to ``output`` is removed)."""
    graph = copy.deepcopy(gm.graph)
    target = next(n for n in graph.nodes if n.name == output)
    old = next(n for n in graph.nodes if n.op == "output")
    graph.erase_node(old)
    graph.output(target)
    cut = fx.GraphModule(gm, graph)  # the purity check of eliminate_dead_code needs an owner
    cut.graph.eliminate_dead_code()
    return fx.GraphModule(gm, cut.graph)  # holds only the submodules still used


def chain_of_blocks(module: nn.Module) -> nn.Sequential:
    """A module with skip connections as a chain of blocks, for the DP of RH Algo. 4 (docs/graphs.md).

    The traced forward is cut after every *cut node*: an operation that no value computed before
    it skips over (every path from the input to the output goes through it, and nothing before it
    is read after it).  The operations between two cuts form one block, an ``fx.GraphModule`` that
    holds the original submodules -- so its parameters are the module's own tensors -- and the
    blocks, applied in order, compute the module: a residual block ``x + f(x)`` is one stage
    phi_l(v_l, z_{l-1}) with v_l all its weights.  A parameter read by two blocks makes the result
    no chain (:func:`smoothchain.torch_chain.module_layers` then says so).
    """
    gm = _trace(module)
    nodes = list(gm.graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    out = next(n for n in nodes if n.op == "output")
    if len(inputs) != 1 or not isinstance(out.args[0], fx.Node):
        raise ChainError(f"{type(module).__name__} takes {len(inputs)} inputs or returns several values: a chain "
                         "of blocks maps one tensor to one tensor")
    pos = {n: i for i, n in enumerate(nodes)}
    # get_attr nodes (a parameter read directly) go with the blocks that read them: no edge of theirs counts
    last_read = {n: max((pos[u] for u in n.users), default=pos[n]) for n in nodes if n.op != "get_attr"}
    blocks: list[list[fx.Node]] = [[]]
    block_of: dict[fx.Node, int] = {}
    reach = -1
    for i, n in enumerate(nodes):
        if n.op in ("placeholder", "output", "get_attr"):
            reach = max(reach, last_read.get(n, i))
            continue
        blocks[-1].append(n)
        block_of[n] = len(blocks) - 1
        if reach <= i and n is not out.args[0]:  # nothing computed before n is read after it: cut after n
            blocks.append([])
        reach = max(reach, last_read[n])
    blocks = [b for b in blocks if b]
    # a directly read parameter is copied into every block that reads it (read by two, it makes
    # the blocks share it, which module_layers refuses)
    attrs = {k: [n for n in nodes if n.op == "get_attr" and any(block_of.get(u) == k for u in n.users)]
             for k in range(len(blocks))}
    stages, value = [], inputs[0]  # value: the one node the next block reads
    for k, block in enumerate(blocks):
        graph = fx.Graph()
        env = {value: graph.placeholder("z")}
        for n in sorted(attrs[k] + block, key=pos.__getitem__):
            env[n] = graph.node_copy(n, lambda a: env[a])
        value = out.args[0] if k == len(blocks) - 1 else block[-1]
        graph.output(env[value])
        stages.append(fx.GraphModule(gm, graph))
    return nn.Sequential(*stages)


@dataclass
class _Pending:
    """A graph node being built: its inputs and either components (a layer) or a merge."""

    name: str
    inputs: tuple[int, ...]
    merge: Merge | None = None
    parts: list = field(default_factory=list)  # (component, input shape, name, module)
    open: bool = False  # a layer whose output only the next component reads (it may grow)
    output: str = ""  # the fx node holding the node's value
    params: tuple[str, ...] = ()  # its bi-affine part's parameters (qualified names)


class _Tracer(fx.Tracer):
    """Registered modules are leaves (their constants are known), as are torch.nn's own modules."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _lookup(m) is not None or super().is_leaf_module(m, qualname)


def _trace(module: nn.Module) -> fx.GraphModule:
    try:
        graph = _Tracer().trace(module)
    except Exception as err:  # torch.fx.proxy.TraceError, TypeError on control flow, ...
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ChainError(f"cannot trace {type(module).__name__} with torch.fx ({first}): smoothchain reads a "
                         "network with skip connections from its traced forward; write the forward without "
                         "data-dependent control flow, or give an nn.Sequential") from None
    return fx.GraphModule(module, graph)


def _shapes(gm: fx.GraphModule, input_shape: tuple[int, ...], batch: int) -> dict[str, Any]:
    """The output of every fx node on a meta-device batch (shapes only)."""
    meta = copy.deepcopy(gm).to("meta")
    dtype = next((p.dtype for p in gm.parameters() if p.is_floating_point()), torch.get_default_dtype())
    out: dict[str, Any] = {}

    class Record(fx.Interpreter):
        def call_module(self, target, args, kwargs):
            mod = self.fetch_attr(target)
            if _lookup(mod) is not None and len(args) == 1 and not kwargs:
                # as the chain reader runs it: batch statistics by smoothchain's own batch norm
                # (torch's meta batch norm pulls in its decompositions, seconds of imports)
                return _meta_forward(mod, args[0])
            return super().call_module(target, args, kwargs)

        def run_node(self, n):
            value = super().run_node(n)
            out[n.name] = value
            return value

    try:
        Record(meta).run(torch.empty((batch,) + input_shape, device="meta", dtype=dtype))
    except Exception as err:
        raise ChainError(f"the traced module cannot take per-example input shape {input_shape}: "
                         f"{str(err).splitlines()[0]} -- check --input-shape") from None
    return out


def _number(a) -> float | None:
    return float(a) if isinstance(a, numbers.Number) and not isinstance(a, bool) else None


def graph_from_module(module: nn.Module, input_shape: Sequence[int], batch_size: int = 2, *, mode: str = "paper",
                      radius: float = 1.0, input_norm: float = 1.0, weight_norms: bool = False) -> ModuleGraph:
    """The :class:`~smoothchain.graph.Graph` of ``module`` on inputs of per-example ``input_shape``,
    with the layers' constants for ``batch_size`` and ``mode`` (and the weight norms RH
    Cor. 4.5 needs when ``weight_norms``)."""
    shape0 = tuple(int(s) for s in input_shape)
    gm = _trace(module)
    values = _shapes(gm, shape0, max(int(batch_size), 2))
    modules = dict(gm.named_modules())
    pending: list[_Pending] = [_Pending("input", ())]
    pending[0].output = next(n.name for n in gm.graph.nodes if n.op == "placeholder")
    where: dict[str, int] = {}  # fx node -> graph node holding its value
    sources: list[str] = ["input"]
    users = {n.name: len(n.users) for n in gm.graph.nodes}

    def shape_of(arg) -> tuple[int, ...]:
        return tuple(values[arg.name].shape[1:])

    def add_components(node: fx.Node, parts: Sequence[Component], src: fx.Node, mod: nn.Module | None) -> None:
        at, shape = where[src.name], shape_of(src)
        base = node.target if node.op == "call_module" else node.name
        for k, part in enumerate(parts):
            pname = base if len(parts) == 1 else f"{base}.{'norm' if k == 0 else 'affine'}"
            if part.role != "shape":
                if part.role == "nonlinear" and pending[at].open:  # only this node reads it: grow the layer
                    pending[at].parts.append((part, shape, pname, mod))
                    sources[at] += f", {node.name}"
                else:
                    params = ()
                    if part.role == "bilinear" and node.op == "call_module":
                        own = ("weight", "bias") if pname.endswith(".affine") else None
                        params = tuple(f"{node.target}.{n}" for n, p in mod.named_parameters(recurse=False)
                                       if p is not None and (own is None or n in own))
                    pending.append(_Pending(pname, (at,), parts=[(part, shape, pname, mod)], open=True,
                                            params=params))
                    sources.append(node.name)
                    at = len(pending) - 1
                # its value is inside the module until the module's last part (batch norm's
                # normalisation before its affine part): no fx node holds it
                pending[at].output = node.name if k == len(parts) - 1 else ""
            shape = tuple(part.output_shape(shape))
        if shape != shape_of(node):
            raise ChainError(f"node {node.name!r}: its components give shape {shape} but PyTorch gives "
                             f"{shape_of(node)}; check the registered converter")
        where[node.name] = at
        if users[node.name] != 1:  # read twice: a branch point, the layer ends here
            pending[at].open = False

    def alias(node: fx.Node, src: fx.Node) -> None:
        """A reshape: the same entries, the same norm -- the same graph node."""
        where[node.name] = where[src.name]
        if users[node.name] != 1:
            pending[where[node.name]].open = False

    def merge(node: fx.Node, m: Merge, args: Sequence[fx.Node]) -> None:
        for a in args:
            pending[where[a.name]].open = False
        pending.append(_Pending(node.name, tuple(where[a.name] for a in args), merge=m, output=node.name))
        sources.append(node.name)
        where[node.name] = len(pending) - 1

    for node in gm.graph.nodes:
        tensor_args = [a for a in node.args if isinstance(a, fx.Node)]
        if node.op == "placeholder":
            if where:
                raise ChainError(f"{type(module).__name__} takes more than one input ({node.name!r}): "
                                 "smoothchain certifies networks of one input batch")
            where[node.name] = 0
        elif node.op == "output":
            out = node.args[0]
            if not isinstance(out, fx.Node) or where.get(out.name) != len(pending) - 1:
                raise ChainError("the network's output must be one tensor computed last")
        elif node.op == "get_attr":
            raise ChainError(f"node {node.name!r} reads the tensor {node.target!r} directly: only registered "
                             "modules may hold weights (see docs/registry.md)")
        elif not isinstance(values.get(node.name), torch.Tensor):
            continue  # x.size(0) and the like: arguments of a reshape
        elif node.op == "call_module":
            mod = modules[node.target]
            parts = convert(mod, shape_of(tensor_args[0]))
            if parts is None:
                raise _unsupported(node.target, mod)
            add_components(node, parts, tensor_args[0], mod)
        elif node.op in ("call_function", "call_method"):
            _operation(node, tensor_args, add_components, merge, alias, shape_of)
        else:  # pragma: no cover - fx has no other op kinds
            raise ChainError(f"unsupported fx node {node.op} {node.name!r}")

    nodes = [Node("input")]
    for p in pending[1:]:
        if p.merge is not None:
            nodes.append(Node(p.name, p.inputs, merge=p.merge))
            continue
        comps = [c for c, _, _, _ in p.parts]
        norms = at_weights = None
        if weight_norms:
            norms = [_weight_norm(m, c) if c.role == "bilinear" else None for c, _, _, m in p.parts]
            at_weights = [_norms_at_weights(m, c, s, batch_size) if c.role == "bilinear" else None
                          for c, s, _, m in p.parts]
        (layer,) = build_layers(comps, [s for _, s, _, _ in p.parts], batch_size, mode,
                                [n for _, _, n, _ in p.parts], norms, at_weights)
        nodes.append(Node(p.name, p.inputs, layer=layer))
    graph = Graph(tuple(nodes), input_norm=input_norm, radius=radius)
    return ModuleGraph(graph, tuple(sources), tuple(p.output for p in pending), tuple(p.params for p in pending), gm)


def _operation(node: fx.Node, tensor_args, add_components, merge, alias, shape_of) -> None:
    """A traced function or method call: an activation, a reshape or a merge."""
    fn, args = node.target, node.args
    method = node.op == "call_method"
    what = f".{fn}()" if method else getattr(fn, "__name__", str(fn))
    if (not method and fn in _FUNCTIONAL) or (method and fn in _METHOD_ACTIVATIONS):
        klass = _METHOD_ACTIVATIONS[fn] if method else _FUNCTIONAL[fn]
        if len(tensor_args) != 1 or len(args) > 1 or any(k != "inplace" for k in node.kwargs):
            raise ChainError(f"node {node.name!r}: {what} with arguments {args[1:]} {dict(node.kwargs)} has no "
                             f"registered constants; use nn.{klass.__name__}() with its defaults")
        add_components(node, convert(klass(), shape_of(tensor_args[0])), tensor_args[0], None)
        return
    if (not method and fn in _RESHAPES_F) or (method and fn in _RESHAPE_METHODS):
        alias(node, tensor_args[0])
        return
    if not method and fn in _CAT:
        parts = args[0]
        if not all(isinstance(a, fx.Node) for a in parts):
            raise ChainError(f"node {node.name!r}: torch.cat of something other than tensors")
        merge(node, Concat(), list(parts))
        return
    numbers_ = [_number(a) for a in args if not isinstance(a, fx.Node)]
    if not method and (fn in _ADD | _SUB) and len(tensor_args) == 2 and not node.kwargs:
        merge(node, Sum((1.0, 1.0 if fn in _ADD else -1.0)), tensor_args)
        return
    if not method and fn in _MUL and len(tensor_args) == 2:
        merge(node, Product(), tensor_args)
        return
    if not method and fn in (_MUL | _DIV) and len(tensor_args) == 1 and len(numbers_) == 1 and None not in numbers_:
        c = numbers_[0]
        if fn in _DIV and (args[0] is not tensor_args[0] or c == 0):
            raise ChainError(f"node {node.name!r}: only a tensor divided by a non-zero number is supported")
        merge(node, Sum((c if fn in _MUL else 1.0 / c,)), tensor_args)
        return
    raise ChainError(f"node {node.name!r}: {what} has no rule in smoothchain (supported merges: a + b, a - b, "
                     "a * b, number * a, a / number, torch.cat; reshapes; registered modules and F.relu/tanh/"
                     "sigmoid/softplus) -- compute it in a registered module, see docs/graphs.md")
