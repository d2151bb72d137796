"""lm-eval task definitions of baq_hf's offline zero-shot tasks (YAML) and their data loaders."""
