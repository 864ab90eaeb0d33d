"""Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers in neural networks"): momentum whose update is
orthogonalised by a Newton-Schulz iteration (torch.optim.Muon), on the hidden weight matrices only; an aux optimiser
(SGD or AdamW) trains the rest: the input layer, the classifier head, biases and norm parameters, as the Muon
authors and airbench do. A conv weight (out, in, kh, kw) is the matrix (out, in x kh x kw).
"""
import torch
from torch import nn

from models.pretrained import classifier_head
from utils.errors import UserError

MUON_AUX = ("sgd", "adamw")
LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


def hidden_weights(model):
    """The weights Muon trains: those of every conv and linear layer except the input layer (the first one in
    module order, trainable or not) and the classifier head. Other parameters of two or more dimensions (position
    embeddings, tokens) are no layer's weight matrix and stay with the aux optimiser."""
    layers = [m for m in model.modules() if isinstance(m, LAYERS)]
    head = classifier_head(getattr(model, "net", model))
    out = []
    for m in layers[1:]:
        w = m.weight
        if m is not head and isinstance(w, nn.Parameter) and w.requires_grad and not any(w is p for p in out):
            out.append(w)
    return out


def muon_param_groups(groups, model, lr, muon_lr):
    """Split build_optimizer's parameter groups: each group's hidden weights (hidden_weights) form a Muon group at
    muon_lr x (the group's lr / lr), which keeps its weight decay and layer-wise lr factor; the rest stay as they
    are, for the aux optimiser. Aux groups come first, so param_groups[0]["lr"] is still --lr's schedule."""
    hidden = {id(p) for p in hidden_weights(model)}
    aux, muon = [], []
    for g in groups:
        rest = [p for p in g["params"] if id(p) not in hidden]
        mine = [p for p in g["params"] if id(p) in hidden]
        if rest:
            aux.append({**g, "params": rest, "muon": False})
        if mine:
            muon.append({**g, "params": mine, "lr": g.get("lr", lr) * muon_lr / lr, "muon": True})
    if not muon:
        raise UserError("--opt muon: this model has no hidden conv/linear layer (between the input layer and the "
                        "head) for Muon to train; pick another --opt")
    if not aux:
        raise UserError("--opt muon: no trainable parameter is left for --muon_aux (a frozen head?)")
    return aux + muon


def _layout(p):
    """The permutation that makes `p` contiguous: (0, 2, ..., 1) for a channels_last conv weight, else None."""
    if p.ndim > 2 and not p.is_contiguous():
        perm = (0, *range(2, p.ndim), 1)
        if p.permute(perm).is_contiguous():
            return perm
    return None


def _matrix(t, perm):
    """`t` as an (out, rest) matrix, its remaining dimensions taken in the order `perm` (None: as they are)."""
    t = t if perm is None else t.permute(perm)
    return t.reshape(t.shape[0], -1)


class MuonWithAux(torch.optim.Optimizer):
    """One optimizer for the loop, two inside: torch.optim.Muon over 2-D views of the parameters of the groups marked
    "muon" (muon_param_groups) and SGD or AdamW over the others.

    Its own param_groups hold the real parameters with each group's lr and weight decay, so schedules, SWA, GradScaler
    and step hooks see an ordinary optimizer; step() hands each group's current lr and weight decay to its inner
    group. The views share storage with the weights: a channels_last weight is viewed in its memory order
    (out, kh, kw, in) and its gradient flattened in the same order (the column order of a matrix does not change its
    orthogonalisation, NS(G P) = NS(G) P for a permutation P, but it must match between weight and gradient).
    Muon is Nesterov momentum with decoupled weight decay (p <- p (1 - lr wd)); for the aux SGD --momentum and
    --nesterov apply, for AdamW --momentum is beta1. Build it after moving the model to its device and memory format.
    """

    def __init__(self, groups, lr, weight_decay=0.0, aux="sgd", momentum=0.9, nesterov=True, muon_momentum=0.95):
        if aux not in MUON_AUX:
            raise UserError(f"unknown --muon_aux {aux!r}; choose one of {', '.join(MUON_AUX)}")
        super().__init__(groups, {"lr": lr, "weight_decay": weight_decay, "muon": False})
        self._matrices = []  # (parameter, its 2-D view, the permutation of the view)
        muon_groups, aux_groups = [], []
        for g in self.param_groups:
            inner = {"lr": g["lr"], "weight_decay": g["weight_decay"]}
            if g["muon"]:
                views = []
                for p in g["params"]:
                    perm = _layout(p)
                    views.append((p.detach() if perm is None else p.detach().permute(perm)).view(p.shape[0], -1))
                    self._matrices.append((p, views[-1], perm))
                muon_groups.append({**inner, "params": views})
            else:
                aux_groups.append({**inner, "params": list(g["params"])})
        self.muon = torch.optim.Muon(muon_groups, lr=lr, weight_decay=weight_decay, momentum=muon_momentum,
                                     nesterov=True)
        if aux == "sgd":
            self.aux = torch.optim.SGD(aux_groups, lr=lr, momentum=momentum, nesterov=nesterov,
                                       weight_decay=weight_decay)
        else:
            self.aux = torch.optim.AdamW(aux_groups, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        inner = {True: iter(self.muon.param_groups), False: iter(self.aux.param_groups)}
        for group in self.param_groups:  # the same order inside: load_state_dict keeps it
            target = next(inner[group["muon"]])
            target["lr"], target["weight_decay"] = group["lr"], group["weight_decay"]
        for p, view, perm in self._matrices:
            if view.data_ptr() != p.data_ptr():
                raise RuntimeError("a weight moved (device or memory format) after its MuonWithAux was built; "
                                   "build the optimizer after moving the model")
            view.grad = None if p.grad is None else _matrix(p.grad, perm)
        self.muon.step()
        self.aux.step()
        for _, view, _ in self._matrices:
            view.grad = None
        return loss

    def state_dict(self):
        return {**super().state_dict(), "muon": self.muon.state_dict(), "aux": self.aux.state_dict()}

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        muon, aux = state_dict.pop("muon", None), state_dict.pop("aux", None)
        if muon is None or aux is None:
            raise UserError("the checkpoint's optimizer state is not --opt muon's; resume with the run's own --opt")
        super().load_state_dict(state_dict)
        self.muon.load_state_dict(muon)
        self.aux.load_state_dict(aux)
