"""Pure Flax linen modules: math only, no files, formats or devices."""
