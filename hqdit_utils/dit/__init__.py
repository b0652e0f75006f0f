"""The DiT itself: loading (embedded model, diffusers folder, original .pt) and guided sampling."""
