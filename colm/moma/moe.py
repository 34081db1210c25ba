"""Mixture of LoRA experts: Router and FFNExperts addons, and the moma calls make_moe / extend_moe.

Per linear module (per-token routing, "A2"): ExposeHidden (before) puts the module input x in the shared
dict; the Router turns it into routing probabilities over N experts; FFNExperts adds
sum_{top-k} p_j (x layer1_j layer2_j) / r to the module output, computing only the chosen experts
(colm/moma/routing.py). With sentence-level routing (ExposeHidden reduction masked_mean / mean) the router
sees one vector per example and every token of that example gets the example's weights: one code path.

Experts are held stacked (N x d_in x r, N x r x d_out, N x d_router). State-dict hooks read and write the
original's per-expert keys `layer1__<i>`, `layer2__<i>`, `expert_embeddings__<i>` (spelled by
colm/formats/keys.py), and loading a checkpoint into a model with no experts creates them in index order (see
`prepare_load`). Score types are colm/moma/routing.py's SCORE_TYPES; retrieval routing is
colm/moma/retrieval_routing.py; sizes such as "host_module.in_features" are colm/moma/sizes.py.
"""

import gin
import torch
from torch import nn

from colm.formats import keys
from colm.moma import ocean, routing
from colm.moma.addons import Addon
from colm.moma.retrieval_routing import RetrievalRouting
from colm.moma.sizes import resolve_size
from colm.utils.coerce import as_bool


def _indexed_name(param, index):
    """`<param>__<index>`: expert `index`'s parameter inside its addon, spelled by colm/formats/keys.py."""
    key = keys.IndexedKey("m", param, index)
    return key.key[len(key.prefix):]


def _index_of(param, name):
    """The expert index of a parameter name inside an addon (`layer1__3` -> 3 for param "layer1"), else None."""
    parsed = keys.parse_indexed(keys.IndexedKey("m", param, 0).prefix + name)
    return parsed.index if parsed is not None and parsed.param == param else None


class MoELink:
    """Ties one router to its expert layers; holds the number of experts (indexed 0..N-1)."""

    def __init__(self):
        self.size = 0
        self.members = []

    def __len__(self):
        return self.size

    def extend(self, num_new_experts, weight_init="from_scratch"):
        self.size += num_new_experts
        for member in self.members:
            member.grow(num_new_experts, weight_init)

    def adopt(self, count, source):
        """Sets the experts a checkpoint defines (indices 0..count-1) on a link that has none yet."""
        if self.size:
            if count > self.size:
                raise ValueError(f"{source} holds {count} experts but the model already has {self.size}; load it "
                                 "into a model without experts (no extend_moe).")
            return
        self.size = count
        for member in self.members:
            member.grow(count, "from_scratch")


class ExtendableAddon(Addon):
    """An addon whose parameters listed in `stacked` have one row per expert of its MoELink."""

    stacked: tuple = ()

    def __init__(self, global_hidden_dict, host_name, link):
        super().__init__(global_hidden_dict, host_name)
        self.link = link
        link.members.append(self)
        self.register_state_dict_post_hook(ExtendableAddon._split_experts)
        self.register_load_state_dict_pre_hook(ExtendableAddon._stack_experts)

    # --- per-expert keys <-> stacked parameters --------------------------------------------------
    @staticmethod
    def _split_experts(module, state_dict, prefix, local_metadata):
        for name in module.stacked:
            stacked = state_dict.pop(prefix + name)
            for index in range(len(module.link)):
                state_dict[prefix + _indexed_name(name, index)] = stacked[index]

    @staticmethod
    def _stack_experts(module, state_dict, prefix, *args):
        for name in module.stacked:
            names = [prefix + _indexed_name(name, index) for index in range(len(module.link))]
            present = [k in state_dict for k in names]
            if not any(present):
                continue
            if not all(present):
                missing = [k for k, p in zip(names, present) if not p]
                raise KeyError(f"Checkpoint has some experts of {prefix}{name} but not {missing[:3]}.")
            state_dict[prefix + name] = torch.stack([state_dict.pop(k) for k in names])

    def prepare_load(self, prefix, state_dict):
        name = self.stacked[0]
        indices = [index for key in state_dict if key.startswith(prefix)
                   and (index := _index_of(name, key[len(prefix):])) is not None]
        if indices:
            keys.check_contiguous(indices, prefix + name)
            self.link.adopt(len(indices), prefix + name)
            self.match_checkpoint_shapes(state_dict[prefix + _indexed_name(name, 0)])

    def match_checkpoint_shapes(self, first):
        """Adapts to the checkpoint's tensor for expert 0 of stacked[0] (e.g. its rank)."""

    def grow(self, num_new, weight_init):
        for name in self.stacked:
            old = getattr(self, name)
            if weight_init == "average" and old.shape[0] > 0:
                new_rows = old.detach().mean(dim=0, keepdim=True).expand(num_new, *old.shape[1:])
            elif weight_init in ("from_scratch", "average"):
                new_rows = self.fresh_rows(name, num_new).to(old.device, old.dtype)
            else:
                raise ValueError(f"extend_moe.weight_init={weight_init!r}; choose 'from_scratch' or 'average'.")
            # The first experts are the new rows themselves: no module-sized copy (loading 166 experts at once)
            rows = new_rows.contiguous() if old.shape[0] == 0 else torch.cat([old.detach(), new_rows])
            setattr(self, name, nn.Parameter(rows, requires_grad=old.requires_grad))

    def fresh_rows(self, name, num_new):
        raise NotImplementedError


@gin.configurable
class Router(ExtendableAddon):
    """Routing probabilities over the link's experts from an exposed hidden state.

    score_type: a name in routing.SCORE_TYPES ("original": standardise both sides, the paper's); times
    sqrt(1/d) when scaling_scores. A score type with learned router weights gets a `weights` parameter (d_router,
    init ones). router_type "smear" (softmax) or "top1". is_retriever: retrieval routing instead of scores
    (colm/moma/retrieval_routing.py; d_router is then the library width, retrieval_embedding_dim its row width).

    Centring (beyond the paper): a checkpoint may hold `<module>._addons.router.input_mean` (d_router), the
    router's mean input measured on calibration data (colm/procedures/calibration.py); the scores are then
    those of x - input_mean (routing.router_scores). center_inputs: "auto" (default) centres exactly when the
    loaded checkpoint has the key, so an uncalibrated checkpoint routes as in the paper; False ignores the
    stored means (ablation on a calibrated checkpoint); True requires them.

    Writes the probabilities under its write key and the pre-softmax scores under SCORES_KIND + write_key[1:]
    (decoder routers also append both per generation step under `<key> + ("concatenated",)`).

    sublinear_scoring (inference, many experts; colm/moma/ocean.py): None (default) scores every expert;
    "exact" finds each token's top k through a cluster index of the prepared router vectors (built once per
    load, sublinear_clusters clusters, None: about 2 sqrt(N)), the same experts; "approximate" prunes with a
    looser bound (sublinear_sigmas). Only the top k are scored, so it needs the top-k routing of the experts on
    its link (FFNExperts.topk_value, normalize_topk=True), router_type "smear" and a score type of
    ocean.SCORE_TYPES. It writes the top k under TOPK_KIND + write_key[1:] (FFNExperts take them from there) and,
    under its write key, probabilities that are the renormalised top-k weights and zero elsewhere; no scores.
    Blocks of too few tokens for the index (ocean.searches: decoding steps) are scored as by default.
    """

    stacked = ("expert_embeddings",)
    has_pre_forward = True
    INPUT_MEAN = "input_mean"  # buffer name, so the checkpoint key is <module>._addons.<router addon>.input_mean
    SCORES_KIND = "router_scores"
    TOPK_KIND = "routing_topk"

    def __init__(self, global_hidden_dict, host_name, link, read_key, write_key, host, model_config,
                 on_decoder_tokens=False, d_router=gin.REQUIRED,
                 position="before", router_type="smear", score_type="original", scaling_scores=True,
                 temperature=10.0, elementwise_affine=False, epsilon=1e-6, is_retriever=False,
                 retrieval_embedding_dim=384, center_inputs="auto", sublinear_scoring=None, sublinear_clusters=None,
                 sublinear_sigmas=ocean.DEFAULT_SIGMAS):
        super().__init__(global_hidden_dict, host_name, link)
        if center_inputs == "auto":
            self.center_inputs = "auto"
        else:
            try:
                self.center_inputs = as_bool(center_inputs, "Router.center_inputs")
            except ValueError:
                raise ValueError(f"Router.center_inputs={center_inputs!r}; choose 'auto' (centre when the checkpoint "
                                 "holds input means), True or False.") from None
        if score_type not in routing.SCORE_TYPES:
            raise ValueError(f"Router.score_type={score_type!r}; choose one of {tuple(routing.SCORE_TYPES)}.")
        if router_type not in routing.ROUTER_TYPES:
            raise ValueError(f"Router.router_type={router_type!r}; choose one of {routing.ROUTER_TYPES}.")
        if as_bool(elementwise_affine, "Router.elementwise_affine"):
            raise NotImplementedError("Router.elementwise_affine=True is not supported; use score_type options.")
        if position != "before":
            raise NotImplementedError("Router.position must be 'before'.")
        self.read_key, self.write_key = read_key, write_key
        self.scores_key = (self.SCORES_KIND,) + tuple(write_key[1:])
        self.d_router = d_router = resolve_size(d_router, host, model_config)
        self.retrieval = None
        if as_bool(is_retriever, "Router.is_retriever"):
            self.retrieval = RetrievalRouting(retrieval_embedding_dim, epsilon)
        self.epsilon = epsilon
        self.router_type, self.score_type = router_type, score_type
        self.scaling_scores = as_bool(scaling_scores, "Router.scaling_scores")
        self.temperature = temperature
        self.expert_embeddings = nn.Parameter(torch.zeros(0, d_router))
        learned = routing.SCORE_TYPES[score_type].learned_router_weights
        self.register_parameter("weights", nn.Parameter(torch.ones(d_router)) if learned else None)
        # Routers on decoder tokens also keep every step's weights, so generated tokens can be analysed.
        self.concatenate = on_decoder_tokens
        self._prepared, self._prepared_for = None, None
        # Absent (None: not in the state dict) until a checkpoint with input means is loaded or set_input_mean.
        self.register_buffer(self.INPUT_MEAN, None)
        self.sublinear = None if sublinear_scoring in (None, "None") else sublinear_scoring
        if self.sublinear is not None:
            self._check_sublinear(sublinear_clusters, sublinear_sigmas)
        self.topk_key = (self.TOPK_KIND,) + tuple(write_key[1:])
        self.sublinear_clusters = None if sublinear_clusters in (None, "None") else sublinear_clusters
        self.sublinear_sigmas = sublinear_sigmas
        self._index, self._index_for = None, None

    def _check_sublinear(self, clusters, sigmas):
        if self.sublinear not in ocean.MODES:
            raise ValueError(f"Router.sublinear_scoring={self.sublinear!r}; choose None, 'exact' or 'approximate'.")
        if self.retrieval is not None:
            raise ValueError("Router.sublinear_scoring is for scored routing, not Router.is_retriever=True.")
        ocean.check_score_type(self.score_type, "Router.score_type")
        if self.router_type != "smear":
            raise ValueError(f"Router.sublinear_scoring needs Router.router_type='smear', got {self.router_type!r}.")
        if clusters not in (None, "None") and (isinstance(clusters, bool) or not isinstance(clusters, int)
                                              or clusters < 1):
            raise ValueError(f"Router.sublinear_clusters={clusters!r}; choose None (about 2 sqrt(N)) or an int >= 1.")
        if isinstance(sigmas, bool) or not isinstance(sigmas, (int, float)) or not sigmas > 0:
            raise ValueError(f"Router.sublinear_sigmas={sigmas!r}; choose a number > 0.")

    def fresh_rows(self, name, num_new):
        return torch.zeros(num_new, self.d_router)

    def prepare_load(self, prefix, state_dict):
        super().prepare_load(prefix, state_dict)
        mean = state_dict.get(prefix + self.INPUT_MEAN)
        if mean is not None:
            if self.retrieval is not None:
                raise ValueError(f"{prefix}{self.INPUT_MEAN}: a retrieval router does not centre its inputs; remove "
                                 "the key from the checkpoint.")
            if tuple(mean.shape) != (self.d_router,):
                raise ValueError(f"{prefix}{self.INPUT_MEAN} has shape {tuple(mean.shape)}, the router input has "
                                 f"{self.d_router} features: the means were measured on another model.")
            if self.input_mean is None:  # create the buffer so that load_state_dict fills it
                self.set_input_mean(torch.zeros(self.d_router))

    def set_input_mean(self, mean):
        """Stores (or with None removes) the centring mean (d_router,)."""
        if mean is not None:
            mean = torch.as_tensor(mean, dtype=torch.float32).detach()
            if tuple(mean.shape) != (self.d_router,):
                raise ValueError(f"Router on {self.host_name}: input mean of shape {tuple(mean.shape)}, expected "
                                 f"({self.d_router},).")
            mean = mean.to(self.expert_embeddings.device)
        setattr(self, self.INPUT_MEAN, mean)

    def centring_mean(self):
        """The mean subtracted before scoring, or None (no centring)."""
        if self.center_inputs is False:
            return None
        if self.input_mean is None and self.center_inputs is True:
            raise RuntimeError(
                f"Router on {self.host_name}: Router.center_inputs=True but the checkpoint has no "
                f"{self.host_name}._addons.router.{self.INPUT_MEAN}. Calibrate it first (python "
                "scripts/calibrate_routers.py ..., see colm/procedures/calibration.py) or bind "
                "Router.center_inputs=\"auto\".")
        return self.input_mean

    def match_checkpoint_shapes(self, first):
        if self.retrieval is not None and first.shape[-1] != self.d_router:
            # A retrieval library's width is rows x embedding size: take it from the checkpoint.
            self.d_router = first.shape[-1]
            self.expert_embeddings = nn.Parameter(self.expert_embeddings.new_zeros(len(self.link), self.d_router))

    def _vectors_version(self):
        # _version counts in-place updates (e.g. a load); inference tensors have none and cannot be updated.
        g = self.expert_embeddings
        return g.data_ptr(), None if g.is_inference() else g._version, g.dtype, g.device, tuple(g.shape)

    def _prepare(self, g):
        if self.retrieval is not None:
            return self.retrieval.libraries(g)
        return routing.prepare_router_vectors(g.float(), self.score_type, self.weights)

    def prepared_vectors(self):
        """Prepared router vectors (or retrieval libraries), recomputed only when they change."""
        g = self.expert_embeddings
        if g.requires_grad or self.weights is not None:  # trained: recompute, keep the graph
            return self._prepare(g)
        version = self._vectors_version()
        if self._prepared_for != version:
            with torch.no_grad():
                # detach: "dot" / "arrow" prepare g itself, and a Parameter attribute would join the state dict.
                self._prepared = self._prepare(g).detach()
            self._prepared_for = version
        return self._prepared

    def ocean_index(self):
        """The cluster index of the prepared router vectors (sublinear scoring), rebuilt only when they change."""
        version = self._vectors_version()
        if self._index_for != version:
            with torch.no_grad():
                self._index = ocean.build_index(self._prepare(self.expert_embeddings.detach()), self.sublinear_clusters)
            self._index_for = version
        return self._index

    def _sublinear_topk(self):
        """The k of the top-k routing of the experts on this router's link (checked to be renormalised)."""
        experts = [member for member in self.link.members if isinstance(member, FFNExperts)]
        settings = {(member.topk_value, member.normalize_topk) for member in experts}
        if len(settings) != 1 or next(iter(settings))[0] is None or not next(iter(settings))[1]:
            raise ValueError(
                f"Router on {self.host_name}: Router.sublinear_scoring={self.sublinear!r} scores only the top k, so it "
                "needs FFNExperts.topk_value=<k> and FFNExperts.normalize_topk=True on the experts it routes (got "
                f"topk_value, normalize_topk = {sorted(settings, key=str) or 'no experts'}).")
        return next(iter(settings))[0]

    def _sublinear_forward(self, hidden, mean):
        """Routes through the index; False (nothing written) for a block of too few tokens for it
        (ocean.searches, e.g. a decoding step), which is scored as by default."""
        if torch.is_grad_enabled() and (hidden.requires_grad or self.expert_embeddings.requires_grad):
            raise RuntimeError(f"Router on {self.host_name}: Router.sublinear_scoring is for inference; run under "
                               "torch.no_grad() or freeze the router and its inputs.")
        k, index = self._sublinear_topk(), self.ocean_index()
        if not ocean.searches(index, hidden.numel() // hidden.shape[-1]):
            return False
        indices, weights = ocean.topk_routing(index, hidden, k, self.score_type, self.scaling_scores,
                                              None if mean is None else mean.float(), self.sublinear,
                                              self.sublinear_sigmas)
        probs = weights.new_zeros(*weights.shape[:-1], len(self.link)).scatter_(-1, indices, weights)
        self.global_hidden_dict[self.topk_key] = (indices, weights)
        self.global_hidden_dict[self.write_key] = probs
        if self.concatenate:
            self.global_hidden_dict.setdefault(self.write_key + ("concatenated",), []).append(probs)
        return True

    def pre_forward(self, args, kwargs):
        if len(self.link) == 0:
            raise RuntimeError(f"Router on {self.host_name} has no experts: load a checkpoint or call extend_moe.")
        hidden = self.global_hidden_dict[self.read_key]
        if self.retrieval is not None:
            self.global_hidden_dict[self.write_key] = self.retrieval.route(hidden, self.prepared_vectors())
            return None
        mean = self.centring_mean()
        if self.sublinear is not None and self._sublinear_forward(hidden, mean):
            return None
        scores = routing.router_scores(hidden.float(), self.prepared_vectors(), self.score_type,
                                       self.scaling_scores, self.temperature,
                                       input_mean=None if mean is None else mean.float())
        probs = routing.probs_from_scores(scores, self.router_type)
        self.global_hidden_dict[self.write_key] = probs
        self.global_hidden_dict[self.scores_key] = scores
        if self.concatenate:
            self.global_hidden_dict.setdefault(self.write_key + ("concatenated",), []).append(probs)
            self.global_hidden_dict.setdefault(self.scores_key + ("concatenated",), []).append(scores)
        return None


@gin.configurable
class FFNExperts(ExtendableAddon):
    """LoRA experts beside a linear: adds sum_j w_j (x layer1_j layer2_j) [/ r] to its output.

    topk_value: keep the k most probable experts per token (clamped to N), renormalised if normalize_topk;
    None: every expert with its weight (exact mixture; one expert at weight 1 is the single-expert case).
    learn_input_gate="only_sigmoid": PHATGOOSE gate training; each token's expert input is scaled by
    sigmoid(g . x) with one zero-initialised gate vector g per module (`expert_input_gate`).
    The scale 1/d_bottleneck is the configured rank; a loaded expert keeps its own rank (a merged expert of
    rank N*r still divides by r).
    """

    stacked = ("layer1", "layer2")
    has_post_forward = True

    def __init__(self, global_hidden_dict, host_name, link, read_key, host, model_config, d_in=gin.REQUIRED,
                 d_out=gin.REQUIRED,
                 d_bottleneck=16, non_linearity="identity", normalize_topk=False, topk_value=None,
                 position="beside", residual_connection=False, divide_by_d_bottleneck=False,
                 learn_input_gate=None, use_input_gate=False, init_scale=0.01, epsilon=1e-6):
        super().__init__(global_hidden_dict, host_name, link)
        if non_linearity != "identity" or position != "beside" or residual_connection or use_input_gate:
            raise NotImplementedError(
                "FFNExperts supports non_linearity='identity', position='beside', no residual_connection and "
                "use_input_gate=False (the PHATGOOSE settings)."
            )
        if learn_input_gate not in (None, "None", "only_sigmoid"):
            raise NotImplementedError(f"FFNExperts.learn_input_gate={learn_input_gate!r}; use 'only_sigmoid' or None.")
        self.read_key = read_key
        d_in, d_out = resolve_size(d_in, host, model_config), resolve_size(d_out, host, model_config)
        self.d_in, self.d_out, self.d_bottleneck = d_in, d_out, d_bottleneck
        self.topk_value = None if topk_value in (None, "None") else int(topk_value)
        self.normalize_topk = as_bool(normalize_topk, "FFNExperts.normalize_topk")
        self.scale = 1.0 / d_bottleneck if as_bool(divide_by_d_bottleneck, "FFNExperts.divide_by_d_bottleneck") else 1.0
        self.init_scale, self.epsilon = init_scale, epsilon
        self.layer1 = nn.Parameter(torch.zeros(0, d_in, d_bottleneck))
        self.layer2 = nn.Parameter(torch.zeros(0, d_bottleneck, d_out))
        self.learn_input_gate = learn_input_gate == "only_sigmoid"
        if self.learn_input_gate:
            self.expert_input_gate = nn.Parameter(torch.zeros(d_in))

    def fresh_rows(self, name, num_new):
        rank = self.layer1.shape[2]
        if name == "layer1":
            return torch.randn(num_new, self.d_in, rank).mul_(self.init_scale)
        return torch.zeros(num_new, rank, self.d_out)

    def match_checkpoint_shapes(self, first):
        if first.dim() == 2 and first.shape[1] != self.layer1.shape[2]:
            rank = first.shape[1]  # e.g. a merged expert of rank N*r
            self.layer1 = nn.Parameter(self.layer1.new_zeros(len(self.link), self.d_in, rank))
            self.layer2 = nn.Parameter(self.layer2.new_zeros(len(self.link), rank, self.d_out))

    def routing_weights(self, rows, length):
        """(indices, weights) of shape (rows, length, k) from the router's output (its top k if it wrote them,
        Router.sublinear_scoring)."""
        chosen = self.global_hidden_dict.get((Router.TOPK_KIND,) + tuple(self.read_key[1:]))
        if chosen is not None:
            return tuple(_per_token(values, rows, length) for values in chosen)
        probs = _per_token(self.global_hidden_dict[self.read_key], rows, length)
        if self.topk_value is not None:
            return routing.topk_weights(probs, self.topk_value, self.normalize_topk, self.epsilon)
        # Every expert with its weight; experts at weight 0 (e.g. one-hot retrieval routing) are skipped.
        used = int((probs > 0).sum(dim=-1).max())
        if used < probs.shape[-1]:
            return routing.topk_weights(probs, max(used, 1), normalize_topk=False)
        experts = torch.arange(probs.shape[-1], device=probs.device).expand_as(probs)
        return experts, probs

    def post_forward(self, args, kwargs, output):
        x = args[0] if args else kwargs["input"]
        if x.dim() == 2:
            x = x.unsqueeze(1)
        indices, weights = self.routing_weights(x.shape[0], x.shape[1])
        if self.learn_input_gate:
            gate = torch.sigmoid(x.to(self.expert_input_gate.dtype) @ self.expert_input_gate)
            x = x * gate.unsqueeze(-1).to(x.dtype)
        grad = torch.is_grad_enabled() and (x.requires_grad or self.layer1.requires_grad or self.layer2.requires_grad)
        if not grad:  # inference: accumulate into the host's output in place
            return routing.routed_lora(x, self.layer1, self.layer2, indices, weights, self.scale,
                                       out=output.view(x.shape[:-1] + (output.shape[-1],))).view(output.shape)
        delta = routing.routed_lora(x, self.layer1, self.layer2, indices, weights, self.scale)
        return output + delta.view(output.shape).to(output.dtype)


def _per_token(values, rows, length):
    """Router output (examples or rows, [length,] n) as (rows, length, n)."""
    if values.shape[0] != rows:  # rank classification repeats each example once per answer choice
        values = values.repeat_interleave(rows // values.shape[0], dim=0)
    if values.dim() == 2:  # one distribution per example: every token gets it
        values = values[:, None, :].expand(rows, length, values.shape[-1])
    return values


def _nearest(name, candidates):
    """The candidate sharing the longest common prefix with `name` (ties: the shorter candidate)."""
    def common(a, b):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    return max(candidates, key=lambda c: (common(name, c), -len(c)))


@gin.configurable
def make_moe(model, expert_class="ffn", expert_modules=gin.REQUIRED, router_modules=gin.REQUIRED,
             expert_addon_name="expert", router_addon_name="router", expose_hiddens_addon_name="expose_hiddens"):
    if expert_class != "ffn":
        raise NotImplementedError(f"make_moe.expert_class={expert_class!r}; only 'ffn' (LoRA experts) is supported.")
    exposers = model.addons.get(expose_hiddens_addon_name, {})
    if not exposers:
        raise ValueError(f"make_moe: no '{expose_hiddens_addon_name}' addons; call watch_hiddens first.")
    config = model.torch_model.config
    routers = {}
    for name, host in model.match_modules(router_modules).items():
        source = _nearest(name, list(exposers))
        router = Router(model.global_hidden_dict, name, MoELink(), exposers[source].write_key,
                        ("routing_weights", router_addon_name, name), host, config,
                        on_decoder_tokens=model.token_side(name) == "decoder")
        model.insert_addon(name, router_addon_name, router, order="last")
        routers[name] = router
    if not routers:
        raise ValueError(f"make_moe: router_modules={router_modules!r} matches no module.")
    order = "inner" if "lora" in expert_addon_name else "last" if "adapter" in expert_addon_name else None
    if order is None:
        raise ValueError(f"make_moe.expert_addon_name={expert_addon_name!r} must contain 'lora' or 'adapter'.")
    all_routers = {**model.addons.get(router_addon_name, {}), **routers}
    experts = model.match_modules(expert_modules)
    if not experts:
        raise ValueError(f"make_moe: expert_modules={expert_modules!r} matches no module.")
    for name, host in experts.items():
        router = all_routers[_nearest(name, list(all_routers))]
        addon = FFNExperts(model.global_hidden_dict, name, router.link, router.write_key, host, config)
        model.insert_addon(name, expert_addon_name, addon, order=order)


@gin.configurable
def extend_moe(model, num_new_experts=gin.REQUIRED, weight_init="from_scratch", router_addon_name="router",
               identifier_stem=""):
    """Adds num_new_experts experts after the existing ones (indices N..N+num_new_experts-1)."""
    if identifier_stem != "":
        raise ValueError(f"extend_moe.identifier_stem={identifier_stem!r}: experts are numbered 0..N-1 without a "
                         "stem (checkpoint keys <param>__<index>, colm/formats/keys.py); leave it \"\".")
    routers = model.addons.get(router_addon_name, {})
    if not routers:
        raise ValueError(f"extend_moe: no '{router_addon_name}' addons; call make_moe first.")
    for router in routers.values():
        router.link.extend(num_new_experts, weight_init)


def expert_count(model, router_addon_name="router"):
    counts = {len(r.link) for r in model.addons.get(router_addon_name, {}).values()}
    return counts.pop() if len(counts) == 1 else sorted(counts)
