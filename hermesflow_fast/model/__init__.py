"""The unified model: Show-o-compatible transformer, token layout and masks, attention backends, VQ tokenizers,
generation."""
