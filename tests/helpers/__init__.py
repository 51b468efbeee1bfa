"""Test support (tiny models, tokenizers, adapters): not part of the installed library."""
