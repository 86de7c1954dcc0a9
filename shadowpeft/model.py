"""ShadowModel: base embeddings, the shadow backbone, and an explicit loop over ``shadow_block``.

Every trainable parameter lives under a ``shadow_*`` attribute (``shadow_model``,
``shadow_hidden_projection``, ``shadow_injection_model``, ``shadow_update_model`` and task heads);
the wrapped base model sits under ``base`` and is frozen. The shadow state is a local variable
passed through the loop, never stored on a module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from shadowpeft.arch import ArchSpec, LayerContext, default_position_ids, spec_for
from shadowpeft.backbone import build_implicit_backbone, explicit_backbone
from shadowpeft.block import BlockParts, schedule, shadow_block
from shadowpeft.cache import ShadowCache
from shadowpeft.config import ShadowConfig
from shadowpeft.errors import CheckpointError, ShadowConfigError
from shadowpeft.modules import ShadowInjection, ShadowUpdate

Mode = Literal["attached", "detached"]
MODES = ("attached", "detached")


@dataclass
class ShadowStates:
    """Output of the core loop: final-normed base hidden (``None`` when detached) and ``s0``."""

    hidden: Tensor | None  # (B, T, d)
    s0: Tensor  # (B, T, d)
    cache: ShadowCache | None


class ShadowModel(nn.Module):
    """A frozen HF decoder wrapped with a ShadowPEFT adapter; task heads live in subclasses.

    Args:
        base: A HF task model (``XForCausalLM`` / ``XForSequenceClassification``) of a registered family.
        config: The adapter configuration.
        shadow_model: Optional explicit shadow (any registered decoder, same tokenizer).
    """

    def __init__(self, base: nn.Module, config: ShadowConfig, shadow_model: nn.Module | None = None) -> None:
        super().__init__()
        self.spec: ArchSpec = spec_for(base.config)
        config.check_against(base.config, implicit=shadow_model is None)
        self.shadow_config = config
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        bb = self.spec.backbone(base)
        d = bb.config.hidden_size
        num_layers = len(self.spec.layers(bb))
        if num_layers < 2:
            raise ShadowConfigError(f"base model has {num_layers} decoder layers; ShadowPEFT needs at least 2.")
        self.explicit = shadow_model is not None
        if shadow_model is None:
            self.shadow_spec = self.spec
            self.shadow_model = build_implicit_backbone(bb, self.spec, config.backbone)
            self.shares_embeddings = True
        else:
            self.shadow_model, self.shadow_spec = explicit_backbone(
                shadow_model, share_embeddings=config.share_embeddings, base_hidden=d
            )
            self.shares_embeddings = config.share_embeddings
        d_s = self.shadow_model.config.hidden_size
        self.shadow_hidden_projection: nn.Module = nn.Identity() if d_s == d else nn.Linear(d_s, d, bias=False)
        ref = self.spec.embedding(bb).weight
        self.shadow_injection_model = ShadowInjection(
            num_layers - 1,
            d,
            rank=config.injection.rank,
            alpha=config.injection.alpha,
            dropout=config.injection.dropout,
            init_std=config.injection.init_std,
        ).to(device=ref.device, dtype=ref.dtype)
        self.shadow_update_model = ShadowUpdate(
            num_layers - 1, d, gate_width=config.update.gate_width, dropout=config.update.dropout
        ).to(device=ref.device, dtype=ref.dtype)
        self.shadow_hidden_projection.to(device=ref.device, dtype=ref.dtype)
        self._schedule = schedule(num_layers)

    # ----- accessors -------------------------------------------------------------------------------
    @property
    def base_backbone(self) -> nn.Module:
        return self.spec.backbone(self.base)

    @property
    def num_layers(self) -> int:
        return len(self._schedule)

    @property
    def hidden_size(self) -> int:
        return self.base_backbone.config.hidden_size

    def new_cache(self) -> ShadowCache:
        """An empty cache for one generation: base KV and shadow KV."""
        return ShadowCache.for_configs(self.base_backbone.config, self.shadow_model.config)

    def embed(self, input_ids: Tensor) -> Tensor:
        """``x = Embed_base(input_ids)``: (B, T) -> (B, T, d)."""
        return self.spec.embedding(self.base_backbone)(input_ids)

    # ----- the method ------------------------------------------------------------------------------
    def shadow_states(
        self,
        input_ids: Tensor,
        x: Tensor,
        *,
        attention_mask: Tensor | None,
        position_ids: Tensor,
        cache: ShadowCache | None,
        use_cache: bool,
    ) -> Tensor:
        """``s0 = P(FinalNorm(ShadowBackbone(x_s)))`` (the method notes, section 3, step 2): (B, T, d)."""
        kv = cache.shadow if cache is not None else None
        ctx = self.shadow_spec.context(
            self.shadow_model,
            x,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=kv,
            use_cache=use_cache,
        )
        return self.shadow_stack(input_ids, x, ctx=ctx, kv=kv)

    def shadow_stack(self, input_ids: Tensor, x: Tensor, *, ctx: LayerContext, kv: Any | None) -> Tensor:
        """The shadow backbone given a prepared layer context: ``s0`` (B, T, d).

        :meth:`shadow_states` builds ``ctx`` with the HF mask helpers; the ONNX graphs build it from
        explicit tensors (``shadowpeft.export``) and call this same function.
        """
        spec, sbb = self.shadow_spec, self.shadow_model
        xs = x if self.shares_embeddings else spec.embedding(sbb)(input_ids)
        h = spec.input_stage(sbb, xs, ctx.position_ids)
        for i, layer in enumerate(spec.layers(sbb)):
            h = spec.call_layer(layer, h, ctx, i, kv)
        return self.shadow_hidden_projection(spec.final_norm(sbb)(h))

    def run(
        self,
        input_ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: ShadowCache | None = None,
        use_cache: bool = False,
        mode: Mode = "attached",
    ) -> ShadowStates:
        """The full forward of the method notes, section 3, up to (not including) the heads.

        Args:
            input_ids: (B, T) new tokens (only the uncached suffix when ``cache`` holds a prefix).
            attention_mask: (B, past + T) 1 for real tokens, 0 for padding.
            position_ids: (B, T); defaults to ``past .. past+T-1``.
            cache: KV caches to read and append to; created when ``use_cache`` and ``None``.
            use_cache: Append this step's keys/values to ``cache``.
            mode: ``attached`` runs the base with injections; ``detached`` only the shadow.
        """
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; allowed: {', '.join(MODES)}.")
        if use_cache and cache is None:
            cache = self.new_cache()
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = default_position_ids(input_ids.shape[0], input_ids.shape[1], past, input_ids.device)
        x = self.embed(input_ids)  # (B, T, d)
        s0 = self.shadow_states(
            input_ids, x, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=use_cache
        )
        if mode == "detached":
            return ShadowStates(None, s0, cache)
        return ShadowStates(
            self.base_hidden(
                x, s0, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=use_cache
            ),
            s0,
            cache,
        )

    def base_hidden(
        self,
        x: Tensor,
        s0: Tensor,
        *,
        attention_mask: Tensor | None,
        position_ids: Tensor,
        cache: ShadowCache | None,
        use_cache: bool,
    ) -> Tensor:
        """The base stack with injections and updates: final-normed hidden (B, T, d)."""
        kv = cache.base if cache is not None else None
        ctx = self.spec.context(
            self.base_backbone,
            x,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=kv,
            use_cache=use_cache,
        )
        return self.base_stack(x, s0, ctx=ctx, kv=kv)

    def base_stack(self, x: Tensor, s0: Tensor, *, ctx: LayerContext, kv: Any | None) -> Tensor:
        """The loop over :func:`shadow_block` given a prepared layer context: final-normed hidden (B, T, d)."""
        spec, bb = self.spec, self.base_backbone
        h = spec.input_stage(bb, x, ctx.position_ids)
        s = s0
        for idx, (layer, (inject, update)) in enumerate(zip(spec.layers(bb), self._schedule, strict=True)):
            parts = BlockParts(layer, spec, self.shadow_injection_model, self.shadow_update_model, inject, update)
            h, s = shadow_block(idx, h, s, parts=parts, ctx=ctx, cache=kv)
        return spec.final_norm(bb)(h)

    # ----- distillation ------------------------------------------------------------------------------
    @property
    def distilling(self) -> bool:
        """Whether training distils the attached distribution into the detached head (method notes, section 9 b)."""
        return self.shadow_config.distill.weight > 0

    def teacher_states(self, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None) -> Tensor:
        """The attached final-normed hidden (B, T, d), without gradient: the teacher of detached training."""
        with torch.no_grad():
            hidden = self.run(input_ids, attention_mask=attention_mask, position_ids=position_ids).hidden
        assert hidden is not None  # attached mode always returns it
        return hidden

    # ----- peft-style save and load ----------------------------------------------------------------
    # The checkpoint module imports this one, so both methods import it when called.
    def save_pretrained(
        self,
        save_directory: str | Path,
        *,
        base_ref: str | None = None,
        overwrite: bool = False,
        safe_serialization: bool = True,
    ) -> Path:
        """Save the adapter and trained heads to ``save_directory`` (peft's ``PeftModel.save_pretrained``).

        Writes exactly what :func:`~shadowpeft.checkpoint.store.save_shadow` writes (the same files),
        so the folder loads with :meth:`from_pretrained` or ``load_shadow``. The base is not saved:
        only its name and fingerprint, checked again on load.

        Args:
            save_directory: Target directory; created, or replaced atomically when ``overwrite``.
            base_ref: How users should reload the base (hub name or path); defaults to the base
                config's ``_name_or_path``.
            overwrite: Replace an existing checkpoint in ``save_directory`` (peft overwrites
                silently; here an existing non-empty folder is refused unless asked).
            safe_serialization: Accepted for peft compatibility; must stay ``True`` (safetensors is
                the only format written).

        Returns:
            The checkpoint directory.

        Raises:
            CheckpointError: ``save_directory`` is a file, or a non-empty folder without ``overwrite``.
            ValueError: ``safe_serialization=False``.
        """
        from shadowpeft.checkpoint.store import save_shadow

        if not safe_serialization:
            raise ValueError(
                "safe_serialization=False asks for a pickle file; shadowpeft writes safetensors only. "
                "Drop the argument (or pass True)."
            )
        return save_shadow(self, save_directory, base_ref=base_ref, overwrite=overwrite)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | Path,
        *,
        shadow_model: nn.Module | None = None,
        is_trainable: bool = False,
    ) -> ShadowModel:
        """Wrap ``model`` with the adapter saved in ``model_id`` (peft's ``PeftModel.from_pretrained``).

        ``ShadowModel.from_pretrained`` returns the task class the checkpoint holds
        (:class:`~shadowpeft.heads.ShadowForCausalLM` or ``ShadowForSequenceClassification``);
        called on a task class it also checks the checkpoint is of that task. Reads every folder
        ``load_shadow`` reads (ours, with the base fingerprint checked, and published shadow-peft ones).

        Args:
            model: The plain base (``AutoModelForCausalLM`` / ``...ForSequenceClassification``) the
                adapter was trained on; frozen in place.
            model_id: A local checkpoint directory written by :meth:`save_pretrained` or ``save_shadow``.
            shadow_model: For a checkpoint trained with an explicit shadow model, that model again.
            is_trainable: Train mode with the shadow modules trainable; otherwise eval mode, all frozen.

        Raises:
            CheckpointError: the folder is missing or corrupt, or ``model`` is not the base the
                adapter was trained on (each differing part is named), or a task class that does not
                match the checkpoint's task.
        """
        from shadowpeft.checkpoint.store import load_shadow

        loaded = load_shadow(model, model_id, shadow_model=shadow_model, is_trainable=is_trainable)
        if not isinstance(loaded, cls):
            raise CheckpointError(
                f"{model_id} holds a {type(loaded).__name__} adapter, not a {cls.__name__}; call "
                f"{type(loaded).__name__}.from_pretrained or ShadowModel.from_pretrained (which picks the task)."
            )
        return loaded

    # ----- parameters ------------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, Tensor]:
        """Adapter weights keyed as the published package does (``shadow_model.``, ``shadow_injection_model.``...)."""
        out: dict[str, Tensor] = {}
        for prefix in ("shadow_model", "shadow_hidden_projection", "shadow_injection_model", "shadow_update_model"):
            for key, value in getattr(self, prefix).state_dict().items():
                out[f"{prefix}.{key}"] = value.detach().to("cpu").contiguous().clone()
        return out

    def load_adapter_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load weights written by :meth:`adapter_state_dict` (strict: every key must match)."""
        for prefix in ("shadow_model", "shadow_hidden_projection", "shadow_injection_model", "shadow_update_model"):
            sub = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
            getattr(self, prefix).load_state_dict(sub, strict=True)

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def print_trainable_parameters(self) -> None:
        """Print ``trainable params: N || all params: M || trainable%: x`` (PEFT's convention)."""
        from shadowpeft.params import count_parameters

        trainable, total = count_parameters(self)
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    @property
    def device(self) -> torch.device:
        return self.spec.embedding(self.base_backbone).weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.spec.embedding(self.base_backbone).weight.dtype

    def extra_repr(self) -> str:
        return f"layers={self.num_layers}, explicit_shadow={self.explicit}"
