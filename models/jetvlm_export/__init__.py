"""jetvlm_export: turns a Hugging Face vision-language checkpoint into a jetvlm model package.

    PYTHONPATH=models .venv/bin/python -m jetvlm_export HF_DIR --out PKG [--frame-size N]
        [--dtype fp32|fp16] [--name NAME] [--kv-policy POLICY] [--force]

(`jetvlm export` runs this with the project venv.) The package written:

    jetvlm.yaml    manifest: the family processor's preprocessing, tokens per frame, the
                   prompt template derived from the chat template, the image token layout
    vision.onnx    vision tower + projector/connector, [1, 3, H, W] f32 -> [1, T, hidden] f32
    decoder/       the language model as a plain Hugging Face causal LM: config.json (the
                   text config), safetensors with `model.*` / `lm_head.weight` names,
                   tokenizer files, chat template, generation_config.json

Families (`model_type` in config.json): see `families.FAMILIES`. Everything is written into a
temporary directory beside --out and renamed into place only once the encoder has been
checked against PyTorch on a probe image, so a refused or failed export leaves nothing.
"""
