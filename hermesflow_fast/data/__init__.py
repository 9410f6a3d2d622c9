"""Data: sources of images and preference pairs, and caches of their pre-computed image tokens (token_cache)."""
