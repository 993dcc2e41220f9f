"""What a Skywork-R1V checkpoint is and how it computes: config spec and presets, streaming safetensors IO,
the torch reference forward (InternViT -> mlp1 -> Qwen2), tokenizer, chat templates, image preprocessing,
storage formats (group-wise int4, the AutoAWQ layout, bytes per weight) and what a path on disk holds."""
