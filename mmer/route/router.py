"""Run every modality of a decoupled checkpoint from one copy of the LLM: switch by rebuilding from θ_base.

Retention mode (docs/method.md §4): the model of modality i is θ_base + mᵢ∘τ* with its own encoder and
projector. :class:`Router` keeps θ_base, τ* and the packed masks on the device and one set of *live* LLM
weights that every modality's transformers model is bound to (their LLM parameters are views of it). Switching
to modality i rewrites the live weights from θ_base with ``mmer.merge.masks.rebuild_weight``, never by
subtracting the previous modality's delta, so nothing drifts however many times it switches (a bf16
``(θ + δ) − δ`` is not θ); a tensor whose mask and rows are the same for both modalities is left as it is.

Memory on the device: θ_base + live weights (two LLMs in the base's dtype) + τ* + n bits per parameter + the
components; ``base_device="cpu"`` moves θ_base to pinned host memory and streams it per tensor on a switch.
For a 7B LLM in bf16 with two modalities that is 13.5 GB × 3 + 2 × 0.84 GB ≈ 42 GB on one GPU (28 GB with the
base on the host). Expansion mode uses the same live weights for its text weights (``MEAN`` state).

On a GPU: ``Router.from_pretrained(path, device="cuda")``; tensors are read through the CPU once, then every
switch runs on the device (mask bits unpacked there with ``mmer.checkpoint.bits.unpack``). Models are built
with accelerate's ``init_empty_weights``, so no LLM is ever allocated per modality. An LLM larger than one
GPU: ``device_map="auto"`` (or an explicit map, and ``max_memory``) places each weight, with its θ_base, τ*
and masks, on one device and hooks every model with accelerate; see :mod:`mmer.route.placement`.

Mixture-of-Experts fine-tunes saved by transformers 5's ``save_pretrained`` store each expert on disk
(``block_sparse_moe.experts.E.w1.weight``) but are held fused in memory (``mlp.experts.gate_up_proj``): the
checkpoint keeps τ* and the masks per on-disk tensor, the live weights are the in-memory parameters, and each
on-disk tensor is rebuilt straight into its slice of them (:attr:`Router.targets`, :mod:`mmer.route.live_layout`).

MoExtend extension packs trained on the same MoE base are routed beside the modalities by name
(``Router.from_pretrained(path, packs={"digits": "pack/"})`` or :meth:`Router.add_extension`): routing to
one puts θ_base itself in the live weights and runs the pack's extended LM; see :mod:`mmer.route.packs`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mmer.checkpoint.decoupled import DecoupledCheckpoint, load_decoupled
from mmer.errors import ConfigError, LayoutError
from mmer.io.layouts import Layout, is_vocab_tensor
from mmer.route import arena
from mmer.route.live_layout import LiveLayout, identity, live_layout
from mmer.route.models import (
    RoutingInputError,
    attach_generation_config,
    bind_model,
    check_device,
    decoder_module,
    empty_model,
    llm_layout,
    load_config,
    model_class,
    placeholder_ids,
)
from mmer.route.placement import dispatch, main_device, model_map, place_llm, slot_devices
from mmer.route.weights import BASE, MEAN, STATES, DeviceWeights

if TYPE_CHECKING:
    from mmer.route.expansion import ExpansionModel
    from mmer.route.packs import PackModality


class ModalityModel:
    """One modality's transformers model as the router built it, with what expansion mode needs to know."""

    def __init__(self, name: str, model: torch.nn.Module, layout: Layout, config: Any, directory: Path) -> None:
        self.name = name
        self.model = model
        self.layout = layout
        self.config = config
        self.directory = directory
        self.placeholders = placeholder_ids(config)
        self.unused_components: list[str] = []

    @property
    def decoder(self) -> torch.nn.Module:
        """The LLM decoder module inside the model (where expansion mode reads the input embeddings)."""
        return decoder_module(self.model, self.layout)


class Router:
    """Every modality's model on one device, sharing one LLM; ``router(**inputs, modality="vision")``.

    Build it with :meth:`from_pretrained`. The model :meth:`use` returns is valid until the next switch (its
    LLM parameters are views of the shared live weights). A route is an MMER modality or an extension pack;
    :attr:`active` names the active route, :attr:`state` the weights the live tensors hold (a modality,
    ``BASE`` for every pack, ``MEAN`` for expansion mode).
    """

    def __init__(
        self,
        ckpt: DecoupledCheckpoint,
        weights: DeviceWeights,
        live: dict[str, torch.Tensor],
        models: dict[str, ModalityModel],
        device_map: dict[str, Any] | None = None,
        live_layout: LiveLayout | None = None,
    ) -> None:
        self.ckpt = ckpt
        self.weights = weights
        self.live = live  # in-memory (canonical) parameter name → the live tensor every model is bound to
        self.live_layout = identity(live) if live_layout is None else live_layout
        # checkpoint tensor (slot) → its view of the live tensors: the whole tensor, or its expert's slice
        self.targets = {slot: part.view(live[part.param]) for slot, part in self.live_layout.parts.items()}
        self.models = models
        self.device_map = device_map  # canonical module name → device, when the LLM is spread (placement.py)
        self.packs: dict[str, PackModality] = {}
        self.active: str | None = None
        self.state: str | None = None
        self.switches = 0
        self.last_switch_seconds = 0.0
        self.last_switch_rebuilt = 0
        # what each step of from_pretrained took, in order (wall and CPU seconds of this process; see _Clock)
        self.load_seconds: dict[str, float] = {}
        self.load_cpu_seconds: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------- building
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        *,
        modalities: Sequence[str] | None = None,
        base_device: str | torch.device | None = None,
        device_map: str | Mapping[str, Any] | None = None,
        max_memory: Mapping[Any, Any] | None = None,
        model_classes: dict[str, type] | None = None,
        activate: str | None = None,
        packs: Mapping[str, str | Path] | Sequence[str | Path] | None = None,
        check_base_model: str = "full",
        revision: str | None = None,
    ) -> Router:
        """Open a decoupled checkpoint and build every modality's model on ``device``.

        Args:
            path: the output directory of ``mmer merge``, or its Hub id (``org/name``; only the files of the
                loaded modalities are fetched, from the local cache alone when ``HF_HUB_OFFLINE=1``).
            device: where the live LLM, τ*, masks and components go (``"cuda"``, ``"cuda:1"``, ``"cpu"``, the
                default); give ``device_map`` instead to spread the LLM over several devices.
            modalities: which modalities to load (all by default); also the masks m̄ averages in expansion mode.
            base_device: where θ_base stays (``device`` by default; ``"cpu"`` saves one LLM of GPU memory).
            device_map: ``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"`` or an explicit map of
                the base causal LM's module names to devices, as accelerate takes it; every tensor of a weight
                lives, and is rebuilt, on that weight's device (:mod:`mmer.route.placement`). No ``"disk"``.
            max_memory: per-device budgets for the computed maps (``{0: "70GiB", "cpu": "200GiB"}``), for all
                the router holds there (live weights, θ_base, τ*, masks).
            model_classes: a transformers class per modality, where ``config.architectures`` names none.
            activate: the route made active first (the first modality by default, else the first pack).
            packs: MoExtend extension packs to serve beside the modalities: route name → pack directory, or
                directories routed by the modality their manifests record (see :meth:`add_extension`).
            check_base_model: how each pack's recorded base is checked against θ_base (``full``: sha256 of
                every tensor; ``shapes``; ``none``).
            revision: with a Hub id, the branch, tag or commit to load (``main`` by default).
        """
        if device is not None and device_map is not None:
            raise ConfigError(
                f"{path}: both device={device!r} and device_map given",
                key="device_map",
                hint="give device for one device, or device_map to spread the LLM (components go on its first GPU)",
            )
        device = torch.device("cpu" if device is None else device)
        check_device(device)
        if base_device is not None:
            check_device(torch.device(base_device))
        clock = _Clock()
        ckpt = load_decoupled(path, revision, modalities=modalities)
        clock.lap("open")  # the manifest and every header read and validated
        names = list(ckpt.modalities if modalities is None else modalities)
        if not names and not packs:
            raise RoutingInputError(
                f"{path}: no modality to load", key="modalities", hint="name at least one, or pass packs={...}"
            )
        for name in names:
            ckpt.modality(name)
        placed = None if device_map is None else place_llm(ckpt, names, device_map, max_memory, base_device)
        if placed is not None:
            device = main_device(placed)
        # Where each checkpoint tensor lives in memory (per-expert MoE tensors: a slice of a fused parameter).
        layout = live_layout(ckpt, {s.name: tuple(s.shape) for s in ckpt.slots})
        devices = None
        if placed is not None:  # placed by the in-memory module holding it, which is what the map names
            by_param = slot_devices(list(layout.params), placed, str(path))
            devices = {slot: by_param[part.param] for slot, part in layout.parts.items()}
        base_at = None if base_device is None else torch.device(base_device)
        weights = DeviceWeights(ckpt, names, device, base_at, devices)
        live = _allocate_live(layout, weights, names, str(path))
        clock.lap("map")  # θ_base, τ*, masks and private rows mapped or copied to the device; live weights allocated
        models = {}
        for name in names:
            views = bound_views(layout, live, weights.rows[name])
            models[name] = _build_modality(ckpt, name, weights, views, device, (model_classes or {}).get(name))
        router = cls(ckpt, weights, live, models, placed, layout)
        router.load_seconds, router.load_cpu_seconds = clock.wall, clock.cpu
        for built in models.values():
            router.dispatch(built.model, built.layout)
        if isinstance(packs, (str, Path)):
            packs = [packs]
        named = packs.items() if isinstance(packs, Mapping) else [(None, d) for d in packs or ()]
        clock.lap("models")  # every modality's transformers model built and bound, hooked under a device map
        for pack_name, pack_dir in named:
            router.add_extension(pack_dir, pack_name, check_base_model=check_base_model)
        if named:
            clock.lap("packs")
        router.switch(activate or (names or list(router.packs))[0])
        clock.lap("first switch")  # every live weight written, θ_base's and τ*'s maxima gathered as it reads them
        weights.check_all()
        clock.lap("check")  # the overflow proof of what no rebuild has covered yet
        return router

    def add_extension(self, pack_dir: str | Path, name: str | None = None, *, check_base_model: str = "full") -> str:
        """Serve a MoExtend extension pack as a route: ``router(input_ids, mask, features, modality=name)``.

        ``name`` defaults to the modality the pack's manifest records. The pack must extend this checkpoint's
        θ_base: its model type, shapes and (``check_base_model="full"``) the sha256 of every base tensor are
        checked once, here. Its extended LM shares the live weights; only the pack's own tensors are added.
        The active route stays active. Returns the route name.
        """
        from mmer.extend.pack import read_pack_manifest
        from mmer.route.packs import load_pack

        name = name or str(read_pack_manifest(pack_dir)["modality"])
        if name in self.models or name in self.packs or name in STATES:
            kind = "an MMER modality" if name in self.models else "an extension pack" if name in self.packs else ""
            raise RoutingInputError(
                f"{pack_dir}: route name {name!r} is already {kind or 'reserved'} in this router "
                f"(routes: {', '.join(self.routes)})",
                key=name,
                hint="give the pack another name: add_extension(pack_dir, name='other') or packs={'other': pack_dir}",
            )
        self._write_state(BASE)  # the pack is checked against, and loaded onto, θ_base itself
        try:
            pack = load_pack(self.ckpt, self.weights, self.views(BASE), name, pack_dir, check_base_model)
            if self.device_map is not None:  # hooked after the base check, which reads every base tensor
                self.dispatch(pack.model.lm, llm_layout(pack.model.lm))
                if pack.model.projector is not None:
                    pack.model.projector.to(self.weights.device)  # beside the embeddings it writes into
            self.packs[name] = pack
        finally:
            if self.active is not None:
                self.switch(self.active)  # back to the active route's weights, even when the pack was refused
        return name

    def remove_extension(self, name: str) -> None:
        """Stop serving pack ``name`` (its tensors are freed once no model you hold refers to them)."""
        if name not in self.packs:
            raise RoutingInputError(
                f"no extension pack {name!r} in this router (has {', '.join(self.packs) or 'none'})", key=name
            )
        del self.packs[name]
        if self.active == name:
            self.active = None

    # ------------------------------------------------------------------------------------------ switching
    @property
    def modalities(self) -> list[str]:
        """The loaded MMER modalities, in checkpoint order (what expansion mode mixes)."""
        return list(self.models)

    @property
    def extensions(self) -> list[str]:
        """The extension packs served, in the order they were added."""
        return list(self.packs)

    @property
    def routes(self) -> list[str]:
        """Every name ``modality=`` accepts: the MMER modalities, then the packs."""
        return [*self.models, *self.packs]

    def _check(self, modality: str) -> str:
        if modality not in self.models and modality not in self.packs and modality != MEAN:
            raise RoutingInputError(
                f"no modality {modality!r} in this router (has {', '.join(self.routes)})",
                key=modality,
                hint="load it with Router.from_pretrained(..., modalities=[...]) or add a pack with "
                "add_extension(pack_dir, name)",
            )
        return modality

    def _state_of(self, route: str) -> str:
        """The weights a route runs on: θ_base for a pack, the modality's (or MEAN's) otherwise."""
        return BASE if route in self.packs else route

    @torch.no_grad()
    def switch(self, modality: str) -> None:
        """Make ``modality`` active: rebuild, from θ_base, every live tensor that differs from the active one's.

        ``MEAN`` (``mmer.route.weights.MEAN``) makes the live weights expansion mode's text weights. A pack's
        route makes them θ_base (every pack shares that state: switching between packs rewrites nothing).
        """
        self._check(modality)
        if modality == self.active and self.state == self._state_of(modality):
            return
        started = time.perf_counter()
        rebuilt = self._write_state(self._state_of(modality))
        self.active = modality
        self.switches += 1
        self.last_switch_seconds = time.perf_counter() - started
        self.last_switch_rebuilt = rebuilt

    def _write_state(self, state: str) -> int:
        """Rewrite, from θ_base, every live tensor that differs between the current state and ``state``."""
        jobs = [
            (target, name)
            for name, target in self.targets.items()
            if self.state is None or not self.weights.same_weights(self.state, state, name)
        ]
        self.weights.write_many(jobs, state)
        rebuilt = len(jobs)
        for device in self.weights.cuda_devices():
            torch.cuda.synchronize(device)
        self.state = state
        return rebuilt

    def use(self, modality: str) -> torch.nn.Module:
        """Switch to ``modality`` and return its model (valid until the next switch).

        A modality's is its transformers model; a pack's is its ``mmer.extend.MoExtendModel``, called as
        ``model(input_ids, attention_mask, features)`` and returning a transformers ``ModelOutput`` (``.logits``),
        as a modality's model does.
        """
        self.switch(modality)
        if modality in self.packs:
            return self.packs[modality].model
        return self.models[modality].model

    def __call__(self, *args: Any, modality: str, **inputs: Any) -> Any:
        """``model(*args, **inputs)`` of the route's model (see :meth:`use`), after switching to it."""
        with torch.no_grad():
            return self.use(modality)(*args, **inputs)

    def generate(self, *args: Any, modality: str, **kwargs: Any) -> Any:
        """``model.generate(...)`` of the route's model, after switching to it.

        A pack's ``generate(input_ids, features, **kwargs)`` returns only the new tokens
        (``mmer.extend.MoExtendModel.generate``).
        """
        return self.use(modality).generate(*args, **kwargs)

    def llm_state(self, modality: str | None = None) -> dict[str, torch.Tensor]:
        """The active modality's LLM tensors under the checkpoint's canonical names (views of the live weights).

        Keyed like the checkpoint's slots (``ckpt.llm_tensor``), each its rows only; an expert tensor stored per
        expert is its slice of the fused live parameter.
        """
        modality = self.active if modality is None else self._check(modality)
        if modality != self.active:
            raise RoutingInputError(
                f"{modality!r} is not active ({self.active!r} is)", key=modality, hint=f"call switch({modality!r})"
            )
        assert modality is not None
        rows = self.weights.rows[self._state_of(modality)]
        return {n: t[: rows[n][0]] if t.dim() else t for n, t in self.targets.items()}

    def views(self, state: str) -> dict[str, torch.Tensor]:
        """What a model running on ``state`` binds its LLM parameters to: the live tensors, by in-memory name."""
        return bound_views(self.live_layout, self.live, self.weights.rows[state])

    def shared_param(self, modality: str, param: str) -> torch.Tensor:
        """A new θ_base + mᵢ∘τ* of one in-memory parameter (assembled from its slots when they are fused)."""
        slot = self.live_layout.whole_slot(param)
        if slot is not None:
            return self.weights.shared_part(modality, slot)
        return self.live_layout.assemble(param, self.live[param], lambda s: self.weights.shared_part(modality, s))

    def component_dir(self, modality: str) -> Path:
        """Where the modality's config, tokenizer and processor files are (for ``AutoProcessor``)."""
        return self.models[self._check(modality)].directory

    def expansion(self, *, cache_modality_weights: bool = True, route_norms: bool = True) -> ExpansionModel:
        """A mixed-modality model (§4a) over this router's checkpoint; see :mod:`mmer.route.expansion`."""
        from mmer.route.expansion import ExpansionModel

        return ExpansionModel(self, cache_modality_weights=cache_modality_weights, route_norms=route_norms)

    def nbytes(self) -> dict[str, int]:
        """Bytes held, by part (base, tau_star, masks, private, live, components, extensions)."""
        out = self.weights.nbytes()
        out["live"] = sum(t.nbytes for t in self.live.values())
        live_ptrs = {t.untyped_storage().data_ptr() for t in self.live.values()}
        out["components"] = sum(
            p.nbytes
            for m in self.models.values()
            for p in m.model.parameters()
            if p.untyped_storage().data_ptr() not in live_ptrs
        )
        out["extensions"] = sum(pack.nbytes() for pack in self.packs.values())
        return out

    def dispatch(self, model: torch.nn.Module, layout: Layout) -> torch.nn.Module:
        """Hook ``model`` under the router's device map (translated to its layout); a no-op without a map."""
        if self.device_map is None:
            return model
        return dispatch(model, model_map(model, layout, self.device_map, self.weights.device), self.weights.device)

    def close(self) -> None:
        """Close the checkpoint's files (the loaded tensors stay usable)."""
        self.ckpt.close()


class _Clock:
    """Wall and CPU time (``time.process_time``: every thread of this process) of each step since the last."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._at = (time.perf_counter(), time.process_time())

    def lap(self, step: str) -> None:
        now = (time.perf_counter(), time.process_time())
        self.wall[step] = now[0] - self._at[0]
        self.cpu[step] = now[1] - self._at[1]
        self._at = now


def _allocate_live(
    layout: LiveLayout, weights: DeviceWeights, names: Sequence[str], source: str
) -> dict[str, torch.Tensor]:
    """One live tensor per in-memory LLM parameter, as many rows as the largest modality needs (private rows).

    Left unwritten (the first switch writes every entry a model binds, and faults the pages in as it does),
    except the rows only some modalities have: zeroed, so no model ever sees memory mmer did not write. The
    CPU ones are views of one allocation (:mod:`mmer.route.arena`).
    """
    specs: dict[str, tuple[tuple[int, ...], torch.dtype, torch.device]] = {}
    unused_rows: dict[str, int] = {}  # live parameter → the first row no loaded modality binds for every state
    for param, slots in layout.params.items():
        whole = layout.whole_slot(param)
        if whole is not None:
            shapes = [weights.rows[m][whole] for m in [*names, MEAN]]
            rows = max(s[0] for s in shapes) if is_vocab_tensor(whole) else shapes[0][0] if shapes[0] else 0
            shape = (rows, *shapes[0][1:]) if shapes[0] else ()
            specs[param] = (shape, weights.dtypes[whole], weights.devices[whole])
            unused_rows[param] = min(s[0] for s in shapes) if shape else 0
            continue
        dtypes = {weights.dtypes[s] for s in slots}
        if len(dtypes) > 1:
            raise LayoutError(
                f"{source}: {param} is fused from tensors of several dtypes ({', '.join(map(str, dtypes))})",
                file=source,
                tensor=slots[0],
                hint="the fine-tunes store their experts in mixed dtypes; re-save them in one dtype",
            )
        specs[param] = (layout.shapes[param], dtypes.pop(), weights.devices[slots[0]])
    host = [p for p, (_, _, device) in specs.items() if device.type == "cpu"]
    live = dict(zip(host, arena.allocate([specs[p][:2] for p in host]), strict=True))
    for param, (shape, dtype, device) in specs.items():
        if param not in live:
            live[param] = torch.empty(shape, dtype=dtype, device=device)
    for param, first in unused_rows.items():
        tensor = live[param]
        if tensor.dim():
            tensor[first:].zero_()
        else:
            tensor.zero_()
    return {param: live[param] for param in specs}


def bound_views(
    layout: LiveLayout, live: dict[str, torch.Tensor], rows: dict[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """The live tensors a model binds, by in-memory name: a vocabulary tensor's first ``rows`` rows, else whole."""
    out = {}
    for param, tensor in live.items():
        slot = layout.whole_slot(param)
        out[param] = tensor[: rows[slot][0]] if slot is not None and tensor.dim() else tensor
    return out


def _build_modality(
    ckpt: DecoupledCheckpoint,
    name: str,
    weights: DeviceWeights,
    views: dict[str, torch.Tensor],
    device: torch.device,
    override: type | None,
) -> ModalityModel:
    record = ckpt.modality(name)
    directory = ckpt.path / record.component_dir
    config = load_config(directory)
    model = empty_model(model_class(config, directory, override), config)
    layout = llm_layout(model)
    attach_generation_config(model, directory)
    built = ModalityModel(name, model, layout, config, directory)
    built.unused_components = bind_model(model, layout, views.get, ckpt.component_reader(name), device, str(directory))
    return built
