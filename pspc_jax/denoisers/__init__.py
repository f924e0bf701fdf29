"""Denoisers: every one maps (z (B, H, W, C), sigma scalar or (B,)) to x̂ (B, H, W, C)."""
