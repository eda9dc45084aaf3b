"""Hypernetworks (used by `hn` and `pah`): an MLP from an embedding to named weight tensors."""

import math

import torch
from torch import nn


def param_shapes(module: nn.Module) -> dict[str, torch.Size]:
    """The names and shapes of a module's parameters, in registration order (what a hypernetwork generates)."""
    return {name: p.shape for name, p in module.named_parameters()}


class HyperNetwork(nn.Module):
    """An MLP (Linear + activation per hidden layer, then a linear output) from an embedding to the
    tensors named in `shapes`: its flat output is cut and reshaped by `split`.

    `chunk_size` > 0: the output is made `chunk_size` values at a time, the MLP's input being the
    embedding concatenated with a learned embedding per chunk, all chunks in one batch (hypercl's
    chunked hypernetwork, mnist/chunked_hyper_model.py; its chunk embeddings are N(0, 1) and belong
    to the hypernetwork's weights, so they are trained and regularised with them).
    """

    def __init__(
        self,
        in_features: int,
        hidden: list[int],
        shapes: dict[str, torch.Size],
        activation: type[nn.Module] = nn.ReLU,
        bias: bool = True,
        chunk_size: int = 0,
        chunk_embedding_dim: int = 0,
    ) -> None:
        super().__init__()
        self.shapes = dict(shapes)
        self.n_outputs = sum(math.prod(shape) for shape in self.shapes.values())
        out_features = self.n_outputs
        self.chunk_embeddings = None
        if chunk_size > 0:
            n_chunks = -(-self.n_outputs // chunk_size)
            self.chunk_embeddings = nn.Parameter(torch.randn(n_chunks, chunk_embedding_dim))
            in_features += chunk_embedding_dim
            out_features = chunk_size
        layers: list[nn.Module] = []
        for units in hidden:
            layers += [nn.Linear(in_features, units, bias=bias), activation()]
            in_features = units
        layers.append(nn.Linear(in_features, out_features, bias=bias))
        self.mlp = nn.Sequential(*layers)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """The generated values of one embedding (in_features,) as one flat vector (n_outputs,)."""
        if self.chunk_embeddings is None:
            return self.mlp(embedding)
        repeated = embedding.expand(len(self.chunk_embeddings), -1)
        return self.mlp(torch.cat([repeated, self.chunk_embeddings], dim=1)).flatten()[: self.n_outputs]

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """The named tensors of a flat output."""
        values = flat.split([math.prod(shape) for shape in self.shapes.values()])
        return {name: value.view(shape) for (name, shape), value in zip(self.shapes.items(), values, strict=True)}
