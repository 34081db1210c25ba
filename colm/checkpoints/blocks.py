"""Per-block routers and removing parts of a checkpoint (spec 4.9): router vectors averaged over a block,
encoder blocks or FFN / attention experts dropped."""

import gin

from colm.checkpoints.common import average, transform_file, without
from colm.formats import keys as K
from colm.formats.checkpoint_io import read_experiment, write_experiment
from colm.models import architecture as A


def _block_routers(state: dict, what: str) -> dict:
    """{block: [(module, {index: vector}), ...]} for router vectors of modules inside encoder/decoder blocks."""
    blocks = {}
    for (module, param), vectors in K.group(state).items():
        block = A.block_of(module)
        if param == K.EMBEDDINGS and block is not None and module != block:
            sizes = sorted({tuple(v.shape) for v in vectors.values()})
            if len(sizes) != 1:
                raise ValueError(f"{what}: the router vectors of {module} have different shapes {sizes}; every "
                                 "expert's router vector at a module must have the module's input size.")
            blocks.setdefault(block, []).append((module, vectors))
    if not blocks:
        raise ValueError(f"{what}: no router vectors on modules inside transformer blocks (keys "
                         "<block module>.<linear>._addons.router.expert_embeddings__<i>).")
    return blocks


def _vector_size(vectors: dict) -> int:
    """The size of a module's router vectors {expert index: vector} (one size: `_block_routers` checks it)."""
    return next(iter(vectors.values())).shape[0]


def _block_width(block: str, members: list, what: str) -> int:
    """The block's input size (d_model): that of its router on a module that reads the model width
    (architecture.reads_model_width), else the size most routers share. Not every router of a block has the
    block's width: a feed-forward output projection reads d_ff."""
    for module, vectors in members:
        if A.reads_model_width(module):
            return _vector_size(vectors)
    counts = {}
    for _, vectors in members:
        counts[_vector_size(vectors)] = counts.get(_vector_size(vectors), 0) + 1
    widths = [w for w, c in counts.items() if c == max(counts.values())]
    if len(widths) > 1:
        raise ValueError(f"{what}, {block}: no router on a module reading the model width and as many router vectors of size {widths[0]} as of "
                         f"{widths[1]}; cannot tell the block's input size.")
    return widths[0]


def _average_by_index(block: str, members: list, what: str) -> dict:
    """{index: mean vector} over the members (all must have the same experts)."""
    indices = sorted(members[0][1])
    for module, vectors in members:
        if sorted(vectors) != indices:
            raise ValueError(f"{what}, {block}: {module} has router vectors for experts {sorted(vectors)}, "
                             f"{members[0][0]} for {indices}.")
    return {i: average(vectors[i] for _, vectors in members) for i in indices}


def merge_into_blocks_state(state: dict) -> dict:
    """Replaces the per-linear router vectors of each block by their average at `<block>._addons.router.
    expert_embeddings__i`. Only vectors of the block's common size are averaged (in T5 the FFN's wo reads
    d_ff, not d_model); the others are deleted as well, since one block router serves the whole block."""
    out = dict(state)
    for block, members in _block_routers(state, "merge_into_blocks").items():
        width = _block_width(block, members, "merge_into_blocks")
        left_out = [m for m, v in members if _vector_size(v) != width]
        if left_out:
            print(f"[colm] merge_into_blocks: {block}: {len(left_out)} router(s) of another size not averaged, "
                  f"e.g. {left_out[0]}.")
        for module, vectors in members:
            for i in vectors:
                del out[K.router_key(module, i)]
        same_width = [(m, v) for m, v in members if _vector_size(v) == width]
        for i, mean in _average_by_index(block, same_width, "merge_into_blocks").items():
            out[K.router_key(block, i)] = mean
    return out


@gin.configurable
def merge_into_blocks(path=gin.REQUIRED, out_path=gin.REQUIRED):
    return transform_file("merge_into_blocks", merge_into_blocks_state, path, out_path)


def make_router_blockwise_state(state: dict, index=None) -> dict:
    """Keeps every router key but overwrites each vector with the average of the same-size vectors of its block.

    index: only that expert's vectors (None: all).
    """
    out = dict(state)
    for block, members in _block_routers(state, "make_router_blockwise").items():
        for width in sorted({_vector_size(v) for _, v in members}):
            same_width = [(m, v) for m, v in members if _vector_size(v) == width]
            for i, mean in _average_by_index(block, same_width, "make_router_blockwise").items():
                if index is None or i == index:
                    for module, _ in same_width:
                        out[K.router_key(module, i)] = mean.clone()
    return out


@gin.configurable
def make_router_blockwise(path=gin.REQUIRED, out_path=None, index=None):
    """out_path=None: the path with "lora" replaced by "lora_block"."""
    if out_path is None:
        if "lora" not in path:
            raise ValueError(f"make_router_blockwise: path {path!r} contains no \"lora\" to derive the output "
                             "path from; bind make_router_blockwise.out_path.")
        out_path = path.replace("lora", "lora_block")
    return write_experiment(make_router_blockwise_state(read_experiment(path), index), out_path)


def skip_blocks_state(state: dict, block_num: int) -> dict:
    """Deletes every key of encoder blocks 0..block_num (inclusive)."""
    if not isinstance(block_num, int) or isinstance(block_num, bool) or block_num < 0:
        raise ValueError(f"skip_blocks: block_num must be a non-negative integer, got {block_num!r}.")

    def in_skipped_block(key):
        number = A.block_number(key)
        return A.stack_of(key) == A.ENCODER and number is not None and number <= block_num

    out = without(state, in_skipped_block)
    if len(out) == len(state):
        print(f"[colm] skip_blocks: no keys in encoder blocks 0..{block_num}; nothing deleted.")
    return out


@gin.configurable
def skip_blocks(path=gin.REQUIRED, out_path=gin.REQUIRED, block_num=gin.REQUIRED):
    return transform_file("skip_blocks", skip_blocks_state, path, out_path, block_num)


def skip_alternate_state(state: dict, ffn_exp: bool) -> dict:
    """ffn_exp=True keeps only the feed-forward modules' keys (architecture.is_ffn), False drops them. Embedding keys always stay."""
    if not isinstance(ffn_exp, bool):
        raise ValueError(f"skip_alternate: ffn_exp must be True or False, got {ffn_exp!r}.")
    return {k: v for k, v in state.items() if K.is_embedding_key(k) or (A.is_ffn(k) == ffn_exp)}


@gin.configurable
def skip_alternate(path=gin.REQUIRED, out_path=gin.REQUIRED, ffn_exp=gin.REQUIRED):
    return transform_file("skip_alternate", skip_alternate_state, path, out_path, ffn_exp)
