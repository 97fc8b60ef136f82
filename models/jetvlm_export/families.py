"""The model families the exporter knows: how each builds its image path (vision tower +
projector/connector) from the checkpoint, what its processor does to a frame, and how its
image tokens sit in the prompt.

A family provides:
    model_types          config.json `model_type` values it reads
    lm_key               the nested text config in config.json
    lm_prefixes          checkpoint prefixes of the language model's body (old and new layouts)
    lm_heads             checkpoint names of the LM head
    native_size(cfg)     the frame size the vision tower was trained at
    encoder(...)         a torch module [1,3,F,F] -> [1,T,hidden] with the checkpoint's weights
    preprocessing(...)   the manifest's vision fields + notes on what jetvlm does differently
    frame_text(proc)     text before and after a frame's embeddings (the expanded image tokens)
    one_frame            image processor keyword arguments that give one frame (no tiling)
    square               whether frames are square (`--frame-size N`); otherwise the family
                         takes (width, height) where the others take the side
    processor_pixels(..) the processor's pixel values of an image as [1,3,H,W], to check the
                         manifest's preprocessing against (None: the processor picks another size)
    decoder_fields(..)   fields the decoder's config.json needs beyond the text config
"""

import numpy as np
import torch

from .common import ExportError, load_tensors, strip_prefix


def _load(module, files, prefixes, what):
    """Loads `module`'s parameters from the checkpoint tensors under `prefixes`."""
    rename = strip_prefix(files, [(p, "") for p in prefixes])
    if not rename:
        raise ExportError(f"no {what} weights in the checkpoint (looked under {', '.join(prefixes)})")
    wanted = module.state_dict()
    missing = [k for k in wanted if k not in rename]
    if missing:
        raise ExportError(f"{what} weights missing from the checkpoint: {', '.join(missing[:4])}")
    tensors = load_tensors(files, [rename[k] for k in wanted])
    state = {k: tensors[rename[k]].to(torch.float32) for k in wanted}
    module.load_state_dict(state, strict=True)
    return module.eval().float()


def _resample_name(resample) -> str:
    names = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
    if resample is None:
        return "unknown"
    value = getattr(resample, "value", resample)
    if isinstance(value, int):
        return names.get(value, str(value))
    return str(value).lower()


def _size(d, *keys):
    if d is None:
        return None
    get = d.get if isinstance(d, dict) else (lambda k: getattr(d, k, None))
    for k in keys:
        if get(k) is not None:
            return get(k)
    return None


def _interpolation(ip, notes) -> str:
    """The manifest's `vision.interpolation` for the processor's resample filter."""
    name = _resample_name(getattr(ip, "resample", None))
    if name in ("bilinear", "bicubic", "lanczos"):
        return name
    notes.append(f"the processor resamples with {name}, which jetvlm lacks; bilinear instead")
    return "bilinear"


def _normalisation(ip) -> tuple:
    if getattr(ip, "do_rescale", True) and abs(float(getattr(ip, "rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        raise ExportError(
            f"the image processor rescales by {ip.rescale_factor}; jetvlm rescales RGB by 1/255 only"
        )
    if not getattr(ip, "do_rescale", True):
        raise ExportError("the image processor does not rescale pixels to [0, 1]; jetvlm always does")
    if getattr(ip, "do_normalize", True):
        mean = [float(x) for x in ip.image_mean]
        std = [float(x) for x in ip.image_std]
    else:
        mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    if len(mean) != 3 or len(std) != 3:
        raise ExportError(f"image mean/std must have 3 values, got {mean} / {std}")
    return mean, std


class Family:
    """Defaults shared by the families."""

    one_frame: dict = {}
    square = True
    # DeepStack (Qwen3-VL): the ONNX output of the per-layer features, or None.
    deepstack_output = None

    def deepstack_layers(self, cfg) -> int:
        return 0

    def processor_pixels(self, ip, image, width: int, height: int):
        got = ip(images=[image], return_tensors="np", **self.one_frame)["pixel_values"]
        return np.asarray(got, dtype=np.float32).reshape(-1, 3, height, width)[-1:]

    def decoder_fields(self, cfg, frame) -> dict:
        return {}

    def tiles(self, cfg, ip, frame):
        """The processor's tiling of `frame` (width, height) images; None: not tiled."""
        return None


class Llava(Family):
    """LLaVA-1.5: CLIP vision tower, hidden states of `vision_feature_layer` (CLS dropped with
    the "default" strategy), 2-layer MLP projector; a Llama/Mistral/Qwen2 language model."""

    name = "llava"
    model_types = ("llava",)
    lm_key = "text_config"
    lm_prefixes = ("model.language_model.", "language_model.model.")
    lm_heads = ("lm_head.weight", "language_model.lm_head.weight")
    vision_prefixes = ("model.vision_tower.", "vision_tower.")
    projector_prefixes = ("model.multi_modal_projector.", "multi_modal_projector.")

    def native_size(self, cfg) -> int:
        return int(cfg.vision_config.image_size)

    def check(self, cfg, frame_size: int) -> None:
        vt = cfg.vision_config.model_type
        if vt not in ("clip_vision_model", "siglip_vision_model"):
            raise ExportError(f"LLaVA with a `{vt}` vision tower is not supported (CLIP or SigLIP)")
        strategy = cfg.vision_feature_select_strategy
        if strategy not in ("default", "full"):
            raise ExportError(f"vision_feature_select_strategy `{strategy}` is not supported (default, full)")
        p = int(cfg.vision_config.patch_size)
        if frame_size % p:
            raise ExportError(f"--frame-size {frame_size} is not a multiple of the patch size {p}")

    def tokens_per_frame(self, cfg, frame_size: int) -> int:
        n = (frame_size // int(cfg.vision_config.patch_size)) ** 2
        cls = 1 if cfg.vision_config.model_type == "clip_vision_model" else 0
        return n + cls if cfg.vision_feature_select_strategy == "full" else n

    def encoder(self, cfg, files, frame_size: int):
        from transformers import AutoModel
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        tower = _load(AutoModel.from_config(cfg.vision_config), files, self.vision_prefixes, "vision tower")
        projector = _load(LlavaMultiModalProjector(cfg), files, self.projector_prefixes, "projector")
        layers = cfg.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        has_cls = cfg.vision_config.model_type == "clip_vision_model"
        drop_cls = has_cls and cfg.vision_feature_select_strategy == "default"
        interpolate = frame_size != self.native_size(cfg)

        class LlavaImagePath(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.tower, self.projector = tower, projector

            def forward(self, pixel_values):
                kwargs = {"interpolate_pos_encoding": True} if interpolate else {}
                out = self.tower(pixel_values, output_hidden_states=True, **kwargs)
                hs = [out.hidden_states[i] for i in layers]
                if drop_cls:
                    hs = [h[:, 1:] for h in hs]
                return self.projector(torch.cat(hs, dim=-1))

        return LlavaImagePath().eval()

    def preprocessing(self, ip, frame_size: int) -> dict:
        mean, std = _normalisation(ip)
        notes = []
        crop = _size(getattr(ip, "crop_size", None), "height")
        shortest = _size(getattr(ip, "size", None), "shortest_edge")
        if getattr(ip, "do_pad", False):
            resize = "letterbox"
            what = "pads the frame to a square with the mean colour, then resizes"
        elif getattr(ip, "do_center_crop", False) and shortest is not None:
            resize = "center-crop"
            what = f"resizes the shortest edge to {shortest} and cuts the centre {crop}x{crop}"
        else:
            resize = "stretch"
            what = "resizes both axes to the encoder size"
        interp = _interpolation(ip, notes)
        notes.insert(0, f"processor: {what} ({interp}), rescales by 1/255, normalises with mean/std")
        return {"resize": resize, "interpolation": interp, "mean": mean, "std": std, "notes": notes}

    def frame_text(self, processor) -> tuple:
        return "", ""

    def image_token(self, processor) -> str:
        return processor.image_token


class Idefics3(Family):
    """Idefics3 / SmolVLM: SigLIP-style vision transformer, pixel-shuffle connector, a Llama
    language model. By default one frame at the vision tower's size (the processor's global
    image, as with `do_image_splitting=False`). With `--frame-size WxH` and a processor that
    splits images, the package reproduces the processor's tiling of WxH frames (`tiles`):
    the encoder runs once per tile and once on the global image, at the tile size."""

    name = "idefics3"
    one_frame = {"do_image_splitting": False}
    model_types = ("idefics3", "smolvlm")
    lm_key = "text_config"
    lm_prefixes = ("model.text_model.", "text_model.model.", "model.language_model.")
    lm_heads = ("lm_head.weight", "text_model.lm_head.weight")
    vision_prefixes = ("model.vision_model.", "vision_model.")
    connector_prefixes = ("model.connector.", "connector.")

    def native_size(self, cfg) -> int:
        return int(cfg.vision_config.image_size)

    def check(self, cfg, frame_size: int) -> None:
        step = int(cfg.vision_config.patch_size) * int(cfg.scale_factor)
        if frame_size % step:
            raise ExportError(
                f"--frame-size {frame_size} is not a multiple of patch size x scale factor ({step})"
            )
        if frame_size > self.native_size(cfg):
            raise ExportError(
                f"--frame-size {frame_size} is above the vision tower's {self.native_size(cfg)} "
                "(the processor has do_image_splitting off: it resizes every image to one tile)"
            )

    def tokens_per_frame(self, cfg, frame_size: int) -> int:
        n = (frame_size // int(cfg.vision_config.patch_size)) ** 2
        return n // int(cfg.scale_factor) ** 2

    def encoder(self, cfg, files, frame_size: int):
        if cfg.model_type == "smolvlm":
            from transformers.models.smolvlm.modeling_smolvlm import SmolVLMConnector as Connector
            from transformers.models.smolvlm.modeling_smolvlm import SmolVLMVisionTransformer as Vit
        else:
            from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector as Connector
            from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionTransformer as Vit

        vit = _load(Vit(cfg.vision_config), files, self.vision_prefixes, "vision model")
        connector = _load(Connector(cfg), files, self.connector_prefixes, "connector")
        # Position ids of a full frame of `frame_size` (the model buckets a frame's patch grid
        # onto its trained grid); constant, so the graph needs no bucketize.
        p = int(cfg.vision_config.patch_size)
        per_side = self.native_size(cfg) // p
        n = frame_size // p
        boundaries = torch.arange(1 / per_side, 1.0, 1 / per_side)
        frac = torch.clamp(torch.arange(n, dtype=torch.float32) / n, max=1.0 - 1e-6)
        b = torch.bucketize(frac, boundaries, right=True)
        position_ids = (b[:, None] * per_side + b[None, :]).reshape(1, -1)

        class Idefics3ImagePath(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.vit, self.connector = vit, connector
                self.register_buffer("position_ids", position_ids, persistent=False)

            def forward(self, pixel_values):
                emb = self.vit.embeddings
                x = emb.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
                x = x + emb.position_embedding(self.position_ids)
                x = self.vit.encoder(inputs_embeds=x, attention_mask=None).last_hidden_state
                x = self.vit.post_layernorm(x)
                return self.connector(x)

        return Idefics3ImagePath().eval()

    def preprocessing(self, ip, frame_size: int) -> dict:
        mean, std = _normalisation(ip)
        notes = []
        interp = _interpolation(ip, notes)
        square = _size(getattr(ip, "max_image_size", None), "longest_edge")
        notes.insert(
            0,
            f"processor: without image splitting it resizes the frame to {square}x{square} "
            f"({interp}), rescales by 1/255, normalises with mean/std",
        )
        if getattr(ip, "do_image_splitting", False):
            notes.append(
                "the processor also tiles large images into sub-images plus this global image; "
                "without --frame-size WxH jetvlm feeds the global image only (one frame, no tiling)"
            )
        return {"resize": "stretch", "interpolation": interp, "mean": mean, "std": std, "notes": notes}

    def frame_text(self, processor) -> tuple:
        fake = processor.fake_image_token
        return fake + self._global_token(processor), fake

    @staticmethod
    def _global_token(processor) -> str:
        return getattr(processor, "global_image_token", None) or getattr(processor, "global_image_tag", "<global-img>")

    def tiles(self, cfg, ip, frame):
        """The processor's image splitting of a `frame` = (width, height) image (None: the
        package's frame size; a processor that does not split images then keeps one image,
        otherwise None: `--frame-size` is the encoder's size, as for the other families).
        By the image processor module's own resize rules: the longest-edge resize (`scaled`),
        the resize to whole tiles, and the grid; rows = cols = 0: the image is not split
        (one image: `scaled` resized to one tile). None: nothing to reproduce beyond one
        resize to the tile (the longest-edge resize of a tile-sized frame is no resize)."""
        split = getattr(ip, "do_image_splitting", False)
        if frame is not None and not split:
            return None
        import math

        tile = _size(getattr(ip, "max_image_size", None), "longest_edge")
        if tile is None or int(tile) != self.native_size(cfg):
            raise ExportError(
                f"the processor's tile size (max_image_size.longest_edge {tile}) differs from the "
                f"vision tower's {self.native_size(cfg)}; jetvlm runs the encoder at one size"
            )
        tile = int(tile)
        w, h = frame or (tile, tile)
        longest = None
        if getattr(ip, "do_resize", True):
            longest = _size(getattr(ip, "size", None), "longest_edge")
            if longest is None:
                raise ExportError("the processor's size has no longest_edge (Idefics3 resizes by it)")
            longest = int(longest)
        w1, h1 = self.scaled(ip, longest, w, h)
        plan = {"tile": tile, "frame": (w, h), "scaled": (w1, h1), "longest_edge": longest, "rows": 0, "cols": 0}
        if frame is None:
            # One image (the processor without splitting): the frame resized by its longest
            # edge, then to one tile; nothing to write when the first resize leaves a
            # tile-sized frame alone.
            return None if (w1, h1) == (tile, tile) else plan
        # resize_for_vision_encoder: whole tiles, the aspect ratio of the scaled image.
        aspect = w1 / h1
        if w1 >= h1:
            w2 = math.ceil(w1 / tile) * tile
            h2 = math.ceil(int(w2 / aspect) / tile) * tile
        else:
            h2 = math.ceil(h1 / tile) * tile
            w2 = math.ceil(int(h2 * aspect) / tile) * tile
        if h2 > tile or w2 > tile:
            plan.update(rows=h2 // tile, cols=w2 // tile)
        return plan

    @staticmethod
    def scaled(ip, longest, w: int, h: int) -> tuple:
        """(width, height) of a w x h image after the processor's longest-edge resize, by its
        module's own functions (the runtime's `TileSection::scaled`); unchanged without one."""
        import sys

        if longest is None:
            return w, h
        rules = sys.modules[type(ip).__module__]
        h1, w1 = rules._resize_output_size_rescale_to_max_len(h, w, max_len=longest)
        h1, w1 = rules._resize_output_size_scale_below_upper_bound(h1, w1, max_len=rules.MAX_IMAGE_SIZE)
        return w1, h1

    def tile_text(self, processor, split: bool) -> dict:
        """The processor's text around a split image's tiles: before tile (row, col)
        (`{row}`, `{col}` 1-based), after each row, before the global image (an image that is
        not split: only the global image's)."""
        fake = processor.fake_image_token
        return {
            "tile_prefix": fake + "<row_{row}_col_{col}>" if split else "",
            "row_suffix": "\n" if split else "",
            "global_prefix": ("\n" if split else "") + fake + self._global_token(processor),
        }

    def image_token(self, processor) -> str:
        return processor.image_token


class InternVL(Family):
    """InternVL3 (transformers' native `InternVLForConditionalGeneration`): InternViT vision
    tower (CLS token, learned positions, layer scale), the hidden states of
    `vision_feature_layer` without CLS, pixel shuffle by `downsample_ratio`, a LayerNorm + MLP
    projector; a Qwen2 language model. One frame at the tower's size: the processor's
    `crop_to_patches` tiling of large images is not reproduced."""

    name = "internvl"
    one_frame = {"crop_to_patches": False}
    model_types = ("internvl",)
    lm_key = "text_config"
    lm_prefixes = ("model.language_model.", "language_model.model.")
    lm_heads = ("lm_head.weight", "language_model.lm_head.weight")
    vision_prefixes = ("model.vision_tower.", "vision_tower.")
    projector_prefixes = ("model.multi_modal_projector.", "multi_modal_projector.")

    @staticmethod
    def _square(value, what):
        v = list(value) if isinstance(value, (list, tuple)) else [value, value]
        if len(v) != 2 or v[0] != v[1]:
            raise ExportError(f"vision_config.{what} {value} is not square (jetvlm frames are square)")
        return int(v[0])

    def _shuffle(self, cfg) -> int:
        r = float(cfg.downsample_ratio)
        inv = round(1 / r) if r > 0 else 0
        if inv < 1 or abs(inv * r - 1) > 1e-9:
            raise ExportError(f"downsample_ratio {cfg.downsample_ratio} is not 1/n for a whole n")
        return inv

    def native_size(self, cfg) -> int:
        return self._square(cfg.vision_config.image_size, "image_size")

    def check(self, cfg, frame_size: int) -> None:
        if cfg.vision_feature_select_strategy != "default":
            raise ExportError(
                f"vision_feature_select_strategy `{cfg.vision_feature_select_strategy}` is not "
                "supported (default: the CLS token dropped)"
            )
        if not isinstance(cfg.vision_feature_layer, int):
            raise ExportError(f"vision_feature_layer {cfg.vision_feature_layer} is not supported (one layer)")
        step = self._square(cfg.vision_config.patch_size, "patch_size") * self._shuffle(cfg)
        if frame_size % step:
            raise ExportError(
                f"--frame-size {frame_size} is not a multiple of patch size x pixel shuffle ({step})"
            )

    def tokens_per_frame(self, cfg, frame_size: int) -> int:
        n = frame_size // self._square(cfg.vision_config.patch_size, "patch_size")
        return (n // self._shuffle(cfg)) ** 2

    def encoder(self, cfg, files, frame_size: int):
        from transformers.models.internvl.modeling_internvl import (
            InternVLModel,
            InternVLMultiModalProjector,
            InternVLVisionModel,
        )

        tower = _load(InternVLVisionModel(cfg.vision_config), files, self.vision_prefixes, "vision tower")
        projector = _load(InternVLMultiModalProjector(cfg), files, self.projector_prefixes, "projector")
        emb = tower.embeddings
        patch = self._square(cfg.vision_config.patch_size, "patch_size")
        n = frame_size // patch
        layer = int(cfg.vision_feature_layer)
        n_layers = len(tower.encoder.layer)
        if not -n_layers - 1 <= layer <= n_layers:
            raise ExportError(f"vision_feature_layer {layer} is outside the tower's {n_layers} layers")
        keep = layer % (n_layers + 1)  # hidden state index: 0 the embeddings, i after layer i
        ratio = float(cfg.downsample_ratio)
        # The learned positions at this frame size (resampled by the model's own bicubic
        # interpolation when it is not the trained size): a constant of the graph.
        with torch.no_grad():
            if emb.position_embeddings is None:
                pos = None
            else:
                probe = torch.zeros(1, n * n + 1, int(cfg.vision_config.hidden_size))
                pos = emb.interpolate_pos_encoding(probe, frame_size, frame_size).detach().clone()

        class InternVLImagePath(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.tower, self.projector = tower, projector
                if pos is not None:
                    self.register_buffer("pos", pos, persistent=False)
                else:
                    self.pos = None

            def forward(self, pixel_values):
                e = self.tower.embeddings
                x = e.patch_embeddings(pixel_values)
                x = torch.cat((e.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
                if self.pos is not None:
                    x = x + self.pos
                for i in range(keep):
                    x = self.tower.encoder.layer[i](x)
                if keep == n_layers:
                    x = self.tower.layernorm(x)
                x = x[:, 1:, :].reshape(x.shape[0], n, n, -1)
                x = InternVLModel.pixel_shuffle(None, x, scale_factor=ratio)
                return self.projector(x.reshape(x.shape[0], -1, x.shape[-1]))

        return InternVLImagePath().eval()

    def preprocessing(self, ip, frame_size: int) -> dict:
        mean, std = _normalisation(ip)
        notes = []
        interp = _interpolation(ip, notes)
        h, w = _size(getattr(ip, "size", None), "height"), _size(getattr(ip, "size", None), "width")
        notes.insert(
            0,
            f"processor: resizes the frame to {h}x{w} ({interp}), rescales by 1/255, normalises "
            "with mean/std",
        )
        notes.append(
            "the processor (crop_to_patches) also tiles large or non-square images into tiles of "
            "this size plus a thumbnail; jetvlm feeds one frame (as with crop_to_patches=False)"
        )
        return {"resize": "stretch", "interpolation": interp, "mean": mean, "std": std, "notes": notes}

    def frame_text(self, processor) -> tuple:
        return processor.start_image_token, processor.end_image_token

    def image_token(self, processor) -> str:
        return processor.image_token


class Qwen25VL(Family):
    """Qwen2.5-VL: the vision transformer (2D RoPE, window attention with full attention in
    `fullatt_block_indexes`, 2x2 patch merger) exported at one fixed frame size (the processor
    keeps any multiple of patch x merge within its pixel bounds; jetvlm fixes it), a Qwen2
    language model with M-RoPE: a frame's tokens rotate by (frame start, row, column), written
    to the decoder's config as `mrope_frame_grid`."""

    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    square = False
    lm_key = "text_config"
    lm_prefixes = ("model.language_model.", "model.")
    lm_heads = ("lm_head.weight",)
    vision_prefixes = ("model.visual.", "visual.")
    default_frame = (448, 448)

    def native_size(self, cfg):
        return self.default_frame

    def _steps(self, cfg):
        vc = cfg.vision_config
        return int(vc.patch_size), int(vc.spatial_merge_size), int(vc.temporal_patch_size)

    def check(self, cfg, frame) -> None:
        p, m, _ = self._steps(cfg)
        w, h = frame
        if w % (p * m) or h % (p * m):
            raise ExportError(
                f"--frame-size {w}x{h}: both sides must be multiples of patch size x merge size ({p * m})"
            )
        section = (cfg.text_config.rope_parameters or {}).get("mrope_section")
        if not section or len(section) != 3:
            raise ExportError(f"text_config.rope_parameters.mrope_section {section} is not three sizes")

    def grid(self, cfg, frame):
        """Rows and columns of a frame's tokens (after the 2x2 merge)."""
        p, m, _ = self._steps(cfg)
        w, h = frame
        return h // (p * m), w // (p * m)

    def tokens_per_frame(self, cfg, frame) -> int:
        rows, cols = self.grid(cfg, frame)
        return rows * cols

    def decoder_fields(self, cfg, frame) -> dict:
        rows, cols = self.grid(cfg, frame)
        return {"mrope_frame_grid": [rows, cols]}

    def encoder(self, cfg, files, frame):
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
            Qwen2_5_VisionTransformerPretrainedModel as Vit,
        )

        vit = _load(Vit(cfg.vision_config), files, self.vision_prefixes, "vision transformer")
        p, m, t = self._steps(cfg)
        w, h = frame
        gh, gw = h // p, w // p
        grid = torch.tensor([[1, gh, gw]], dtype=torch.long)

        class Qwen25VLImagePath(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.vit = vit
                self.register_buffer("grid", grid, persistent=False)

            def forward(self, pixel_values):
                # The processor's patch order: merge windows row-major, then the 2x2 patches
                # of a window, each patch C x T x p x p (the frame repeated in time).
                x = pixel_values[0].reshape(3, gh // m, m, p, gw // m, m, p)
                x = x.permute(1, 4, 2, 5, 0, 3, 6).unsqueeze(5)
                x = x.expand(gh // m, gw // m, m, m, 3, t, p, p).reshape(gh * gw, 3 * t * p * p)
                return self.vit(x, grid_thw=self.grid).pooler_output.unsqueeze(0)

        return Qwen25VLImagePath().eval()

    def processor_pixels(self, ip, image, width: int, height: int):
        out = ip(images=[image], return_tensors="np")
        p, m, t = ip.patch_size, ip.merge_size, ip.temporal_patch_size
        if [int(x) for x in out["image_grid_thw"][0]] != [1, height // p, width // p]:
            return None
        gh, gw = height // p, width // p
        x = np.asarray(out["pixel_values"], dtype=np.float32)
        x = x.reshape(gh // m, gw // m, m, m, 3, t, p, p)[:, :, :, :, :, 0]
        x = x.transpose(4, 0, 2, 5, 1, 3, 6).reshape(1, 3, height, width)
        return np.ascontiguousarray(x)

    def preprocessing(self, ip, frame) -> dict:
        mean, std = _normalisation(ip)
        notes = []
        interp = _interpolation(ip, notes)
        w, h = frame
        notes.insert(
            0,
            f"processor: resizes to multiples of {ip.patch_size * ip.merge_size} within its pixel "
            f"bounds, keeping the aspect ratio ({interp}); jetvlm stretches every frame to {w}x{h}",
        )
        return {"resize": "stretch", "interpolation": interp, "mean": mean, "std": std, "notes": notes}

    def frame_text(self, processor) -> tuple:
        return "", ""

    def image_token(self, processor) -> str:
        return processor.image_token


class Qwen3VL(Qwen25VL):
    """Qwen3-VL: the vision transformer (learned position table resampled bilinearly to the
    frame's patch grid, 2D RoPE, full attention, 2x2 patch merger) exported at one fixed
    frame size, plus DeepStack: the blocks in `deepstack_visual_indexes` each feed a merger
    whose features are added to the frame tokens' hidden states after the first decoder
    layers (the encoder's second output, `deepstack_embeds` [1, layers, tokens, hidden]). A
    Qwen3 language model (q/k RMSNorm per head) with interleaved M-RoPE: frequency pair i
    rotates by the row for i % 3 == 1, the column for i % 3 == 2 (within the sections), the
    frame start otherwise."""

    name = "qwen3_vl"
    model_types = ("qwen3_vl",)
    lm_prefixes = ("model.language_model.",)
    deepstack_output = "deepstack_embeds"

    def check(self, cfg, frame) -> None:
        super().check(cfg, frame)
        section = cfg.text_config.rope_parameters["mrope_section"]
        half = int(cfg.text_config.head_dim) // 2
        if sum(section) != half or 3 * max(section[1], section[2]) > half:
            raise ExportError(
                f"text_config.rope_parameters.mrope_section {section} does not interleave over "
                f"head_dim / 2 = {half} frequency pairs"
            )
        n = len(self.deepstack_indexes(cfg))
        if n > int(cfg.text_config.num_hidden_layers):
            raise ExportError(
                f"vision_config.deepstack_visual_indexes has {n} entries, more than the "
                f"language model's {cfg.text_config.num_hidden_layers} layers"
            )

    @staticmethod
    def deepstack_indexes(cfg):
        return [int(i) for i in (cfg.vision_config.deepstack_visual_indexes or [])]

    def deepstack_layers(self, cfg) -> int:
        return len(self.deepstack_indexes(cfg))

    def decoder_fields(self, cfg, frame) -> dict:
        rope = dict(cfg.text_config.rope_parameters)
        # transformers' Qwen3-VL always interleaves the sections; the decoder reads it here.
        rope["mrope_interleaved"] = True
        return {
            **super().decoder_fields(cfg, frame),
            "rope_parameters": rope,
            "deepstack_layers": self.deepstack_layers(cfg),
        }

    def encoder(self, cfg, files, frame):
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel as Vit

        vit = _load(Vit(cfg.vision_config), files, self.vision_prefixes, "vision transformer")
        p, m, t = self._steps(cfg)
        w, h = frame
        gh, gw = h // p, w // p
        grid = torch.tensor([[1, gh, gw]], dtype=torch.long)
        deep = self.deepstack_layers(cfg)

        class Qwen3VLImagePath(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.vit = vit
                self.register_buffer("grid", grid, persistent=False)

            def forward(self, pixel_values):
                # The processor's patch order, as Qwen2.5-VL's.
                x = pixel_values[0].reshape(3, gh // m, m, p, gw // m, m, p)
                x = x.permute(1, 4, 2, 5, 0, 3, 6).unsqueeze(5)
                x = x.expand(gh // m, gw // m, m, m, 3, t, p, p).reshape(gh * gw, 3 * t * p * p)
                out = self.vit(x, grid_thw=self.grid)
                main = out.pooler_output.unsqueeze(0)
                if not deep:
                    return main
                return main, torch.stack(list(out.deepstack_features)).unsqueeze(0)

        return Qwen3VLImagePath().eval()


class Gemma3(Family):
    """Gemma 3 (`Gemma3ForConditionalGeneration`): a SigLIP vision tower (its last hidden
    state, no pooling head), the pooled projector (the patch grid average-pooled to
    `mm_tokens_per_image` tokens, Gemma's RMSNorm with (1 + w), a projection to the text
    width), and the Gemma 3 language model (its own layer recipe in jetvlm's decoder). One
    frame at the tower's size: pan-and-scan crops (off in the processor by default) are not
    reproduced."""

    name = "gemma3"
    one_frame = {"do_pan_and_scan": False}
    model_types = ("gemma3",)
    lm_key = "text_config"
    lm_prefixes = ("model.language_model.", "language_model.model.")
    lm_heads = ("lm_head.weight", "language_model.lm_head.weight")
    vision_prefixes = ("model.vision_tower.", "vision_tower.")
    projector_prefixes = ("model.multi_modal_projector.", "multi_modal_projector.")

    def native_size(self, cfg) -> int:
        return int(cfg.vision_config.image_size)

    def _pool(self, cfg) -> tuple:
        """(patches per side, tokens per side) of the projector's average pool."""
        patches = int(cfg.vision_config.image_size) // int(cfg.vision_config.patch_size)
        n = int(cfg.mm_tokens_per_image)
        side = int(round(n**0.5))
        if side * side != n or side == 0 or patches % side:
            raise ExportError(
                f"mm_tokens_per_image {n} is not a square whose side divides the "
                f"{patches}x{patches} patch grid"
            )
        return patches, side

    def check(self, cfg, frame_size: int) -> None:
        vt = cfg.vision_config.model_type
        if vt != "siglip_vision_model":
            raise ExportError(f"Gemma 3 with a `{vt}` vision tower is not supported (SigLIP)")
        self._pool(cfg)
        if frame_size != self.native_size(cfg):
            raise ExportError(
                f"--frame-size {frame_size}: Gemma 3's projector pools the {self.native_size(cfg)}"
                "-pixel frame's patch grid it was trained on; other sizes are not supported"
            )

    def tokens_per_frame(self, cfg, frame_size: int) -> int:
        return int(cfg.mm_tokens_per_image)

    def encoder(self, cfg, files, frame_size: int):
        from transformers import AutoModel
        from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector

        tower = _load(AutoModel.from_config(cfg.vision_config), files, self.vision_prefixes, "vision tower")
        projector = _load(Gemma3MultiModalProjector(cfg), files, self.projector_prefixes, "projector")

        class Gemma3ImagePath(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.tower, self.projector = tower, projector

            def forward(self, pixel_values):
                return self.projector(self.tower(pixel_values).last_hidden_state)

        return Gemma3ImagePath().eval()

    def preprocessing(self, ip, frame_size: int) -> dict:
        mean, std = _normalisation(ip)
        notes = []
        interp = _interpolation(ip, notes)
        h, w = _size(getattr(ip, "size", None), "height"), _size(getattr(ip, "size", None), "width")
        notes.insert(
            0,
            f"processor: resizes the frame to {h}x{w} ({interp}), rescales by 1/255, normalises "
            "with mean/std",
        )
        if getattr(ip, "do_pan_and_scan", False):
            notes.append(
                "the processor also adds pan-and-scan crops of wide or tall images; jetvlm feeds "
                "one frame (as with do_pan_and_scan=False)"
            )
        return {"resize": "stretch", "interpolation": interp, "mean": mean, "std": std, "notes": notes}

    def frame_text(self, processor) -> tuple:
        # The processor replaces each `<start_of_image>` of the chat template with
        # "\n\n<start_of_image>" + the image tokens + "<end_of_image>\n\n".
        full, token = processor.full_image_sequence, processor.tokenizer.image_token
        if token not in full:
            raise ExportError(f"the processor's image sequence has no `{token}`")
        return full[: full.index(token)], full[full.rindex(token) + len(token) :]

    def image_token(self, processor) -> str:
        # What the chat template writes for an image (the processor expands it).
        return processor.boi_token

    def decoder_fields(self, cfg, frame) -> dict:
        # transformers' Gemma3ForConditionalGeneration takes the LM head's logits as they are
        # (only the text-only Gemma3ForCausalLM softcaps them): the package answers as the VLM.
        return {"final_logit_softcapping": None}


FAMILIES = [Llava(), Idefics3(), InternVL(), Qwen25VL(), Qwen3VL(), Gemma3()]


def family_for(model_type: str):
    for f in FAMILIES:
        if model_type in f.model_types:
            return f
    known = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise ExportError(f"model_type `{model_type}` is not supported (supported: {known})")
