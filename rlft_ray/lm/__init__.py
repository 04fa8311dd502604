"""Language-model helpers: tiny offline tokenizers/models and loading of pretrained checkpoints."""
