"""`python -m jetvlm_export HF_DIR --out PKG`: see the package docstring."""

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

from .common import ExportError, log

TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2}  # ONNX vs PyTorch, times the output's scale
NEEDS = ("torch", "transformers", "onnx", "onnxruntime", "safetensors", "numpy", "PIL")


def frame_size(text: str):
    """`--frame-size`: `N` (N x N) or `WIDTHxHEIGHT`."""
    parts = text.lower().split("x")
    try:
        if len(parts) == 1:
            return int(parts[0]), int(parts[0])
        if len(parts) == 2:
            return int(parts[0]), int(parts[1])
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r} is not N or WIDTHxHEIGHT")


def parse(argv):
    ap = argparse.ArgumentParser(
        prog="jetvlm export",
        description="Export a Hugging Face vision-language checkpoint (LLaVA-1.5, "
        "Idefics3/SmolVLM, InternVL3, Qwen2.5-VL, Qwen3-VL) to a jetvlm model package.",
        epilog="example: jetvlm export ~/hf/llava-1.5-7b-hf --out models/llava-1.5-7b",
    )
    ap.add_argument("hf_dir", type=Path, help="Hugging Face model directory (config.json, safetensors, tokenizer, processor)")
    ap.add_argument("--out", type=Path, required=True, help="package directory to write")
    ap.add_argument("--frame-size", type=frame_size, default=None, metavar="N|WxH", help="encoder input size in pixels, N for N x N (default: the vision tower's native size; Qwen2.5-VL, Qwen3-VL: 448x448); Idefics3/SmolVLM whose processor splits images: the frame size, cut into the processor's tiles")
    ap.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="precision inside the ONNX encoder (its input and output stay f32)")
    ap.add_argument("--name", default=None, help="package name (default: the checkpoint directory's name)")
    ap.add_argument("--kv-policy", default="mixed", help="kv.policy written to the manifest (default: mixed)")
    ap.add_argument("--template", default=None, help="prompt template with {frames} and {question} (default: from the chat template)")
    ap.add_argument("--question", default="Describe the image.", help="prompt.default_question")
    ap.add_argument("--force", action="store_true", help="replace an existing --out")
    return ap.parse_args(argv)


def check_dependencies():
    missing = [m for m in NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(
            f"the Python environment lacks {', '.join(missing)}; run .ci/setup --dev "
            "(installs torch and transformers into .venv)"
        )


def tile_expansion(tiles: dict, tokens: int, image_token: str, suffix: str) -> str:
    """What the manifest's tile layout expands one image to (image tokens where jetvlm places
    embeddings), as the runtime's prompt builder lays it out."""
    out = ""
    for r in range(tiles["rows"]):
        for c in range(tiles["cols"]):
            out += tiles["tile_prefix"].replace("{row}", str(r + 1)).replace("{col}", str(c + 1))
            out += image_token * tokens
        out += tiles["row_suffix"]
    return out + tiles["global_prefix"] + image_token * tokens + suffix


def cut_tiles(img, tiles: dict, interpolation: str, scaled):
    """The manifest's tiling of an RGB8 frame (PIL): resized by its longest edge (`scaled`:
    (w, h) -> size), then to whole tiles, cut row-major, the whole-tile image resized to one
    tile last (as the runtime does)."""
    from PIL import Image

    filt = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}[interpolation]
    t = tiles["tile"]
    img = img.resize(scaled(*img.size), filt)
    if not tiles["rows"]:
        return [img.resize((t, t), filt)]
    img = img.resize((tiles["cols"] * t, tiles["rows"] * t), filt)
    out = [img.crop((c * t, r * t, (c + 1) * t, (r + 1) * t)) for r in range(tiles["rows"]) for c in range(tiles["cols"])]
    return out + [img.resize((t, t), filt)]


def processor_kwargs(tiles: dict) -> dict:
    """An image that is not split is what the processor gives without splitting."""
    return {} if tiles["rows"] else {"do_image_splitting": False}


def check_tile_pixels(ip, tiles: dict, pre: dict, scaled) -> None:
    """The processor's pixel values of a probe frame, per tile, against the manifest's
    tiling and normalisation."""
    import numpy as np
    from PIL import Image

    from . import common

    w, h = tiles["frame"]
    img = Image.fromarray(common.probe_image(w, h))
    got = np.asarray(ip(images=[img], return_tensors="np", **processor_kwargs(tiles))["pixel_values"][0], dtype=np.float32)
    mine = np.concatenate(
        [common.normalise(np.asarray(t), pre["mean"], pre["std"]) for t in cut_tiles(img, tiles, pre["interpolation"], scaled)]
    )
    common.check_close("manifest tiling and preprocessing vs the processor (probe frame, every tile)", mine, got, 2e-2)


def check_tile_layout(processor, tiles: dict, tokens: int, image_token: str, suffix: str) -> None:
    """The processor on a probe image of the frame size gives the manifest's grid and as many
    images, and its text for the image tokenizes as the manifest's layout does."""
    from PIL import Image

    from . import common

    w, h = tiles["frame"]
    img = Image.fromarray(common.probe_image(w, h))
    ip = processor.image_processor
    got = ip(images=[img], return_row_col_info=True, return_tensors="np", **processor_kwargs(tiles))
    rows, cols = int(got["rows"][0][0]), int(got["cols"][0][0])
    if (rows, cols) != (tiles["rows"], tiles["cols"]):
        raise ExportError(
            f"the processor splits a {w}x{h} image into {rows}x{cols} tiles, the exporter computed "
            f"{tiles['rows']}x{tiles['cols']}", 1)
    n = rows * cols + 1
    if got["pixel_values"].shape[1] != n:
        raise ExportError(f"the processor gives {got['pixel_values'].shape[1]} images for a {w}x{h} frame, expected {n}", 1)
    want = processor(text=[image_token], images=[[img]], **processor_kwargs(tiles))["input_ids"][0]
    mine = processor.tokenizer(tile_expansion(tiles, tokens, image_token, suffix))["input_ids"]
    if list(want) != list(mine):
        raise ExportError(
            f"the manifest's tile layout gives {len(mine)} tokens, the processor {len(want)} for a {w}x{h} frame", 1)
    log(f"tile layout: {rows}x{cols} tiles + global, {len(want)} tokens per frame as the processor's")


def load_processor(hf: Path):
    from transformers import AutoImageProcessor, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(str(hf))
        # The image processor's PIL backend: the filters jetvlm's preprocessing reproduces
        # (with torchvision installed, transformers would resize with torch's kernels).
        processor.image_processor = AutoImageProcessor.from_pretrained(str(hf), backend="pil")
    except Exception as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"cannot load the processor of {hf}: {first}") from None
    return processor


def export(args) -> None:
    check_dependencies()
    import torch
    from PIL import Image
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    from . import common
    from .families import family_for

    started = time.time()
    hf = args.hf_dir
    if not hf.is_dir():
        raise ExportError(f"{hf} is not a directory")
    raw = common.read_json(hf / "config.json")
    family = family_for(raw.get("model_type", "<none>"))
    try:
        cfg = AutoConfig.from_pretrained(str(hf))
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"transformers cannot read {hf / 'config.json'}: {e}") from None
    processor_files = ("preprocessor_config.json", "processor_config.json")
    if not any((hf / name).is_file() for name in processor_files):
        raise ExportError(
            f"{hf} has no {' or '.join(processor_files)} (the image processor's settings, "
            "which the package's preprocessing reproduces)"
        )
    native = family.native_size(cfg)
    nw, nh = (native, native) if isinstance(native, int) else native
    fw, fh = args.frame_size or (nw, nh)
    if fw <= 0 or fh <= 0:
        raise ExportError(f"--frame-size {fw}x{fh} must be positive")
    processor = load_processor(hf)
    # A family whose processor splits large images into tiles (Idefics3/SmolVLM): the frame
    # size is the camera's, the encoder runs per tile at the tile size.
    tiles = family.tiles(cfg, processor.image_processor, args.frame_size and (fw, fh))
    if tiles is not None:
        fw = fh = tiles["tile"]
        if not tiles["rows"]:
            w, h = tiles["frame"]
            log(f"one image per frame: a {w}x{h} frame resized to {tiles['scaled'][0]}x"
                f"{tiles['scaled'][1]}, then to {fw}x{fh} (the processor without splitting)")
    if family.square and fw != fh:
        raise ExportError(f"--frame-size {fw}x{fh}: {family.name} frames are square (pass one number)")
    # Square families take the side, the others (width, height).
    frame = fw if family.square else (fw, fh)
    family.check(cfg, frame)
    log(f"{hf}: {family.name} ({raw['model_type']}), vision tower {cfg.vision_config.model_type}, "
        f"language model {cfg.text_config.model_type}")
    if family.square and fw != nw:
        log(f"warning: frame {fw}x{fh} differs from the trained {nw}x{nh} "
            "(the vision tower's position embeddings are resampled; answers may degrade)")
    ip = processor.image_processor
    pre = family.preprocessing(ip, frame)
    if tiles is not None:
        what = "splits" if tiles["rows"] else "resizes (longest edge, then to one tile)"
        pre["notes"] = [
            f"processor: {what} a {tiles['frame'][0]}x{tiles['frame'][1]} frame (vision.tiles) "
            f"with {pre['interpolation']} resizes, rescales by 1/255, normalises with mean/std"
        ]
    text_type = cfg.text_config.model_type
    archs = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
    # The same layer recipe (Qwen3-VL's text model is Qwen3's; its M-RoPE comes from the
    # family's decoder fields).
    text_as = {"qwen2_5_vl_text": "qwen2", "qwen3_vl_text": "qwen3"}.get(text_type, text_type)
    archs["gemma3_text"] = "Gemma3ForCausalLM"  # Gemma 3's own layer recipe (decoder arch.rs)
    if text_as not in archs:
        raise ExportError(f"language model `{text_type}` is not supported (llama, mistral, qwen2, qwen3)")

    files = common.load_state(hf)
    module = family.encoder(cfg, files, frame)
    tokens = family.tokens_per_frame(cfg, frame)
    hidden = int(cfg.text_config.hidden_size)
    deep = family.deepstack_layers(cfg)

    img = common.probe_image(fw, fh)
    pv = common.normalise(img, pre["mean"], pre["std"])
    if tiles is not None:
        check_tile_pixels(ip, tiles, pre, lambda w, h: family.scaled(ip, tiles["longest_edge"], w, h))
    elif (fw, fh) == (nw, nh) or not family.square:
        got = family.processor_pixels(ip, Image.fromarray(img), fw, fh)
        if got is None:
            log(f"note: the processor resizes a {fw}x{fh} image to another size; the "
                "preprocessing check is skipped")
        else:
            common.check_close("manifest preprocessing vs the processor (probe image)", pv, got, 2e-2)
    with torch.no_grad():
        ref = module(torch.from_numpy(pv))
    # DeepStack families give a second tensor: the features added after the first layers.
    ref_deep = ref[1].numpy() if deep else None
    ref = (ref[0] if deep else ref).numpy()
    if ref.shape != (1, tokens, hidden):
        raise ExportError(f"image path gives {list(ref.shape)}, expected [1, {tokens}, {hidden}]", 1)
    if deep and ref_deep.shape != (1, deep, tokens, hidden):
        raise ExportError(
            f"image path gives deepstack features {list(ref_deep.shape)}, expected [1, {deep}, {tokens}, {hidden}]", 1
        )

    with common.staged_output(args.out, args.force) as tmp:
        onnx_path = tmp / "vision.onnx"
        log(f"exporting the vision encoder ({args.dtype}, {fw}x{fh} -> {tokens}x{hidden})")
        common.export_onnx(module, torch.from_numpy(pv), onnx_path, args.dtype, tokens, hidden, deep)
        outs = common.run_onnx_outputs(onnx_path, pv)
        diff = common.check_close("vision.onnx (ONNX Runtime) vs PyTorch (probe image)", outs[0], ref, TOLERANCE[args.dtype])
        if deep:
            deep_diff = common.check_close(
                "vision.onnx deepstack_embeds (ONNX Runtime) vs PyTorch (probe image)",
                outs[1], ref_deep, TOLERANCE[args.dtype],
            )
            diff = max(diff, deep_diff)

        dec = tmp / "decoder"
        dec.mkdir()
        text = common.text_config(raw, cfg.text_config, family.lm_key, archs[text_as], text_as)
        text.update(family.decoder_fields(cfg, frame))
        n, nbytes, has_head = common.write_language_model(files, family.lm_prefixes, family.lm_heads, dec)
        # The weights decide: without an LM head tensor the head is the embedding table.
        text["tie_word_embeddings"] = not has_head
        (dec / "config.json").write_text(json.dumps(text, indent=2) + "\n")
        log(f"language model: {n} tensors, {nbytes / 2**20:.1f} MiB -> decoder/ ({archs[text_as]})")
        common.save_tokenizer(hf, dec)

        tok = processor.tokenizer
        image_token = family.image_token(processor)
        prompt = common.derive_prompt(processor, tok, image_token, args.template)
        fam_prefix, fam_suffix = family.frame_text(processor)
        if tiles is not None:
            # The tiles' text comes before each tile; the global image's before it.
            fam_prefix = ""
            tiles.update(family.tile_text(processor, tiles["rows"] > 0), global_image=True)
            check_tile_layout(processor, tiles, tokens, image_token, fam_suffix)
        prompt["frame_prefix"] = prompt["frame_prefix"] + fam_prefix
        prompt["frame_suffix"] = fam_suffix + prompt["frame_suffix"]
        prompt["default_question"] = args.question
        prompt["image_token"] = image_token
        name = args.name or hf.resolve().name
        common.write_manifest(
            tmp / "jetvlm.yaml",
            {
                "name": name,
                "comment": [
                    f"Exported by `jetvlm export` from {hf.resolve().name} ({raw['model_type']}).",
                    f"vision.onnx: {args.dtype}, ONNX Runtime vs PyTorch max abs diff {diff:.2e} on a probe image.",
                ],
                "vision": {
                    "height": fh, "width": fw, "tokens_per_frame": tokens,
                    "deepstack_output": family.deepstack_output if deep else None, **pre,
                },
                "prompt": prompt,
                "kv_policy": args.kv_policy,
                "tiles": tiles,
            },
        )
    log(f"prompt: {json.dumps(prompt['template'])}, frame {json.dumps(prompt['frame_prefix'])}"
        f" + {tokens} embeddings + {json.dumps(prompt['frame_suffix'])}, bos {prompt['add_bos']}")
    if tiles is not None and tiles["rows"]:
        n = tiles["rows"] * tiles["cols"] + 1
        log(f"tiles: a {tiles['frame'][0]}x{tiles['frame'][1]} frame -> {tiles['rows']} rows x "
            f"{tiles['cols']} columns of {fw}x{fh} tiles + the global image: {n} encoder runs, "
            f"{n * tokens} image tokens per frame")
    for note in pre["notes"]:
        log(f"note: {note}")
    log(f"wrote {args.out} in {time.time() - started:.1f}s")


def main(argv=None) -> int:
    args = parse(argv)
    try:
        export(args)
    except ExportError as e:
        print(f"jetvlm export: error: {e}", file=sys.stderr)
        return e.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
