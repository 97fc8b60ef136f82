"""Pieces every family uses: the language model's weights and tokenizer, the prompt template
from the chat template, the ONNX export and its check, the manifest, the atomic output."""

import json
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np


class ExportError(Exception):
    """One line for the user. `code` 2: the input or an option is refused; 1: the export ran
    and failed a check."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ExportError(f"{path} is not valid JSON: {e}") from None


def log(msg: str) -> None:
    print(f"[export] {msg}", flush=True)


# ---------------------------------------------------------------- output directory


@contextmanager
def staged_output(out: Path, force: bool):
    """Yields a temporary directory beside `out`; on success it replaces `out` (an existing
    `out` only with `force`), on any error it is removed and `out` is untouched."""
    out = out.resolve()
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not empty (pass --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None and old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    elif old is not None:
        old.unlink()


# ---------------------------------------------------------------- language model


@contextmanager
def open_safetensors(path: Path):
    """`safe_open` whose failures (missing, truncated or malformed file, unreadable tensor)
    are one ExportError naming the file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - the Rust reader raises its own error types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"{path} is not a readable safetensors file: {first}") from None


def load_state(hf_dir: Path) -> dict:
    """tensor name -> shard file, from model.safetensors or its index. Every shard's header
    is read here, so a corrupt file is refused before anything is written."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map", {})
        if not isinstance(weight_map, dict) or not weight_map:
            raise ExportError(f"{index} has no weight_map")
        files = {name: hf_dir / str(shard) for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            with open_safetensors(shard) as f:
                held = set(f.keys())
            missing = [n for n, s in files.items() if s == shard and n not in held]
            if missing:
                raise ExportError(f"{shard} lacks {missing[0]}, which {index.name} places there")
        return files
    single = hf_dir / "model.safetensors"
    if not single.is_file():
        raise ExportError(
            f"no model.safetensors or model.safetensors.index.json in {hf_dir} "
            "(only safetensors checkpoints are read)"
        )
    with open_safetensors(single) as f:
        return {name: single for name in f.keys()}


def load_tensors(files: dict, names) -> dict:
    """The named tensors (torch), reading each shard once."""
    by_file: dict = {}
    for n in names:
        by_file.setdefault(files[n], []).append(n)
    out = {}
    for path, ns in by_file.items():
        with open_safetensors(path) as f:
            for n in ns:
                out[n] = f.get_tensor(n)
    return out


def strip_prefix(files: dict, prefixes) -> dict:
    """{new name: old name} for the tensors under the first of `prefixes` present: a
    `prefix` maps to `new` (e.g. `model.vision_tower.` -> ``)."""
    for old_prefix, new_prefix in prefixes:
        picked = {
            new_prefix + n[len(old_prefix) :]: n for n in files if n.startswith(old_prefix)
        }
        if picked:
            return picked
    return {}


def write_language_model(files: dict, body_prefixes, head_names, dst: Path) -> tuple:
    """Copies the language model's tensors into `dst` as a plain causal LM (`model.*`,
    `lm_head.weight`), one output shard per input shard. Returns (tensor count, bytes,
    whether the checkpoint has its own LM head: without one the head is the embedding)."""
    from safetensors.torch import save_file

    rename = strip_prefix(files, [(p, "model.") for p in body_prefixes])
    if not rename:
        raise ExportError(
            "no language model weights found (looked for tensors under "
            + ", ".join(f"`{p}`" for p in body_prefixes)
            + ")"
        )
    has_head = False
    for head in head_names:
        if head in files:
            rename["lm_head.weight"] = head
            has_head = True
            break
    shards: dict = {}
    for new, old in sorted(rename.items()):
        shards.setdefault(files[old], []).append(new)
    n_shards = len(shards)
    weight_map, total = {}, 0
    for i, (src, news) in enumerate(sorted(shards.items(), key=lambda kv: str(kv[0]))):
        name = "model.safetensors" if n_shards == 1 else f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        tensors = load_tensors(files, [rename[n] for n in news])
        out = {n: tensors[rename[n]].contiguous() for n in news}
        total += sum(t.numel() * t.element_size() for t in out.values())
        save_file(out, str(dst / name), metadata={"format": "pt"})
        weight_map.update({n: name for n in news})
        del tensors, out
    if n_shards > 1:
        (dst / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    return len(rename), total, has_head


def text_config(config: dict, parsed, key: str, architecture: str, model_type: str) -> dict:
    """The language model's config.json: the nested text config as transformers reads it
    (hub configs leave out every field at its default), with the fields a VLM keeps at its
    top level (token ids, tying, dtype) filled in where the text config lacks them."""
    if not isinstance(config.get(key), dict):
        raise ExportError(f"config.json has no `{key}` (the language model's config)")
    text = json.loads(parsed.to_json_string(use_diff=False))
    generic = (
        "_name_or_path", "transformers_version", "output_hidden_states", "output_attentions",
        "return_dict", "id2label", "label2id", "chunk_size_feed_forward", "is_encoder_decoder",
        "problem_type",
    )  # PretrainedConfig bookkeeping, not the model
    for k in generic:
        text.pop(k, None)
    for k in ("tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "dtype", "torch_dtype"):
        if text.get(k) is None and config.get(k) is not None:
            text[k] = config[k]
    text["architectures"] = [architecture]
    text["model_type"] = model_type
    return text


def save_tokenizer(hf_dir: Path, dst: Path) -> None:
    """tokenizer.json (converted by transformers when the checkpoint has only a slow
    tokenizer), tokenizer_config.json, the chat template, generation_config.json."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(hf_dir))
    except Exception as e:  # noqa: BLE001 - any loader failure is one line for the user
        raise ExportError(f"cannot load the tokenizer of {hf_dir}: {e}") from None
    tok.save_pretrained(str(dst))
    if not (dst / "tokenizer.json").is_file():
        raise ExportError(f"the tokenizer of {hf_dir} has no fast (tokenizer.json) form")
    for name in ("generation_config.json", "chat_template.jinja", "chat_template.json"):
        if (hf_dir / name).is_file() and not (dst / name).exists():
            shutil.copy(hf_dir / name, dst / name)


# ---------------------------------------------------------------- prompt


SENTINEL = "QUESTIONSENTINEL"


def render_chat(processor, n_images: int) -> str:
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": SENTINEL}]
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def derive_prompt(processor, tokenizer, image_token: str, template_override) -> dict:
    """The manifest's prompt section from the chat template: the text before and after the
    image (`{frames}`) and the question (`{question}`); text the template repeats with every
    image goes into frame_prefix/frame_suffix. BOS: the template's own, or the tokenizer's
    default."""
    bos = tokenizer.bos_token
    adds_bos = (
        bos is not None
        and tokenizer.bos_token_id is not None
        and tokenizer("x").input_ids[:1] == [tokenizer.bos_token_id]
    )
    prefix = suffix = ""
    if template_override is not None:
        template = template_override
    else:
        if not getattr(processor, "chat_template", None) and not getattr(tokenizer, "chat_template", None):
            raise ExportError(
                "the checkpoint has no chat template; pass --template "
                "'USER: {frames}\\n{question} ASSISTANT:' (or the family's prompt)"
            )
        one = render_chat(processor, 1)
        parts = one.split(image_token)
        if len(parts) != 2 or one.count(SENTINEL) != 1:
            raise ExportError(
                f"the chat template does not render one `{image_token}` and the question for one "
                "image; pass --template"
            )
        before, after = parts
        # Text repeated per image: in a two-image render, `b` between the images is the
        # suffix of one frame plus the prefix of the next.
        two = render_chat(processor, 2).split(image_token)
        if len(two) == 3 and two[0] == before and two[2] == after:
            b = two[1]
            for cut in range(len(b), -1, -1):
                s, p = b[:cut], b[cut:]
                if after.startswith(s) and before.endswith(p):
                    suffix, prefix = s, p
                    break
        before = before[: len(before) - len(prefix)] if prefix else before
        after = after[len(suffix) :]
        if bos and before.startswith(bos):
            before = before[len(bos) :]
            adds_bos = True
        template = before + "{frames}" + after.replace(SENTINEL, "{question}")
    for field, text in (("template", template), ("frame_prefix", prefix), ("frame_suffix", suffix)):
        stripped = text.replace("{frames}", "").replace("{question}", "")
        if "{" in stripped or "}" in stripped:
            raise ExportError(f"the prompt {field} {text!r} holds braces the manifest cannot express")
    if "{frames}" not in template or "{question}" not in template:
        raise ExportError(f"the prompt template {template!r} needs {{frames}} and {{question}}")
    return {"template": template, "frame_prefix": prefix, "frame_suffix": suffix, "add_bos": adds_bos}


# ---------------------------------------------------------------- images


def probe_image(width: int, height: int) -> np.ndarray:
    """A deterministic RGB8 scene: gradient background, a red square, a blue disc."""
    y, x = np.mgrid[0:height, 0:width]
    img = np.zeros((height, width, 3), dtype=np.uint8)
    img[..., 0] = (x * 255 // max(width - 1, 1)).astype(np.uint8)
    img[..., 1] = (y * 255 // max(height - 1, 1)).astype(np.uint8)
    img[..., 2] = 90
    img[height // 8 : height * 7 // 16, width // 6 : width * 7 // 16] = [220, 30, 30]
    disc = (x - width * 11 // 16) ** 2 + (y - height * 5 // 8) ** 2 <= (min(width, height) // 5) ** 2
    img[disc] = [30, 40, 210]
    return img


def normalise(img: np.ndarray, mean, std) -> np.ndarray:
    """The manifest's preprocessing at the encoder's size (as the Rust preprocessor does it):
    RGB in [0, 1], (x - mean) / std, NCHW, batch 1, f32."""
    x = img.astype(np.float32) / np.float32(255.0)
    x = (x - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None].astype(np.float32))


# ---------------------------------------------------------------- ONNX


def export_onnx(
    module, pixel_values, path: Path, dtype: str, tokens: int, hidden: int, deepstack: int = 0
) -> None:
    """Exports `module` ([1,3,H,W] -> [1,T,hidden]) with f32 input and output; `fp16` runs
    the weights and activations in half precision inside the graph. With `deepstack` layers
    the module returns a second tensor, `deepstack_embeds` [1, deepstack, T, hidden]."""
    import onnx
    import torch

    class F32Io(torch.nn.Module):
        def __init__(self, inner, half):
            super().__init__()
            self.inner = inner.half() if half else inner
            self.half = half

        def forward(self, pixel_values):
            x = pixel_values.half() if self.half else pixel_values
            out = self.inner(x)
            if isinstance(out, tuple):
                return tuple(o.float() for o in out)
            return out.float()

    wrapped = F32Io(module, dtype == "fp16").eval()
    with torch.no_grad(), warnings.catch_warnings():
        # Shape arithmetic traced as constants is intended: the frame size is fixed.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            wrapped,
            (pixel_values,),
            str(path),
            input_names=["pixel_values"],
            output_names=["image_embeds"] + (["deepstack_embeds"] if deepstack else []),
            dynamic_axes={
                "pixel_values": {0: "batch"},
                "image_embeds": {0: "batch"},
                **({"deepstack_embeds": {0: "batch"}} if deepstack else {}),
            },
            opset_version=17,
            dynamo=False,
        )
    # The tracer may leave the token and width axes symbolic: declare them so jetvlm checks
    # tokens_per_frame and hidden_size against the manifest and the decoder.
    proto = onnx.load(str(path))
    dims = proto.graph.output[0].type.tensor_type.shape.dim
    for axis, size in ((1, tokens), (2, hidden)):
        dims[axis].ClearField("dim_param")
        dims[axis].dim_value = size
    if deepstack:
        dims = proto.graph.output[1].type.tensor_type.shape.dim
        for axis, size in ((1, deepstack), (2, tokens), (3, hidden)):
            dims[axis].ClearField("dim_param")
            dims[axis].dim_value = size
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def run_onnx(path: Path, pixel_values: np.ndarray) -> np.ndarray:
    return run_onnx_outputs(path, pixel_values)[0]


def run_onnx_outputs(path: Path, pixel_values: np.ndarray) -> list:
    """Every output of the encoder (image_embeds, then deepstack_embeds if it has them)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"pixel_values": pixel_values})


def check_close(what: str, got: np.ndarray, ref: np.ndarray, tol: float) -> float:
    """Max abs difference; an error above `tol` times the reference's scale (at least 1)."""
    if got.shape != ref.shape:
        raise ExportError(f"{what}: shape {list(got.shape)} differs from PyTorch's {list(ref.shape)}", 1)
    diff = float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max())
    scale = max(1.0, float(np.abs(ref).max()))
    bound = tol * scale
    log(f"{what}: max abs diff {diff:.3e} (bound {bound:.1e})")
    if not diff <= bound:
        raise ExportError(f"{what}: max abs diff {diff:.3e} is above the bound {bound:.1e}", 1)
    return diff


# ---------------------------------------------------------------- manifest


def yaml_str(s: str) -> str:
    """A YAML double-quoted scalar (JSON's escaping is valid YAML)."""
    return json.dumps(s, ensure_ascii=False)


def write_manifest(path: Path, m: dict) -> None:
    v, p = m["vision"], m["prompt"]
    lines = [f"# {line}" for line in m["comment"]]
    lines += [
        "format: 1",
        f"name: {yaml_str(m['name'])}",
        "vision:",
        "  encoder: vision.onnx",
        f"  image_size: {{height: {v['height']}, width: {v['width']}}}",
    ]
    lines += [f"  # {n}" for n in v.get("notes", [])]
    lines += [
        f"  resize: {v['resize']}",
        f"  interpolation: {v['interpolation']}",
        f"  mean: {json.dumps(v['mean'])}",
        f"  std: {json.dumps(v['std'])}",
        "  layout: nchw",
        "  input_dtype: f32",
        f"  tokens_per_frame: {v['tokens_per_frame']}",
        "  input_name: pixel_values",
        "  output_name: image_embeds",
    ]
    if v.get("deepstack_output"):
        lines.append(f"  deepstack_output: {v['deepstack_output']}")
    t = m.get("tiles")
    if t:
        (fw, fh), (sw, sh) = t["frame"], t["scaled"]
        if t["rows"]:
            what = (
                f"then to whole tiles ({t['cols'] * t['tile']}x{t['rows'] * t['tile']}), cuts "
                f"{t['rows']} rows x {t['cols']} columns of {t['tile']}x{t['tile']} tiles (row-major) "
                "and adds that image resized to one tile (the global image); tokens_per_frame is per tile"
            )
        else:
            what = f"then to one {t['tile']}x{t['tile']} tile (not split: the global image only)"
        lines += [
            "  tiles:",
            f"    # processor: resizes a {fw}x{fh} frame to {sw}x{sh} (longest edge), {what}",
            f"    frame: {{height: {fh}, width: {fw}}}",
            *([f"    longest_edge: {t['longest_edge']}"] if t["longest_edge"] is not None else []),
            f"    rows: {t['rows']}",
            f"    cols: {t['cols']}",
            f"    global_image: {'true' if t['global_image'] else 'false'}",
            f"    tile_prefix: {yaml_str(t['tile_prefix'])}",
            f"    row_suffix: {yaml_str(t['row_suffix'])}",
            f"    global_prefix: {yaml_str(t['global_prefix'])}",
        ]
    lines += [
        "decoder:",
        "  dir: decoder",
        "prompt:",
        f"  template: {yaml_str(p['template'])}",
        f"  frame_prefix: {yaml_str(p['frame_prefix'])}",
        f"  frame_suffix: {yaml_str(p['frame_suffix'])}",
        f"  add_bos: {'true' if p['add_bos'] else 'false'}",
        "  stop: []",
        f"  default_question: {yaml_str(p['default_question'])}",
        f"  image_token: {yaml_str(p['image_token'])}",
        "kv:",
        f"  policy: {yaml_str(m['kv_policy'])}",
    ]
    path.write_text("\n".join(lines) + "\n")
