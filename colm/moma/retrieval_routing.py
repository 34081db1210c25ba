"""Retrieval routing (the retrieval baseline, spec 4.8.5): one expert per example, by nearest library example.

A retrieval Router (`Router.is_retriever=True`) sits on the encoder stack and reads the sentence embedding of
each example (colm/moma/feature_extractor.py). Its router vector for expert i is that expert's library: up to
K example embeddings of width `retrieval_embedding_dim`, flattened and zero-padded
(make_checkpoint_for_retrieval), so Router.d_router = K x dim (`retrieval_router_size`). The example goes to
the expert holding its most similar library example: one-hot weights, no scores, no centring.
"""

import gin
import torch
import torch.nn.functional as F


@gin.configurable
def retrieval_router_size(library_rows=1000, embedding_dim=384):
    """Router.d_router of a retrieval router: a library of `library_rows` embeddings, flattened."""
    return int(library_rows) * int(embedding_dim)


class RetrievalRouting:
    """What a retrieval Router does instead of scoring: prepare the libraries, route each example to one expert.
    The library width (K) is taken from the loaded checkpoint (Router.match_checkpoint_shapes)."""

    def __init__(self, embedding_dim, eps=1e-6):
        self.embedding_dim = embedding_dim
        self.eps = eps

    def libraries(self, g):
        """The router vectors (N, K * dim) as L2-normalised library rows (N, K, dim); zero rows stay zero."""
        rows = g.float().view(g.shape[0], -1, self.embedding_dim)
        return F.normalize(rows, dim=-1, eps=self.eps)

    def route(self, queries, libraries):
        """One-hot weights (B, N) for queries (B, dim): the expert whose library holds the most similar row."""
        queries = F.normalize(queries.float(), dim=-1, eps=self.eps)
        best = torch.einsum("bd,nkd->bnk", queries, libraries).amax(dim=-1)  # (B, N): max cosine per expert
        return F.one_hot(best.argmax(dim=-1), libraries.shape[0]).to(queries.dtype)
