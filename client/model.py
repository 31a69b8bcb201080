"""The user's model: the transformers class of the checkpoint, with its decoder layers remote.

Embeddings, final norm and lm_head load locally (on the CPU, or a GPU with ``device=``); a
``RemoteDecoder`` takes the base model's place and sends hidden states through a chain of nodes
(they leave the local device as CPU tensors and come back to it), so ``generate()``, logits processors and
sampling are transformers' own. Inside ``model.inference_session(...)`` several ``generate``
calls continue one conversation: tokens the nodes already hold are not sent again.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import logging
import operator
import threading
from typing import Iterator, Sequence

import torch
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import MoeModelOutputWithPast

from potluck.protocol.checkpoint import DTYPES, Checkpoint, config_id, load_tensors, resolve_checkpoint
from potluck.protocol.devices import resolve_device
from potluck.protocol.errors import BadRequest
from potluck.protocol.families import CACHE_ARG
from potluck.protocol.network import initial_peers_from_env

from .packed_head import packed_head
from .swarm_view import FailoverPolicy, SwarmView
from .session import InferenceSession
from .transport import SwarmConnection

logger = logging.getLogger(__name__)


class RemoteCache(Cache):
    """Stands in for the attention cache, which lives on the nodes: it only knows its length."""

    def __init__(self, session: InferenceSession):
        super().__init__(layers=[])
        self.session = session

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.session.position

    def __bool__(self) -> bool:  # it holds no layers here, yet it is a cache (Phi-3's generate asks `if cache`)
        return True

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_linear(self) -> list[bool]:
        return [False]  # attention, not a state-space cache: generate slices the tokens the nodes hold

    @property
    def is_sliding(self) -> list[bool]:
        return [False]


class RemoteDecoder(torch.nn.Module):
    """Replaces the base model (e.g. LlamaModel): embeddings → remote blocks → final norm."""

    def __init__(self, embed_tokens: torch.nn.Module, norm: torch.nn.Module, view: SwarmView):
        super().__init__()
        self.embed_tokens, self.norm, self.view = embed_tokens, norm, view

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, use_cache=None,
                **kwargs) -> MoeModelOutputWithPast:
        past_key_values = kwargs.get(CACHE_ARG)
        if (input_ids is None) == (inputs_embeds is None):
            raise BadRequest("pass exactly one of input_ids or inputs_embeds")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [B, T, H]
        if hidden.dim() != 3 or hidden.shape[1] == 0:
            raise BadRequest(f"the input must be [batch, tokens] ids (or [batch, tokens, hidden] embeddings) with at "
                             f"least one token, got {tuple(hidden.shape[:-1])}")
        session = past_key_values.session if isinstance(past_key_values, RemoteCache) else None
        prefix = session.position if session is not None else 0
        if position_ids is None:  # positions only travel to the nodes: built on the CPU, the wire's side
            position_ids = torch.arange(prefix, prefix + hidden.shape[1]).unsqueeze(0)
        position_ids = position_ids.expand(hidden.shape[0], -1).to("cpu", torch.int64).contiguous()
        mask = None
        if attention_mask is not None and attention_mask.ndim == 2 and not bool(attention_mask.all()):
            mask = attention_mask.to("cpu", torch.int64)  # padding present: the nodes need it
        with torch.no_grad():
            wire = hidden.cpu()  # what the nodes get; they answer in the same dtype
            if session is None:
                out = self.view.forward(wire, position_ids, mask)
            else:
                out = session.step(wire, position_ids, mask)
                if input_ids is not None:
                    previous = session.token_ids if session.token_ids is not None else input_ids[:, :0]
                    session.token_ids = torch.cat([previous[:, :prefix], input_ids], dim=1)
            hidden = out.to(hidden.device)
        # the MoE output class: mixture-of-experts heads read router_logits (None: the routers run on the nodes)
        return MoeModelOutputWithPast(last_hidden_state=self.norm(hidden), **{CACHE_ARG: past_key_values})


class DistributedModelMixin:
    """Mixed into the checkpoint's ``*ForCausalLM`` class by ``AutoDistributedModelForCausalLM``."""

    swarm_view: SwarmView  # the swarm of this model as this client sees it: records, bans, routes
    _local: threading.local  # the active session is per thread, so threads can share one model

    @property
    def _active_session(self) -> InferenceSession | None:
        return getattr(self._local, "session", None)

    @contextlib.contextmanager
    def inference_session(self, max_length: int) -> Iterator[InferenceSession]:
        """Keep the attention caches on the nodes across ``generate`` calls (in this thread), up to
        ``max_length`` tokens."""
        if self._active_session is not None:
            raise BadRequest("an inference session is already active on this model in this thread")
        if isinstance(max_length, bool) or _whole(max_length) is None or _whole(max_length) < 1:
            raise BadRequest(f"max_length={max_length!r}: pass the whole number of tokens the session holds, at "
                             "least 1")
        max_length = _whole(max_length)
        positions = getattr(self.config, "max_position_embeddings", None)
        if positions and max_length > positions:
            raise BadRequest(f"{max_length} tokens in all (a session's max_length, or a generate call's prompt and "
                             f"new tokens) are more than this model's {positions} positions: ask for fewer")
        with InferenceSession(self.swarm_view, max_length) as session:
            self._local.session = session
            try:
                yield session
            finally:
                self._local.session = None

    def close(self) -> None:
        """Leave the swarm: open sessions end on the nodes, and calls after this fail at once (a
        program that never calls it leaves the swarm at exit)."""
        self.swarm_view.swarm.close()

    def _forward_continuing(self, base_forward, signature: inspect.Signature, args: tuple, kwargs: dict):
        """The checkpoint class's ``forward`` (``base_forward``, of ``signature``); inside
        ``inference_session`` a call continues the session (its tokens join the conversation on
        the nodes), as ``generate`` calls do."""
        bound = signature.bind(self, *args, **kwargs)
        given = bound.arguments
        extra = given.get("kwargs", {})  # a forward's **kwargs, where it has them
        for name in ("output_hidden_states", "output_attentions"):
            if given.get(name) or extra.get(name):
                raise BadRequest(f"{name}=True: the decoder layers run on the nodes, which send back only the last "
                                 "one's output; leave it out")
        session = self._active_session
        if given.get(CACHE_ARG) is None and session is not None:
            if getattr(self._local, "generating", False):  # the model's generate dropped its cache on purpose
                session.rewind(0)  # (Phi-3 past its rope switch): the whole sequence comes again, from the start
            given[CACHE_ARG] = RemoteCache(session)
        elif given.get(CACHE_ARG) is None and given.get("use_cache"):
            raise BadRequest("use_cache=True: the attention cache stays on the nodes; to go on from earlier calls, "
                             "call the model inside `with model.inference_session(max_length=N):`")
        return base_forward(*bound.args, **bound.kwargs)

    def generate(self, inputs: torch.Tensor | None = None, *args, **kwargs):
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        input_ids = None if input_ids is None else input_ids.to(self.device)  # the local part's device
        if input_ids is not None and input_ids.shape[-1] == 0:
            raise BadRequest("input_ids holds no tokens: give at least one (a BOS token, say)")
        for name in ("max_new_tokens", "max_length"):
            value = kwargs.get(name)
            if value is None:
                continue
            if isinstance(value, bool) or _whole(value) is None or _whole(value) < 1:
                raise BadRequest(f"{name}={value!r}: pass a whole number of tokens, at least 1")
            kwargs[name] = _whole(value)  # numpy's or torch's whole numbers as the int every part expects
        for name in ("attention_mask", "inputs_embeds"):
            if isinstance(kwargs.get(name), torch.Tensor):
                kwargs[name] = kwargs[name].to(self.device)
        lengths = self._generation_settings(kwargs)
        session = self._active_session
        mask = kwargs.get("attention_mask")
        fresh = session is None or session.token_ids is None or session.position == 0
        if fresh and input_ids is not None and isinstance(mask, torch.Tensor) and mask.shape != input_ids.shape:
            raise BadRequest(f"attention_mask of shape {tuple(mask.shape)} does not match input_ids' "
                             f"{tuple(input_ids.shape)}")
        if session is None:
            prompt = input_ids.shape[1] if input_ids is not None else kwargs["inputs_embeds"].shape[1]
            with self.inference_session(lengths.total(prompt)) as session:
                return self._generate_in(session, input_ids, lengths, args, kwargs)
        return self._generate_in(session, input_ids, lengths, args, kwargs)

    def _generation_settings(self, kwargs: dict) -> "Lengths":
        """Reads the settings ``generate`` will use (``generation_config=``, then keyword arguments,
        over the model's own and transformers' defaults): refuses what the swarm cannot do, and
        returns the lengths they ask for."""
        given = kwargs.get("generation_config")
        settings, _ = self._prepare_generation_config(given, **{k: v for k, v in kwargs.items()
                                                                if k != "generation_config"})
        if (settings.num_beams or 1) != 1:
            raise BadRequest("beam search is not supported through the swarm yet; use num_beams=1")
        if settings.use_cache is False:
            raise BadRequest("use_cache=False: the swarm always keeps the attention cache on the nodes; leave it out")
        if getattr(settings, "cache_implementation", None) not in (None, "dynamic"):
            raise BadRequest(f"cache_implementation={settings.cache_implementation!r}: the attention cache lives on the "
                             "nodes, in their own layout; leave it out")
        for name in ("output_hidden_states", "output_attentions"):
            if getattr(settings, name, False):
                raise BadRequest(f"{name}=True: the decoder layers run on the nodes, which send back only the last "
                                 "one's output; leave it out")
        unset = kwargs.get("max_length") is None and getattr(given, "max_length", None) is None \
            and self.generation_config.max_length is None  # as transformers' generate tells a default length
        return Lengths(settings.max_new_tokens, settings.max_length, unset,
                       getattr(self.config, "max_position_embeddings", None))

    def _generate_in(self, session: InferenceSession, input_ids, lengths: Lengths, args, kwargs):
        given_mask = kwargs.get("attention_mask")
        if input_ids is not None and session.token_ids is not None and session.position > 0:
            input_ids, mask = self._continue_conversation(session, input_ids, given_mask)
            if mask is None:
                kwargs.pop("attention_mask", None)
            else:
                kwargs["attention_mask"] = mask
        if input_ids is not None:
            needed = lengths.total(input_ids.shape[1])
            if needed > session.max_length:
                raise BadRequest(f"{input_ids.shape[1]} tokens so far and the new ones make {needed}, more than this "
                                 f"session's max_length={session.max_length}: ask for fewer new tokens, or open the "
                                 "session with a larger max_length")
        kwargs[CACHE_ARG] = RemoteCache(session)
        self._local.generating = True
        try:
            output = super().generate(input_ids, *args, **kwargs)
        finally:
            self._local.generating = False
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        session.token_ids = sequences  # the last token is not in the nodes' caches yet
        mask = kwargs.get("attention_mask")
        if mask is not None and input_ids is not None and not bool(mask.all()):  # padding the next call keeps
            new = sequences.shape[1] - mask.shape[1]
            mask = mask.to(torch.int64)
            session.attention_mask = torch.cat([mask, mask.new_ones(mask.shape[0], new)], 1)
        else:
            session.attention_mask = None
        return output

    @staticmethod
    def _continue_conversation(session: InferenceSession, input_ids: torch.Tensor,
                               given_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Full ids for this call and their attention mask (None: no padding): the conversation so
        far plus ``input_ids`` if they are only new tokens, else ``input_ids`` themselves, with the
        nodes' caches rewound to the longest prefix they share with them. The conversation's
        padding (a left-padded batch) stays masked; a mask given for the full ids is taken as it is."""
        held = session.token_ids
        if input_ids.shape[0] != held.shape[0]:
            raise BadRequest(f"batch of {input_ids.shape[0]} does not match the session's {held.shape[0]}")
        n = min(held.shape[1], input_ids.shape[1])
        same = (held[:, :n] == input_ids[:, :n]).all(dim=0)
        common = int(same.long().cumprod(0).sum())
        if common == 0:  # only new tokens: append them to the conversation
            full = torch.cat([held, input_ids], dim=1)
        else:
            common = min(common, input_ids.shape[1] - 1)  # generate must feed at least one token
            if common < session.position:
                session.rewind(common)
            full = input_ids
        if given_mask is not None and given_mask.shape[1] == full.shape[1]:
            mask = given_mask
        elif session.attention_mask is not None:
            kept = session.attention_mask[:, :min(held.shape[1], full.shape[1])]
            mask = torch.cat([kept, kept.new_ones(kept.shape[0], full.shape[1] - kept.shape[1])], 1)
        else:
            mask = None
        return full, None if mask is None or bool(mask.all()) else mask.to(full.device)


@dataclasses.dataclass(frozen=True)
class Lengths:
    """How long a generate call may make the conversation, as transformers counts it."""

    new_tokens: int | None  # max_new_tokens, where set
    max_length: int  # max_length: set, or transformers' default
    default: bool  # nobody set a length: transformers generates ``max_length`` new tokens (within the positions)
    positions: int | None  # the model's max_position_embeddings

    def total(self, prompt: int) -> int:
        """Tokens a call after ``prompt`` tokens may reach: what a session must hold for it."""
        if self.new_tokens is not None:
            return prompt + self.new_tokens
        if self.default:
            return min(prompt + self.max_length, self.positions or prompt + self.max_length)
        return max(self.max_length, prompt + 1)


class AutoDistributedModelForCausalLM:
    """``from_pretrained(MODEL, initial_peers=[...])`` → the model's transformers class, run by the swarm."""

    @classmethod
    def from_pretrained(cls, model: str | None = None, initial_peers: Sequence[str] | None = None, *,
                        model_name: str | None = None, dtype: str | torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", node_dtypes: Sequence[str] | None = None,
                        mix_dtypes: bool = False, request_timeout: float = 5.0, route_wait: float = 60.0,
                        policy: FailoverPolicy | None = None,
                        handoff: bool = True, verify: float = 0.0, allow_quantized: bool = False,
                        swarm: SwarmConnection | None = None) -> PreTrainedModel:
        """The model whose decoder layers run through the swarm.

        ``dtype``/``device``: of the local part (embeddings, final norm, lm_head); the CPU serves
        people without a GPU. ``node_dtypes``: route only through nodes computing in these (None:
        any). ``mix_dtypes``: let one chain combine nodes of different dtypes (off: each session
        keeps to one dtype, the fastest available). ``verify``: the share of steps checked against
        other replicas of each node's blocks (``verification``); a node caught computing wrong is
        banned and the step redone without it. Suspicious outputs are checked whatever the share.
        ``allow_quantized``: route through nodes holding 8- or 4-bit weights too (``potluck node
        --quant``), whose results are close to the model's but not exact (off: never).
        ``route_wait``: seconds a session that lost the only node of some blocks waits for another
        node to take them (self-placing nodes do) before failing; 0: fail at once. ``policy``, if
        given, sets every failover setting instead (``request_timeout`` and ``route_wait`` too)."""
        checkpoint = resolve_checkpoint(model, model_name)
        if isinstance(dtype, str) and dtype not in DTYPES:
            raise BadRequest(f"dtype {dtype!r} is not one the local part runs in; pick from {', '.join(DTYPES)}")
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        policy = policy or FailoverPolicy(request_timeout=request_timeout, route_wait=route_wait)  # checks them
        if isinstance(verify, bool) or not isinstance(verify, (int, float)) or not 0.0 <= verify <= 1.0:
            raise BadRequest(f"verify={verify!r}: pass the share of steps to check, a number from 0 (none) to 1 "
                             "(every step)")
        if isinstance(node_dtypes, str):  # one dtype, not its letters
            node_dtypes = [node_dtypes]
        unknown = set(node_dtypes or ()) - set(DTYPES)
        if unknown:
            raise BadRequest(f"node_dtypes {sorted(unknown)} are not dtypes nodes use; pick from {', '.join(DTYPES)}")
        local_device = resolve_device(device, option="device")  # before joining: a device not here is one line
        swarm = swarm or SwarmConnection(initial_peers_from_env(initial_peers))
        view = SwarmView(swarm, checkpoint.name, checkpoint.num_blocks, policy, handoff,
                          dtypes=frozenset(node_dtypes) if node_dtypes else None, mix_dtypes=mix_dtypes,
                          verify=verify, allow_quantized=allow_quantized, config_id=config_id(checkpoint.config))
        return build_local_part(checkpoint, view, dtype, local_device)


def _whole(value) -> int | None:
    """``value`` as an int where it is a whole number's type (an int, numpy's, a 0-d int tensor)."""
    try:
        return operator.index(value)
    except TypeError:
        return None


def build_local_part(checkpoint: Checkpoint, view: SwarmView, dtype: torch.dtype,
                     device: torch.device) -> PreTrainedModel:
    """The checkpoint's ``*ForCausalLM`` with its embeddings, norm and lm_head on ``device`` and a
    ``RemoteDecoder`` over ``view`` in place of its decoder layers."""
    config = checkpoint.config
    base_cls = AutoModelForCausalLM._model_mapping[type(config)]
    signature = inspect.signature(base_cls.forward)

    @functools.wraps(base_cls.forward)  # generate reads which arguments forward takes from its signature
    def forward(self, *args, **kwargs):
        return self._forward_continuing(base_cls.forward, signature, args, kwargs)

    dist_cls = type(f"Distributed{base_cls.__name__}", (DistributedModelMixin, base_cls), {"forward": forward})
    shell_config = copy.deepcopy(config)  # built without decoder layers: they are remote
    shell_config.num_hidden_layers = 0
    if getattr(shell_config, "layer_types", None) is not None:
        shell_config.layer_types = []
    with init_empty_weights(include_buffers=False):  # weights come below; computed buffers are made here
        model = dist_cls(shell_config)
    model.config = config
    tied = getattr(config, "tie_word_embeddings", False)
    names = ["model.embed_tokens.weight", "model.norm.weight"] + ([] if tied else ["lm_head.weight"])
    weights = load_tensors(checkpoint.path, names, dtype, device)
    model.model.embed_tokens.load_state_dict({"weight": weights["model.embed_tokens.weight"]}, assign=True)
    model.model.norm.load_state_dict({"weight": weights["model.norm.weight"]}, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    else:
        model.lm_head.load_state_dict({"weight": weights["lm_head.weight"]}, assign=True)
    model.lm_head = packed_head(model.lm_head)
    model.model = RemoteDecoder(model.model.embed_tokens, model.model.norm, view).to(device)  # and its buffers
    model.swarm_view, model._local = view, threading.local()
    if (checkpoint.path / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(checkpoint.path)
    else:
        model.generation_config = GenerationConfig.from_model_config(config)
    loaded = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    computed = {f"{prefix}.{name}" if prefix else name for prefix, module in model.named_modules()
                for name in module._non_persistent_buffers_set}  # e.g. Gemma 3's embedding scale
    leftover = [n for n, _ in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]
                if n not in loaded and n not in computed]
    if leftover:
        raise BadRequest(f"{base_cls.__name__} has local weights Potluck does not load: {leftover[:5]}")
    return model.eval()
