"""The frozen models: loading by hub id or folder, text -> CLIP embeddings, embeddings -> prompts, the official sampler."""
